"""Reading the event log: the most recent events matching a subject filter and a type glob,
from the events stream, through a short-lived consumer that JetStream filters for us."""

from __future__ import annotations

import contextlib
from collections import deque

from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from corral.bus.codec import decode
from corral.bus.connection import Bus
from corral.schemas.envelope import CloudEvent, new_id
from corral.schemas.errors import InvalidInput
from corral.services.gateway.routing import type_matches

FETCH = 500


async def recent_events(
    bus: Bus, subject: str, type_glob: str | None, *, limit: int, scan: int
) -> list[CloudEvent]:
    """The last `limit` events on `subject` (a filter) whose type matches, oldest first,
    among the last `scan` messages of the stream."""
    js = bus.js
    stream = bus.names.evt_stream
    info = await js.stream_info(stream)
    last = info.state.last_seq
    if info.state.messages == 0 or last == 0:
        return []
    name = f"gateway-read-{new_id()}"
    config = ConsumerConfig(
        name=name,
        filter_subject=subject,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, last - scan + 1),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
    )
    created = await js.add_consumer(stream, config=config)
    found: deque[CloudEvent] = deque(maxlen=limit)
    try:
        remaining = created.num_pending or 0
        if remaining == 0:
            return []
        sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
        try:
            while remaining > 0:
                try:
                    msgs = await sub.fetch(min(FETCH, remaining), timeout=5.0)
                except TimeoutError:
                    break
                for msg in msgs:
                    remaining = min(remaining - 1, msg.metadata.num_pending)
                    try:
                        event = decode(msg.headers, msg.data)
                    except InvalidInput:
                        continue
                    if type_matches(type_glob, event.type):
                        found.append(event)
        finally:
            await sub.unsubscribe()
    finally:
        with contextlib.suppress(NatsError, TimeoutError):
            await js.delete_consumer(stream, name)
    return list(found)
