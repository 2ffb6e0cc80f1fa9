"""`GET /v1/events/stream`: live events as server-sent events. Each is a structured CloudEvent
on one `data:` line, with `id:` (the event id) and `event:` (its type). The stream ends when
the client goes away or the gateway stops; a comment line every few seconds keeps proxies
from closing an idle one."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from nats.aio.msg import Msg

from corral.bus.codec import decode, structured_body
from corral.bus.lifecycle import unsubscribe_quietly
from corral.schemas.envelope import CloudEvent
from corral.schemas.errors import InvalidInput
from corral.services.gateway.auth import Principal, Scope
from corral.services.gateway.errors import ApiError
from corral.services.gateway.routing import subject_filter, type_matches
from corral.services.gateway.state import Gateway, gateway, require

log = logging.getLogger(__name__)
router = APIRouter(tags=["events"])
QUEUE = 1000


def sse(event: CloudEvent) -> bytes:
    def line(text: str) -> str:
        return text.replace("\r", " ").replace("\n", " ")

    body = json.dumps(structured_body(event), separators=(",", ":"), default=str)
    return f"id: {line(event.id)}\nevent: {line(event.type)}\ndata: {body}\n\n".encode()


async def _events(gw: Gateway, subject: str, type_glob: str | None) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[Msg | None] = asyncio.Queue(QUEUE)
    dropped = 0

    async def on_msg(msg: Msg) -> None:
        nonlocal dropped
        try:
            queue.put_nowait(msg)
        except asyncio.QueueFull:
            dropped += 1

    sub = await gw.bus.nc.subscribe(subject, cb=on_msg)
    gw.streams.add(queue)
    gw.metrics.streams.inc()
    try:
        yield b": stream of " + subject.encode() + b"\n\n"
        while not gw.stopping.is_set():
            try:
                msg = await asyncio.wait_for(queue.get(), gw.keepalive)
            except TimeoutError:
                # a client that left is noticed by the server (or by this write failing)
                yield b": keepalive\n\n"
                continue
            if msg is None or gw.stopping.is_set():
                return
            if dropped:
                yield f"event: dropped\ndata: {json.dumps({'dropped': dropped})}\n\n".encode()
                dropped = 0
            try:
                event = decode(msg.headers, msg.data)
            except InvalidInput:
                continue
            if type_matches(type_glob, event.type):
                yield sse(event)
    finally:
        gw.streams.discard(queue)
        gw.metrics.streams.dec()
        # a client that went away cancels this generator; the unsubscribe must still happen
        with anyio.CancelScope(shield=True):
            await unsubscribe_quietly(sub)


@router.get(
    "/v1/events/stream",
    summary="Follow live events (server-sent events)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "an event stream"}},
)
async def stream_events(
    request: Request,
    _: Annotated[Principal, Depends(require(Scope.READ))],
    subject: Annotated[
        str | None,
        Query(description="a NATS subject filter under the prefix, e.g. `evt.service.web.*`"),
    ] = None,
    type: Annotated[
        str | None, Query(description="a glob on the type, e.g. `*.rejected`", max_length=256)
    ] = None,
) -> StreamingResponse:
    gw = gateway(request)
    try:
        wanted = subject_filter(gw.bus.names, subject)
    except InvalidInput as exc:
        raise ApiError.invalid(exc) from None
    return StreamingResponse(
        _events(gw, wanted, type),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
