"""`corral.bus.pulling.Puller`: batches from a durable pull consumer on a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from support import eventually

from corral.bus.connection import Bus
from corral.bus.pulling import Puller, PullError


@pytest.fixture
async def queue(bus: Bus) -> AsyncIterator[tuple[str, str]]:
    stream = f"{bus.names.prefix.upper()}_PULL"
    subject = f"{bus.names.prefix}.pull.jobs"
    await bus.js.add_stream(StreamConfig(name=stream, subjects=[f"{bus.names.prefix}.pull.>"]))
    await bus.js.add_consumer(
        stream,
        ConsumerConfig(durable_name="work", ack_policy=AckPolicy.EXPLICIT, ack_wait=30),
    )
    yield stream, subject
    await bus.js.delete_stream(stream)


async def started(bus: Bus, stream: str) -> Puller:
    puller = Puller(bus.nc, stream, "work")
    await puller.start()
    return puller


async def send(bus: Bus, subject: str, count: int, first: int = 0) -> None:
    for i in range(first, first + count):
        await bus.js.publish(subject, f"job {i}".encode(), headers={"n": str(i)})


async def test_batches_come_in_order_and_in_full(bus: Bus, queue: tuple[str, str]) -> None:
    stream, subject = queue
    await send(bus, subject, 25)
    puller = await started(bus, stream)
    try:
        first = await puller.fetch(10, timeout=2.0)
        began = time.monotonic()
        second = await puller.fetch(100, timeout=10.0)  # fewer there than asked: no waiting
        assert time.monotonic() - began < 5.0  # the server's "no more" ended it, not the timeout
        assert [m.data for m in first] == [f"job {i}".encode() for i in range(10)]
        assert [m.headers["n"] for m in second] == [str(i) for i in range(10, 25)]  # type: ignore[index]
        for msg in first + second:
            await msg.ack()
        assert second[-1].metadata.sequence.stream == 25

        async def all_acked() -> bool:
            info = await bus.js.consumer_info(stream, "work")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await eventually(all_acked, within=10, what="every message acked")
    finally:
        await puller.stop()


async def test_an_idle_fetch_returns_as_soon_as_a_message_lands(
    bus: Bus, queue: tuple[str, str]
) -> None:
    stream, subject = queue
    puller = await started(bus, stream)
    try:
        fetching = asyncio.create_task(puller.fetch(50, timeout=5.0))
        # the no_wait request found nothing; the second one lingers
        await eventually(lambda: puller._request == "2", within=5, what="a lingering request")
        sent = time.monotonic()
        await send(bus, subject, 1)
        msgs = await fetching
        took = time.monotonic() - sent
        assert [m.data for m in msgs] == [b"job 0"]
        assert took < 2.0  # it did not wait for the other 49, nor for the 5 s
        # what the lingering request delivers later is kept for the next fetch
        await send(bus, subject, 3, first=1)
        later: list[bytes] = []
        while len(later) < 3:
            later += [m.data for m in await puller.fetch(50, timeout=2.0)]
        assert later == [b"job 1", b"job 2", b"job 3"]
    finally:
        await puller.stop()


async def test_nothing_there_is_an_empty_batch_after_the_timeout(
    bus: Bus, queue: tuple[str, str]
) -> None:
    stream, _ = queue
    puller = await started(bus, stream)
    try:
        began = time.monotonic()
        assert await puller.fetch(10, timeout=0.3) == []
        assert 0.2 <= time.monotonic() - began < 2.0
    finally:
        await puller.stop()


async def test_an_unacked_message_is_delivered_again(bus: Bus, queue: tuple[str, str]) -> None:
    stream, subject = queue
    await bus.js.add_consumer(  # a short ack_wait, so the redelivery comes quickly
        stream,
        ConsumerConfig(durable_name="quick", ack_policy=AckPolicy.EXPLICIT, ack_wait=0.5),
    )
    await send(bus, subject, 1)
    puller = Puller(bus.nc, stream, "quick")
    await puller.start()
    try:
        [first] = await puller.fetch(1, timeout=2.0)
        again: list[int] = []
        deadline = time.monotonic() + 10
        while not again and time.monotonic() < deadline:
            again = [m.metadata.num_delivered for m in await puller.fetch(1, timeout=1.0)]
        assert first.metadata.num_delivered == 1
        assert again == [2]
    finally:
        await puller.stop()


async def test_a_missing_consumer_is_an_error_with_the_reason(
    bus: Bus, queue: tuple[str, str]
) -> None:
    stream, _ = queue
    puller = Puller(bus.nc, stream, "nobody")
    await puller.start()
    try:
        with pytest.raises(PullError, match="nobody"):
            await puller.fetch(1, timeout=2.0)
    finally:
        await puller.stop()
    with pytest.raises(RuntimeError, match="start"):
        await puller.fetch(1, timeout=0.1)


async def test_a_message_that_looks_like_a_status_is_still_delivered(
    bus: Bus, queue: tuple[str, str]
) -> None:
    """A publisher may send an empty payload with a `Status` header; only the server's own
    status messages (no ack subject) end a pull."""
    stream, subject = queue
    await bus.js.publish(subject, b"", headers={"Status": "404", "Description": "No Messages"})
    await send(bus, subject, 1, first=1)
    puller = await started(bus, stream)
    try:
        msgs = await puller.fetch(10, timeout=2.0)
        assert [m.data for m in msgs] == [b"", b"job 1"]
        assert msgs[0].headers == {"Status": "404", "Description": "No Messages"}
    finally:
        await puller.stop()
