"""`corral.bus.publishing`: pipelined JetStream publishes on a real nats-server."""

from __future__ import annotations

import pytest
from nats.js.api import PubAck
from nats.js.errors import BadRequestError, NoStreamResponseError

from corral.bus.connection import Bus
from corral.bus.publishing import Pipeline


async def test_every_publish_is_acked_in_order(bus: Bus) -> None:
    pipeline = Pipeline(bus.nc)
    await pipeline.start()
    try:
        batch = pipeline.batch()
        subject = bus.names.evt("service", "web", "tested")
        indexes = [
            await batch.publish(subject, f'{{"n":{i}}}'.encode(), {"Nats-Msg-Id": f"p-{i}"})
            for i in range(300)
        ]
        again = await batch.publish(subject, b"{}", {"Nats-Msg-Id": "p-7"})
        results = await batch.wait(5.0)
        assert indexes == list(range(300))
        assert len(results) == len(batch) == 301
        acks = [r for r in results if isinstance(r, PubAck)]
        assert len(acks) == 301
        seqs = [ack.seq for ack in acks[:300]]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == 300
        assert all(ack.stream == bus.names.evt_stream for ack in acks)
        repeated = results[again]
        assert isinstance(repeated, PubAck)
        assert repeated.duplicate  # JetStream dropped the re-sent id
        stored = await bus.js.stream_info(bus.names.evt_stream)
        assert stored.state.messages >= 300
    finally:
        await pipeline.stop()


async def test_each_failure_is_reported_at_its_index(bus: Bus) -> None:
    pipeline = Pipeline(bus.nc)
    await pipeline.start()
    try:
        first = await bus.buckets.services.kv.put("web", b"{}")
        batch = pipeline.batch()
        key = f"$KV.{bus.names.services}.web"
        stale = await batch.publish(key, b"{}", {"Nats-Expected-Last-Subject-Sequence": "0"})
        fresh = await batch.publish(key, b"{}", {"Nats-Expected-Last-Subject-Sequence": str(first)})
        nowhere = await batch.publish(f"{bus.names.prefix}.no.stream.here", b"{}", {})
        results = await batch.wait(5.0)
        assert isinstance(results[stale], BadRequestError)  # the compare-and-set lost
        assert isinstance(results[fresh], PubAck)
        assert isinstance(results[nowhere], NoStreamResponseError)
    finally:
        await pipeline.stop()


async def test_a_reply_that_never_comes_times_out_and_is_forgotten(bus: Bus) -> None:
    silent = await bus.nc.subscribe(f"{bus.names.prefix}.silent")  # it receives, and never answers
    pipeline = Pipeline(bus.nc)
    await pipeline.start()
    try:
        batch = pipeline.batch()
        await batch.publish(f"{bus.names.prefix}.silent", b"x", {})
        [result] = await batch.wait(0.3)
        assert isinstance(result, TimeoutError)
        assert not pipeline._pending  # forgotten: a late reply would change nothing
        after = pipeline.batch()
        await after.publish(bus.names.evt("service", "web", "x"), b"{}", {})
        [ack] = await after.wait(5.0)
        assert isinstance(ack, PubAck)  # the pipeline carries on
    finally:
        await pipeline.stop()
        await silent.unsubscribe()


async def test_an_empty_batch_and_a_stopped_pipeline(bus: Bus) -> None:
    pipeline = Pipeline(bus.nc)
    await pipeline.start()
    assert await pipeline.batch().wait(0.1) == []
    await pipeline.stop()
    with pytest.raises(RuntimeError, match=r"start\(\)"):
        pipeline.batch()
