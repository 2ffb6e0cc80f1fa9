"""The CLI's conversations with the bus: send a command and wait for its outcome, read state,
read and follow events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from corral.bus.codec import CORRELATION, decode, encode, structured_body
from corral.bus.connection import Bus
from corral.schemas.commands import command_type
from corral.schemas.envelope import CloudEvent, new_id
from corral.schemas.errors import CorralError, InvalidInput
from corral.schemas.state import (
    LIVE_STATES,
    Assignment,
    NodeStatus,
    ReplicaStatus,
    ServiceHealth,
    ServiceRecord,
    ServiceStatus,
)


class CliError(CorralError):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Outcome:
    accepted: bool
    event: CloudEvent

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.event.data or {})


async def send_command(
    bus: Bus,
    resource: str,
    name: str,
    verb: str,
    data: dict[str, Any],
    *,
    within: float,
    source: str = "corral/cli",
) -> Outcome:
    """Publish a command and wait for the api worker's accepted or rejected event."""
    names = bus.names
    command_id = new_id()
    sub = await bus.nc.subscribe(names.evt(resource, name, "*"))
    try:
        event = CloudEvent(
            id=command_id, source=source, type=command_type(resource, verb), subject=name, data=data
        )
        headers, payload = encode(event)
        await bus.js.publish(
            names.cmd(resource, name, verb), payload, headers=headers, stream=names.cmd_stream
        )
        deadline = time.monotonic() + within
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CliError(
                    f"no answer to {resource} {verb} {name} within {within:.0f}s; is the api "
                    "worker running (`corral up`)? The command stays queued and will apply "
                    "when it comes back."
                )
            try:
                msg = await sub.next_msg(timeout=remaining)
            except TimeoutError:
                continue
            if (msg.headers or {}).get(CORRELATION) != command_id:
                continue
            what = msg.subject.rsplit(".", 1)[-1]
            if what in ("accepted", "rejected"):
                return Outcome(what == "accepted", decode(msg.headers, msg.data))
    finally:
        await sub.unsubscribe()


@dataclass
class ServiceView:
    name: str
    record: ServiceRecord | None
    status: ServiceStatus | None
    assignments: list[Assignment] = field(default_factory=list)
    replicas: dict[str, ReplicaStatus] = field(default_factory=dict)
    health: ServiceHealth | None = None

    @property
    def desired(self) -> int:
        if self.record is None or self.record.deleted:
            return 0
        return self.record.spec.replicas

    @property
    def active(self) -> list[Assignment]:
        return [a for a in self.assignments if not a.draining]

    @property
    def running(self) -> int:
        ids = {a.replica for a in self.active}
        return sum(1 for r in self.replicas.values() if r.replica in ids and r.state in LIVE_STATES)

    @property
    def ready(self) -> int:
        """Active replicas that run and pass their health probe (if the spec has one)."""
        ids = {a.replica for a in self.active}
        return sum(
            1
            for r in self.replicas.values()
            if r.replica in ids and r.ready and r.state in LIVE_STATES
        )

    def rollout_failure(self, revision: int) -> str:
        """Why the rollout of `revision` failed or was rolled back, or ''."""
        record, status = self.record, self.status
        if record is not None and record.rollback_of == revision:
            restored = next(
                (r.cause for r in record.revisions if r.revision == record.revision), ""
            )
            return (
                f"the rollout of revision {revision} failed and was rolled back: revision "
                f"{record.revision} ({restored})"
            )
        rollout = status.rollout if status is not None else None
        if rollout is not None and rollout.revision == revision and rollout.state == "failed":
            return f"rollout of revision {revision} failed: {rollout.reason}"
        return ""

    @property
    def converged(self) -> bool:
        """Every desired replica runs, and nothing else of this service does."""
        if self.record is None:
            return False
        status_ok = (
            self.status is not None and self.status.observed_generation >= self.record.generation
        )
        return (
            status_ok
            and len(self.active) == self.desired
            and len(self.assignments) == self.desired
            and self.ready == self.desired
            and len(self.replicas) == self.desired
        )

    @property
    def gone(self) -> bool:
        return (
            (self.record is None or self.record.deleted)
            and not self.assignments
            and not (self.replicas)
        )

    def as_dict(self) -> dict[str, Any]:
        by_id = {a.replica: a for a in self.assignments}
        ids = sorted(set(by_id) | set(self.replicas))
        replicas = []
        for replica_id in ids:
            assignment = by_id.get(replica_id)
            status = self.replicas.get(replica_id)
            state = status.state.value if status else "pending"
            if assignment is not None and assignment.draining:
                state = "stopping"
            replicas.append(
                {
                    "id": replica_id,
                    "node": assignment.node if assignment else (status.node if status else None),
                    "state": state,
                    "generation": assignment.generation if assignment else None,
                    "pid": status.pid if status else None,
                    "ports": status.ports if status else {},
                    "ready": bool(status and status.ready),
                    "restarts": status.restarts if status else 0,
                    "message": status.message if status else "",
                    "why": assignment.reason if assignment else "",
                }
            )
        return {
            "name": self.name,
            "generation": self.record.generation if self.record else 0,
            "state": self.state,
            "desired": self.desired,
            "running": self.running,
            "ready": self.ready,
            "revision": self.record.revision if self.record else 0,
            "rollout": (
                self.status.rollout.model_dump(mode="json")
                if self.status is not None and self.status.rollout is not None
                else None
            ),
            "degraded": self.health.reason if self.health and self.health.degraded else "",
            "pending": self.status.pending if self.status else 0,
            "reason": self.status.reason if self.status else "",
            "labels": dict(self.record.spec.labels) if self.record else {},
            "replicas": replicas,
        }

    @property
    def state(self) -> str:
        if self.record is None or self.record.deleted:
            return "deleting"
        if self.status is not None and self.status.pending:
            return "pending"
        if self.health is not None and self.health.degraded:
            return "degraded"
        rollout = self.status.rollout if self.status is not None else None
        if rollout is not None and rollout.state in ("failed", "paused"):
            return f"rollout {rollout.state}"
        return "ready" if self.converged else "progressing"


