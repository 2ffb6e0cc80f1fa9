"""Another system drives Corral with plain nats-py: binary and structured CloudEvents,
deduplication, and bad input that is rejected and dead-lettered while the worker carries on."""

from __future__ import annotations

import json
import uuid
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from support import eventually

from corral.bus.connection import Bus
from corral.bus.settings import Settings

pytestmark = pytest.mark.timeout(60)

SPEC = {
    "replicas": 2,
    "command": ["sleep", "1000"],
    "resources": {"cpu": 0.1, "memory": "16Mi"},
}
FAKE_NODE = {"node_id": "n1", "driver": "fake", "capacity": {"cpu": 8, "memory": "16Gi"}}


class Recorder:
    """Every event under the test's prefix, as (subject, headers, data)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], Any]] = []

    async def on_msg(self, msg: Msg) -> None:
        data = json.loads(msg.data) if msg.data else None
        self.seen.append((msg.subject, dict(msg.headers or {}), data))

    def matching(self, suffix: str, correlation: str | None = None) -> list[Any]:
        return [
            (subject, headers, data)
            for subject, headers, data in self.seen
            if subject.endswith(suffix)
            and (correlation is None or headers.get("corral-correlation") == correlation)
        ]


def binary(
    settings: Settings,
    name: str,
    verb: str,
    data: Any,
    ce_id: str | None = None,
    ce_type: str | None = None,
) -> tuple[str, bytes, dict[str, str]]:
    headers = {
        "ce-id": ce_id or uuid.uuid4().hex,
        "ce-source": "test/other-system",
        "ce-type": ce_type or f"io.corral.service.{verb}",
        "ce-specversion": "1.0",
        "content-type": "application/json",
    }
    return f"{settings.prefix}.cmd.service.{name}.{verb}", json.dumps(data).encode(), headers


async def replica_count(bus: Bus, service: str) -> int:
    return len(await bus.buckets.replicas.items(f"{service}.>"))


async def test_binary_mode_deploy_scale_delete(settings, bus, control_plane) -> None:
    recorder = Recorder()
    nc = await nats.connect(settings.resolved_url())
    sub = await nc.subscribe(f"{settings.prefix}.evt.>", cb=recorder.on_msg)
    try:
        async with control_plane(agents=[FAKE_NODE]):
            subject, payload, headers = binary(settings, "hello", "deploy", SPEC)
            await nc.publish(subject, payload, headers=headers)  # plain core publish
            deploy_id = headers["ce-id"]
            await eventually(
                lambda: recorder.matching(".hello.accepted", deploy_id), what="deploy accepted"
            )
            await eventually(
                lambda: len(recorder.matching(".started", deploy_id)) == 2,
                what="two replicas started",
            )

            subject, payload, headers = binary(settings, "hello", "scale", {"replicas": 4})
            await nc.publish(subject, payload, headers=headers)
            scale_id = headers["ce-id"]
            accepted = await eventually(
                lambda: recorder.matching("evt.service.hello.accepted", scale_id),
                what="scale accepted",
            )
            assert accepted[0][2]["generation"] == 2
            await eventually(
                lambda: len(recorder.matching(".started", scale_id)) == 2,
                what="two more replicas started, correlated with the scale",
            )
            assert all(
                s.startswith(f"{settings.prefix}.evt.replica.hello.")
                for s, _, _ in recorder.matching(".started")
            )
            await eventually(lambda: replica_count(bus, "hello"), what="replica statuses")
            assert await eventually(lambda: _count_is(bus, "hello", 4), what="4 replicas")

            subject, payload, headers = binary(settings, "hello", "delete", {})
            await nc.publish(subject, payload, headers=headers)
            await eventually(
                lambda: recorder.matching(".accepted", headers["ce-id"]), what="delete accepted"
            )
            await eventually(lambda: _count_is(bus, "hello", 0), what="every replica gone")
            stopped = recorder.matching("evt.replica.hello.stopped", headers["ce-id"])
            assert len(stopped) == 4
    finally:
        await sub.unsubscribe()
        await nc.close()


async def _count_is(bus: Bus, service: str, expected: int) -> bool:
    return await replica_count(bus, service) == expected


async def test_structured_mode_and_duplicate_ids_act_once(settings, bus, control_plane) -> None:
    recorder = Recorder()
    nc = await nats.connect(settings.resolved_url())
    sub = await nc.subscribe(f"{settings.prefix}.evt.service.>", cb=recorder.on_msg)
    try:
        async with control_plane(agents=[FAKE_NODE]):
            subject, payload, headers = binary(settings, "web", "deploy", SPEC)
            await nc.publish(subject, payload, headers=headers)
            await eventually(lambda: recorder.matching(".accepted", headers["ce-id"]))

            command_id = uuid.uuid4().hex
            structured = {
                "specversion": "1.0",
                "id": command_id,
                "source": "test/structured",
                "type": "io.corral.service.scale",
                "datacontenttype": "application/json",
                "data": {"replicas": 3},
            }
            body = json.dumps(structured).encode()
            ce_headers = {"content-type": "application/cloudevents+json"}
            await nc.publish(f"{settings.prefix}.cmd.service.web.scale", body, headers=ce_headers)
            # the same command again, with no Nats-Msg-Id: the api worker still acts once
            await nc.publish(f"{settings.prefix}.cmd.service.web.scale", body, headers=ce_headers)
            outcomes = await eventually(
                lambda: (
                    (found := recorder.matching(".accepted", command_id))
                    and len(found) >= 2
                    and found
                ),
                what="both copies answered",
            )
            flags = sorted(data["duplicate"] for _, _, data in outcomes)
            assert flags == [False, True]
            record = await bus.buckets.services.get("web")
            assert record is not None
            assert record.value.spec.replicas == 3
            assert record.value.generation == 2  # one deploy, one scale: the copy changed nothing
    finally:
        await sub.unsubscribe()
        await nc.close()


@pytest.mark.parametrize(
    ("verb", "data", "headers_override", "code", "reason_part"),
    [
        ("scale", {"replicas": -1}, {}, "invalid", "replicas"),
        ("scale", {"replicas": 2}, {"ce-type": "io.corral.service.deploy"}, "invalid", "ce-type"),
        ("explode", {}, {"ce-type": "io.corral.service.explode"}, "unknown", "unknown command"),
        ("scale", {"replicas": 2}, {"drop": "ce-source"}, "invalid", "ce-source"),
        ("deploy", {"replicas": 1}, {}, "invalid", "command"),
        ("scale", {"replicas": 2}, {}, "not_found", "not found"),
    ],
)
async def test_bad_commands_are_rejected_and_dead_lettered(
    settings, bus, control_plane, verb, data, headers_override, code, reason_part
) -> None:
    recorder = Recorder()
    nc = await nats.connect(settings.resolved_url())
    sub = await nc.subscribe(f"{settings.prefix}.evt.>", cb=recorder.on_msg)
    try:
        async with control_plane():
            subject, payload, headers = binary(settings, "ghost", verb, data)
            override = dict(headers_override)
            if "drop" in override:
                headers.pop(override.pop("drop"))
            headers.update(override)
            await nc.publish(subject, payload, headers=headers)
            rejected = await eventually(lambda: recorder.matching(".rejected"), what="rejection")
            _, _, body = rejected[0]
            assert body["code"] == code
            assert reason_part in body["reason"] + json.dumps(body["errors"])

            dead = await bus.js.get_last_msg(bus.names.dlq_stream, f"{settings.prefix}.dlq.>")
            assert dead.subject == f"{settings.prefix}.dlq.{subject}"
            assert dead.headers is not None
            assert reason_part in dead.headers["corral-reason"] or code == "invalid"
            assert dead.headers["corral-code"] == code
            assert dead.data == payload

            # the worker is still there: a good command after the bad one is accepted
            good = binary(settings, "alive", "deploy", SPEC)
            await nc.publish(good[0], good[1], headers=good[2])
            await eventually(lambda: recorder.matching(".alive.accepted"), what="good command")
    finally:
        await sub.unsubscribe()
        await nc.close()


async def test_garbage_payload_and_subject_are_rejected(settings, bus, control_plane) -> None:
    recorder = Recorder()
    nc = await nats.connect(settings.resolved_url())
    sub = await nc.subscribe(f"{settings.prefix}.evt.>", cb=recorder.on_msg)
    try:
        async with control_plane():
            await nc.publish(
                f"{settings.prefix}.cmd.service.x.scale",
                b"\xff not json",
                headers={
                    "ce-id": "1",
                    "ce-source": "s",
                    "ce-type": "io.corral.service.scale",
                    "ce-specversion": "1.0",
                },
            )
            await nc.publish(f"{settings.prefix}.cmd.oops", b"{}")
            rejected = await eventually(
                lambda: len(recorder.matching(".rejected")) == 2 and recorder.matching(".rejected")
            )
            reasons = sorted(data["reason"] for _, _, data in rejected)
            assert any("not valid JSON" in r for r in reasons)
            assert any("is not" in r and "cmd.<resource>" in r for r in reasons)
            info = await bus.js.stream_info(bus.names.dlq_stream)
            assert info.state.messages == 2
    finally:
        await sub.unsubscribe()
        await nc.close()
