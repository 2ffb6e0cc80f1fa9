"""Publishing events: each one a binary-mode CloudEvent on the events stream, deduplicated on
its id, carrying the correlation id of the command that started the chain."""

from __future__ import annotations

import hashlib

from pydantic import BaseModel

from corral.bus.codec import encode
from corral.bus.connection import Bus
from corral.schemas.commands import command_type
from corral.schemas.envelope import CloudEvent
from corral.schemas.events import event_type

EXPECTED_STREAM = "Nats-Expected-Stream"


class Emitter:
    def __init__(self, bus: Bus, source: str) -> None:
        self.bus = bus
        self.source = source

    def build(
        self,
        resource: str,
        name: str,
        what: str,
        data: BaseModel,
        *,
        correlation: str | None = None,
        event_id: str | None = None,
    ) -> tuple[str, CloudEvent]:
        subject = self.bus.names.evt(resource, name, what)
        event = CloudEvent(
            source=self.source,
            type=event_type(resource, what),
            subject=name,
            data=data,
            correlation=correlation,
            **({"id": event_id} if event_id else {}),
        )
        return subject, event

    async def emit(
        self,
        resource: str,
        name: str,
        what: str,
        data: BaseModel,
        *,
        correlation: str | None = None,
        event_id: str | None = None,
    ) -> CloudEvent:
        subject, event = self.build(
            resource, name, what, data, correlation=correlation, event_id=event_id
        )
        headers, payload = encode(event)
        headers[EXPECTED_STREAM] = self.bus.names.evt_stream
        await self.bus.acks.publish(subject, payload, headers)
        return event

    async def command(
        self,
        resource: str,
        name: str,
        verb: str,
        data: BaseModel,
        *,
        command_id: str,
        correlation: str | None = None,
    ) -> CloudEvent:
        """Send a command like any other caller: onto the command stream, for the api worker.
        A worker that acts on its own (an automatic rollback, the autoscaler) gives it an id
        derived from what caused it, so that sending it twice is deduplicated, and an id of
        the form `<cause>.<what>` lets `events --trace <cause>` follow the chain."""
        event = CloudEvent(
            id=command_id,
            source=self.source,
            type=command_type(resource, verb),
            subject=name,
            data=data,
            correlation=correlation,
        )
        headers, payload = encode(event)
        await self.bus.js.publish(
            self.bus.names.cmd(resource, name, verb),
            payload,
            headers=headers,
            stream=self.bus.names.cmd_stream,
        )
        return event


ACCEPTED = ".accepted"
MAX_EVENT_ID = 256
"""CloudEvents ids here are at most 256 characters (schemas.envelope.CloudEvent.id)"""


def accepted_id(command_id: str) -> str:
    """The id of a command's first `accepted` answer: the command's, plus `.accepted`, so that a
    redelivered command's answer is deduplicated. A command id too long to take the suffix
    within 256 characters is replaced by its SHA-256, so that the id still stays fixed."""
    if len(command_id) + len(ACCEPTED) <= MAX_EVENT_ID:
        return command_id + ACCEPTED
    return hashlib.sha256(command_id.encode()).hexdigest() + ACCEPTED