async def service_views(bus: Bus, name: str | None = None) -> list[ServiceView]:
    b = bus.buckets
    services, statuses, assignments, replicas, health = await asyncio.gather(
        b.services.items(name or ">"),
        b.service_status.items(name or ">"),
        b.assignments.items(),
        b.replicas.items(f"{name}.>" if name else ">"),
        b.health.items(name or ">"),
    )
    names = set(services) | {a.value.service for a in assignments.values()}
    if name is not None:
        names &= {name}
    views = []
    for service in sorted(names):
        record = services.get(service)
        view = ServiceView(
            name=service,
            record=record.value if record else None,
            status=statuses[service].value if service in statuses else None,
            assignments=[a.value for a in assignments.values() if a.value.service == service],
            replicas={
                r.value.replica: r.value for r in replicas.values() if r.value.service == service
            },
            health=health[service].value if service in health else None,
        )
        if view.record is not None and view.record.deleted and view.gone:
            continue
        views.append(view)
    return views


async def node_views(bus: Bus) -> list[dict[str, Any]]:
    b = bus.buckets
    nodes, assignments = await asyncio.gather(b.nodes.items(), b.assignments.items())
    now = datetime.now(UTC)
    grace = bus.settings.node_grace
    out = []
    for node_id in sorted(nodes):
        node: NodeStatus = nodes[node_id].value
        mine = [a.value for a in assignments.values() if a.value.node == node_id]
        allocated: dict[str, float] = {}
        for assignment in mine:
            for resource, amount in assignment.template.resources.as_dict().items():
                allocated[resource] = allocated.get(resource, 0.0) + amount
        age = (now - node.heartbeat_at).total_seconds()
        out.append(
            {
                "id": node_id,
                "state": "ready" if age <= grace else "lost",
                "labels": node.labels,
                "capacity": node.capacity.as_dict(),
                "allocated": {k: v for k, v in allocated.items() if v},
                "drivers": node.drivers,
                "runtime": node.runtime,
                "replicas": len(mine),
                "heartbeat_age": round(age, 1),
            }
        )
    return out


def _stream_start(seq_last: int, limit: int) -> int:
    return max(1, seq_last - limit + 1)


async def read_events(
    bus: Bus, *, follow: bool, limit: int = 20, from_start: bool = False
) -> AsyncIterator[CloudEvent]:
    """Past events (the last `limit`, or all with `from_start`), then new ones if `follow`."""
    info = await bus.js.stream_info(bus.names.evt_stream)
    last = info.state.last_seq
    if from_start:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    elif limit > 0 and last > 0:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=_stream_start(last, limit),
        )
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        await queue.put(msg)

    sub = await bus.js.subscribe(
        bus.names.all_evt,
        stream=bus.names.evt_stream,
        cb=on_msg,
        ordered_consumer=True,
        config=config,
    )
    try:
        if not follow and last == 0:
            return
        while True:
            if follow:
                msg = await queue.get()
            else:
                try:
                    msg = await asyncio.wait_for(queue.get(), timeout=5.0)
                except TimeoutError:
                    return
            try:
                event = decode(msg.headers, msg.data)
            except InvalidInput:
                continue
            yield event
            if not follow and msg.metadata.sequence.stream >= last:
                return
    finally:
        await sub.unsubscribe()


async def find_command(bus: Bus, command_id: str) -> CloudEvent | None:
    """The command itself, from the command stream, by its id (best effort)."""
    info = await bus.js.stream_info(bus.names.cmd_stream)
    if info.state.messages == 0:
        return None
    sub = await bus.js.subscribe(
        bus.names.all_cmd,
        stream=bus.names.cmd_stream,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, headers_only=False),
    )
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=5.0)
            except TimeoutError:
                return None
            headers = {k.lower(): v for k, v in (msg.headers or {}).items()}
            if headers.get("ce-id") == command_id:
                try:
                    return decode(msg.headers, msg.data)
                except InvalidInput:
                    return None
            if msg.metadata.sequence.stream >= info.state.last_seq:
                return None
    finally:
        await sub.unsubscribe()


def event_json(event: CloudEvent) -> str:
    return json.dumps(structured_body(event), separators=(",", ":"), default=str)
