"""The api worker's batch path under load: small batches, several in flight at once, some
holding the same services. Every command is answered exactly once, and each service's
commands apply in the order they were sent, each on the record the one before it wrote."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from support import eventually

from corral.bus.settings import Settings
from corral.services.runner import Host
from corral.workers.api.worker import ApiWorker
from corral.workers.runtime import Context, Worker

pytestmark = pytest.mark.timeout(60)
SERVICES = ("alpha", "beta", "gamma", "delta", "eps")
ROUNDS = 120


async def send(bus: Any, verb: str, name: str, data: dict[str, Any]) -> str:
    command_id = uuid.uuid4().hex
    headers = {
        "ce-id": command_id,
        "ce-source": "test",
        "ce-type": f"io.corral.service.{verb}",
        "ce-specversion": "1.0",
    }
    await bus.js.publish_async(
        bus.names.cmd("service", name, verb), json.dumps(data).encode(), headers=headers
    )
    return command_id


async def test_many_small_batches_in_flight_keep_each_services_order(
    settings: Settings, bus: Any
) -> None:
    accepted: dict[str, list[dict[str, Any]]] = {}

    async def on_accepted(msg: Any) -> None:
        data = json.loads(msg.data)
        accepted.setdefault(data["command_id"], []).append(data)

    sub = await bus.nc.subscribe(bus.names.evt("service", "*", "accepted"), cb=on_accepted)

    def build(ctx: Context) -> list[Worker]:
        return [ApiWorker(ctx, batch_size=7)]  # many batches, overlapping services

    async with Host(settings, build):
        deploys = [
            await send(bus, "deploy", name, {"command": ["sleep", "1"], "replicas": 1})
            for name in SERVICES
        ]
        await bus.js.publish_async_completed()
        await eventually(lambda: all(d in accepted for d in deploys), what="the deploys")
        sent: dict[str, list[tuple[str, int]]] = {name: [] for name in SERVICES}
        for i in range(ROUNDS):
            for j, name in enumerate(SERVICES):
                if (i + j) % 3 == 0:  # uneven: the services fall into batches differently
                    continue
                replicas = 2 + (i % 5)
                command_id = await send(bus, "scale", name, {"replicas": replicas})
                sent[name].append((command_id, replicas))
        await bus.js.publish_async_completed()
        ids = [cid for cmds in sent.values() for cid, _ in cmds]
        await eventually(lambda: all(c in accepted for c in ids), within=30, what="all answers")
        assert all(len(accepted[c]) == 1 for c in ids)  # exactly once
        for name, cmds in sent.items():
            record = await bus.buckets.services.get(name)
            assert record is not None
            assert record.value.spec.replicas == cmds[-1][1]  # the last one sent won
            # in order: the generations follow the order sent, one per command that changed
            # something (a repeat of the same count changes nothing)
            expected, generation, last = [], 1, 1
            for _, replicas in cmds:
                if replicas != last:
                    generation += 1
                    last = replicas
                expected.append(generation)
            assert [accepted[cid][0]["generation"] for cid, _ in cmds] == expected
            assert record.value.generation == expected[-1]
    await sub.unsubscribe()


async def test_a_command_with_the_longest_id_allowed_is_accepted(
    settings: Settings, bus: Any
) -> None:
    """The `…accepted` event's id is derived from the command's (so that a redelivered command's
    answer is deduplicated); a 256-character command id must still give a valid event id."""
    answers: list[dict[str, Any]] = []

    async def on_answer(msg: Any) -> None:
        answers.append({"subject": msg.subject, "headers": dict(msg.headers or {})})

    sub = await bus.nc.subscribe(bus.names.evt("service", "*", "*"), cb=on_answer)
    long_id = "x" * 256
    async with Host(settings, lambda ctx: [ApiWorker(ctx)]):
        headers = {
            "ce-id": long_id,
            "ce-source": "test",
            "ce-type": "io.corral.service.deploy",
            "ce-specversion": "1.0",
        }
        spec = {"command": ["sleep", "1"], "replicas": 1}
        await bus.js.publish(
            bus.names.cmd("service", "longid", "deploy"), json.dumps(spec).encode(), headers=headers
        )
        found = await eventually(
            lambda: [a for a in answers if a["headers"].get("corral-correlation") == long_id],
            within=10,
            what="an answer to the command",
        )
        assert found[0]["subject"].endswith(".accepted")
        event_id = found[0]["headers"]["ce-id"]
        assert len(event_id) <= 256
        assert event_id.endswith(".accepted")
        record = await bus.buckets.services.get("longid")
        assert record is not None
        assert long_id in record.value.recent_commands
    await sub.unsubscribe()
