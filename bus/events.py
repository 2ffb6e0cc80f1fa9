"""Publishing events: each one a binary-mode CloudEvent on the events stream, deduplicated on
its id, carrying the correlation id of the command that started the chain."""

from __future__ import annotations

from pydantic import BaseModel

from corral.bus.codec import encode
from corral.bus.connection import Bus
from corral.schemas.envelope import CloudEvent
from corral.schemas.events import event_type


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
        await self.bus.js.publish(
            subject, payload, headers=headers, stream=self.bus.names.evt_stream
        )
        return event
