"""A stream activation is event-driven: while a service is at zero the autoscaler listens on
the activation stream's subjects (core NATS), and the first message there has the consumer's
backlog read at once, not at the next poll."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from support import collect, command, eventually

from corral.bus.settings import Settings
from corral.workers.autoscaler.worker import AutoscalerWorker

pytestmark = pytest.mark.timeout(60)
WORKERS = ("api", "deployer", "scheduler", "autoscaler")
FAKE = {"node_id": "sim", "driver": "fake", "capacity": {"cpu": 64, "memory": "64Gi"}}
POLL = "60s"
"""far longer than any wait below: only the event-driven path can wake the service"""


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"autoscale_poll_interval": 60.0})


async def desired(bus: Any, service: str) -> int:
    item = await bus.buckets.services.get(service)
    return -1 if item is None else int(item.value.spec.replicas)


async def make_queue(bus: Any, settings: Settings) -> tuple[str, str]:
    stream = f"{settings.prefix.upper()}_WAKE"
    subject = f"{settings.prefix}.wake.jobs"
    await bus.js.add_stream(StreamConfig(name=stream, subjects=[f"{settings.prefix}.wake.>"]))
    await bus.js.add_consumer(
        stream, ConsumerConfig(durable_name="workers", ack_policy=AckPolicy.EXPLICIT)
    )
    return stream, subject


def sleeper(stream: str, threshold: int) -> dict[str, Any]:
    activation = {"stream": stream, "consumer": "workers", "threshold": threshold}
    policy = {"min": 0, "max": 2, "poll_interval": POLL, "activation": activation}
    return {"replicas": 0, "command": ["sleep", "600"], "autoscale": policy}


def watching(host: Any, service: str) -> bool:
    worker = next(w for w in host.workers if isinstance(w, AutoscalerWorker))
    found = worker._activations.get(service)
    return found is not None and bool(found[1])


async def test_the_first_message_on_the_stream_wakes_it_at_once(
    settings, bus, control_plane
) -> None:
    stream, subject = await make_queue(bus, settings)
    seen = await collect(bus, bus.names.evt("autoscale", "drowsy", "decision"))
    try:
        async with control_plane(workers=WORKERS, agents=[FAKE]) as host:
            await command(bus, "deploy", "drowsy", sleeper(stream, 0))
            await eventually(lambda: watching(host, "drowsy"), within=10, what="a watch")
            assert await desired(bus, "drowsy") == 0
            sent = time.monotonic()
            await bus.js.publish(subject, b"job")
            await eventually(lambda: desired_is(bus, "drowsy", 1), within=10, what="woken to 1")
            assert time.monotonic() - sent < 10  # the poll would have taken 60 s
            woken = [json.loads(t) for _, t in seen if '"activated"' in t]
            assert woken
            assert f"a backlog of 1 on {stream}/workers" in woken[0]["reason"]
            # awake: the stream is no longer watched (the poll and the queue take over)
            await eventually(lambda: not watching(host, "drowsy"), within=10, what="unwatched")
    finally:
        await seen.close()
        await bus.js.delete_stream(stream)


async def test_the_threshold_holds_until_the_backlog_is_over_it(
    settings, bus, control_plane
) -> None:
    stream, subject = await make_queue(bus, settings)
    seen = await collect(bus, bus.names.evt("autoscale", "patient", "decision"))
    try:
        async with control_plane(workers=WORKERS, agents=[FAKE]) as host:
            await command(bus, "deploy", "patient", sleeper(stream, 3))
            await eventually(lambda: watching(host, "patient"), within=10, what="a watch")
            for i in range(3):
                await bus.js.publish(subject, f"job {i}".encode())
            assert await desired(bus, "patient") == 0
            await bus.js.publish(subject, b"job 3")
            await eventually(lambda: desired_is(bus, "patient", 1), within=10, what="woken to 1")
            woken = [json.loads(t) for _, t in seen if '"activated"' in t]
            # it woke on the fourth message, not before: a backlog of 4 over a threshold of 3
            assert "a backlog of 4" in woken[0]["reason"]
            assert "(threshold 3)" in woken[0]["reason"]
    finally:
        await seen.close()
        await bus.js.delete_stream(stream)


async def desired_is(bus: Any, service: str, count: int) -> bool:
    return await desired(bus, service) == count
