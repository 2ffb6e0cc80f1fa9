"""Putting events and commands on the bus: binary-mode CloudEvents with `Nats-Msg-Id` = the
event id (so JetStream drops a re-sent one and says so), and, when the caller waits, the api
worker's answer to a command."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from nats.errors import Error as NatsError

from corral.bus.codec import CORRELATION, decode, encode
from corral.bus.connection import Bus
from corral.schemas.commands import command_type
from corral.schemas.envelope import CloudEvent, new_id
from corral.schemas.errors import InvalidInput
from corral.services.gateway.errors import ApiError
from corral.services.gateway.metrics import GatewayMetrics

PUBLISH_TIMEOUT = 5.0
# a rejected command's code -> the HTTP status the caller gets
REJECTED_STATUS = {"invalid": 422, "not_found": 404, "unknown": 400, "error": 502}


@dataclass(frozen=True)
class Published:
    id: str
    subject: str
    duplicate: bool


@dataclass(frozen=True)
class Answer:
    accepted: bool
    event: CloudEvent

    @property
    def data(self) -> dict[str, Any]:
        data = self.event.data
        return dict(data) if isinstance(data, dict) else {}


class Publisher:
    def __init__(self, bus: Bus, metrics: GatewayMetrics) -> None:
        self.bus = bus
        self.metrics = metrics

    async def publish(
        self, subject: str, event: CloudEvent, *, command: bool, source: str
    ) -> Published:
        headers, payload = encode(event)
        limit = self.bus.nc.max_payload
        if limit and len(payload) + sum(len(k) + len(v) + 4 for k, v in headers.items()) > limit:
            raise ApiError(
                413,
                f"the event is larger than the bus takes ({limit} bytes); send a reference to "
                "the data instead of the data",
                code="too_large",
            )
        names = self.bus.names
        stream = names.cmd_stream if command else names.evt_stream
        try:
            ack = await self.bus.js.publish(
                subject, payload, headers=headers, stream=stream, timeout=PUBLISH_TIMEOUT
            )
        except (NatsError, TimeoutError) as exc:
            raise ApiError(
                503, f"the bus did not take the event ({exc.__class__.__name__}); try again"
            ) from None
        duplicate = bool(ack.duplicate)
        if command:
            self.metrics.commands.labels(event.type.rsplit(".", 1)[-1], "published").inc()
        else:
            self.metrics.events.labels(source, str(duplicate).lower()).inc()
        return Published(event.id, subject, duplicate)

    async def command(
        self,
        resource: str,
        name: str,
        verb: str,
        data: dict[str, Any],
        *,
        source: str,
        wait: float | None,
    ) -> tuple[Published, Answer | None]:
        """Send a command; with `wait` (seconds), also the api worker's accepted or rejected
        event. The subscription starts before the publish, so the answer cannot be missed."""
        names = self.bus.names
        event = CloudEvent(
            id=new_id(), source=source, type=command_type(resource, verb), subject=name, data=data
        )
        subject = names.cmd(resource, name, verb)
        if wait is None:
            return await self.publish(subject, event, command=True, source=source), None
        sub = await self.bus.nc.subscribe(names.evt(resource, name, "*"))
        try:
            published = await self.publish(subject, event, command=True, source=source)
            deadline = time.monotonic() + wait
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=remaining)
                except TimeoutError:
                    break
                if (msg.headers or {}).get(CORRELATION) != event.id:
                    continue
                what = msg.subject.rsplit(".", 1)[-1]
                if what not in ("accepted", "rejected"):
                    continue
                try:
                    answer = Answer(what == "accepted", decode(msg.headers, msg.data))
                except InvalidInput:
                    continue
                self.metrics.commands.labels(
                    verb, "accepted" if answer.accepted else "rejected"
                ).inc()
                return published, answer
            self.metrics.commands.labels(verb, "timeout").inc()
            raise ApiError(
                504,
                f"no answer to {resource} {verb} {name} within {wait:g} s; the command stays "
                "queued and applies when the api worker runs",
                command_id=event.id,
                subject=subject,
            )
        finally:
            await sub.unsubscribe()
