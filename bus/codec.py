"""CloudEvents on NATS: binary mode (attributes in `ce-*` headers, data as the payload) for
everything Corral publishes; binary or structured mode (`application/cloudevents+json`)
accepted from anyone else."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from corral.schemas.envelope import CloudEvent
from corral.schemas.errors import InvalidInput, field_errors_from_pydantic

STRUCTURED = "application/cloudevents+json"
JSON = "application/json"
CORRELATION = "corral-correlation"
MSG_ID = "Nats-Msg-Id"
_REQUIRED = ("id", "source", "type", "specversion")


def _dump_data(data: Any) -> bytes:
    if data is None:
        return b""
    if isinstance(data, BaseModel):
        return data.model_dump_json().encode()
    if isinstance(data, bytes):
        return data
    return json.dumps(data, default=str, separators=(",", ":")).encode()


def encode(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Binary mode: headers and payload, with `Nats-Msg-Id` = `ce-id` for deduplication."""
    headers = {
        "ce-id": event.id,
        "ce-source": event.source,
        "ce-type": event.type,
        "ce-specversion": event.specversion,
        MSG_ID: event.id,
    }
    if event.subject is not None:
        headers["ce-subject"] = event.subject
    if event.time is not None:
        headers["ce-time"] = event.time.isoformat()
    if event.datacontenttype:
        headers["content-type"] = event.datacontenttype
    if event.correlation:
        headers[CORRELATION] = event.correlation
    if event.traceparent:
        headers["traceparent"] = event.traceparent
    return headers, _dump_data(event.data)


def structured_body(event: CloudEvent) -> dict[str, Any]:
    """The structured-mode JSON object of an event, the form `decode` reads back;
    `corralcorrelation` is the extension that carries the correlation."""
    body: dict[str, Any] = {
        "specversion": event.specversion,
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "subject": event.subject,
        "time": event.time.isoformat() if event.time else None,
        "datacontenttype": event.datacontenttype,
        "data": event.data,
    }
    if event.correlation:
        body["corralcorrelation"] = event.correlation
    return body


def _invalid(reason: str, exc: ValidationError | None = None) -> InvalidInput:
    errors = field_errors_from_pydantic(exc) if exc is not None else []
    return InvalidInput(reason, errors)


def decode(headers: dict[str, str] | None, payload: bytes) -> CloudEvent:
    """Read a CloudEvent in either mode; raise InvalidInput with a clear reason."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    content_type = headers.get("content-type", "")
    if content_type.split(";")[0].strip() == STRUCTURED:
        return _decode_structured(payload, headers)
    missing = [f"ce-{name}" for name in _REQUIRED if f"ce-{name}" not in headers]
    if missing:
        raise InvalidInput(
            "not a CloudEvent: missing header(s) "
            + ", ".join(missing)
            + f" (or send content-type {STRUCTURED})"
        )
    data: Any = None
    if payload:
        if content_type and "json" not in content_type:
            raise InvalidInput(f"unsupported content-type {content_type!r}; send {JSON}")
        try:
            data = json.loads(payload)
        except ValueError as exc:
            raise InvalidInput(f"data is not valid JSON: {exc}") from exc
    time: datetime | None = None
    try:
        if "ce-time" in headers:
            time = datetime.fromisoformat(headers["ce-time"].replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInput(f"ce-time is not an RFC 3339 time: {headers['ce-time']!r}") from exc
    try:
        return CloudEvent(
            id=headers["ce-id"],
            source=headers["ce-source"],
            type=headers["ce-type"],
            specversion=headers["ce-specversion"],
            subject=headers.get("ce-subject"),
            time=time,
            datacontenttype=content_type or JSON,
            data=data,
            correlation=headers.get(CORRELATION),
            traceparent=headers.get("traceparent"),
        )
    except ValidationError as exc:
        raise _invalid("invalid CloudEvent attributes", exc) from exc


def _decode_structured(payload: bytes, headers: dict[str, str]) -> CloudEvent:
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise InvalidInput(f"structured CloudEvent is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidInput("structured CloudEvent must be a JSON object")
    missing = [name for name in _REQUIRED if name not in body]
    if missing:
        raise InvalidInput("structured CloudEvent lacks attribute(s) " + ", ".join(missing))
    if "data_base64" in body and "data" not in body:
        try:
            raw = base64.b64decode(body.pop("data_base64"), validate=True)
            body["data"] = json.loads(raw) if raw else None
        except ValueError as exc:
            raise InvalidInput(f"data_base64 does not hold base64-encoded JSON: {exc}") from exc
    body.setdefault("correlation", body.pop("corralcorrelation", None) or headers.get(CORRELATION))
    known = set(CloudEvent.model_fields)
    try:
        return CloudEvent.model_validate({k: v for k, v in body.items() if k in known})
    except ValidationError as exc:
        raise _invalid("invalid CloudEvent attributes", exc) from exc
