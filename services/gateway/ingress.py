"""`POST /v1/cloudevents`: CloudEvents over HTTP, binary mode (`ce-*` headers) or structured
mode (`application/cloudevents+json`, or a batch as `application/cloudevents-batch+json`).
A command type goes to the command stream, anything else to `evt.ext.…` (see `routing`);
the event id is the `Nats-Msg-Id`, so a re-sent event is answered `duplicate: true`."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from corral.bus.codec import STRUCTURED, decode
from corral.schemas.envelope import CloudEvent, utcnow
from corral.schemas.errors import FieldError, InvalidInput
from corral.services.gateway.auth import Principal, Scope
from corral.services.gateway.errors import ApiError
from corral.services.gateway.publishing import Published
from corral.services.gateway.routing import Route, route
from corral.services.gateway.state import Gateway, gateway, require

router = APIRouter(tags=["ingress"])
BATCH = "application/cloudevents-batch+json"
MAX_BATCH = 1000
_ATTRIBUTES = {
    "type": "object",
    "required": ["specversion", "id", "source", "type"],
    "properties": {
        "specversion": {"type": "string", "enum": ["1.0"]},
        "id": {"type": "string", "minLength": 1},
        "source": {"type": "string", "minLength": 1},
        "type": {"type": "string", "minLength": 1},
        "subject": {"type": "string"},
        "time": {"type": "string", "format": "date-time"},
        "datacontenttype": {"type": "string"},
        "data": {},
    },
}
OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            STRUCTURED: {"schema": _ATTRIBUTES},
            BATCH: {"schema": {"type": "array", "items": _ATTRIBUTES, "maxItems": MAX_BATCH}},
            "application/json": {
                "schema": {"description": "binary mode: the data; attributes in ce-* headers"}
            },
        },
    },
    "parameters": [
        {"name": f"ce-{name}", "in": "header", "required": False, "schema": {"type": "string"}}
        for name in ("id", "source", "type", "specversion", "subject", "time")
    ],
}


class PublishedEvent(BaseModel):
    id: str
    subject: str
    duplicate: bool


class PublishedEvents(BaseModel):
    events: list[PublishedEvent]


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _batch(body: bytes) -> list[CloudEvent]:
    try:
        items = json.loads(body)
    except ValueError as exc:
        raise InvalidInput(f"the batch is not valid JSON: {exc}") from exc
    if not isinstance(items, list):
        raise InvalidInput("a CloudEvents batch is a JSON array of structured events")
    if len(items) > MAX_BATCH:
        raise InvalidInput(f"a batch holds at most {MAX_BATCH} events")
    events = []
    for position, item in enumerate(items):
        try:
            events.append(decode({"content-type": STRUCTURED}, json.dumps(item).encode()))
        except InvalidInput as exc:
            errors = [FieldError(f"{position}.{e.loc}".rstrip("."), e.msg) for e in exc.errors]
            raise InvalidInput(f"event {position}: {exc.reason}", errors) from exc
    return events


async def _publish(gw: Gateway, event: CloudEvent, where: Route) -> Published:
    if event.time is None:
        event = event.model_copy(update={"time": utcnow()})
    return await gw.publisher.publish(
        where.subject, event, command=where.command, source="cloudevents"
    )


@router.post(
    "/v1/cloudevents",
    summary="Publish CloudEvents (binary or structured mode, or a batch)",
    status_code=202,
    openapi_extra=OPENAPI,
    response_model=PublishedEvent | PublishedEvents,
)
async def cloudevents(
    request: Request, principal: Annotated[Principal, Depends(require(Scope.DEPLOY))]
) -> Any:
    gw = gateway(request)
    body = await request.body()
    media = _media(request)
    try:
        events = _batch(body) if media == BATCH else [decode(dict(request.headers), body)]
        routes = [route(event, gw.bus.names) for event in events]
    except InvalidInput as exc:
        raise ApiError.invalid(exc) from None
    for event, where in zip(events, routes, strict=True):
        if not principal.allows(where.scope):  # nothing of the batch is published
            raise ApiError(
                403,
                f"token {principal.name!r} has scope {principal.scope.label}; {event.type} "
                f"needs {where.scope.label}",
                headers={
                    "WWW-Authenticate": f'Bearer error="insufficient_scope" '
                    f'scope="{where.scope.label}"'
                },
            )
    published = [await _publish(gw, e, r) for e, r in zip(events, routes, strict=True)]
    results = [PublishedEvent(id=p.id, subject=p.subject, duplicate=p.duplicate) for p in published]
    if media == BATCH:
        return JSONResponse(PublishedEvents(events=results).model_dump(), status_code=202)
    return JSONResponse(results[0].model_dump(), status_code=202)
