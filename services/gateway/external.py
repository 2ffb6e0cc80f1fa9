"""Pure: a verified webhook's payload → the CloudEvents Corral publishes for it.

Every event lands on `<prefix>.evt.ext.<source>.<kind>` with type
`io.corral.ext.<source>.<kind>` (see `routing`), and an id that makes a re-sent delivery a
duplicate JetStream drops:

- github: kind `X-GitHub-Event` (push, pull_request, workflow_run, ping, ...), id
  `github-<X-GitHub-Delivery>`, subject attribute the repository's full name;
- gitlab: kind the payload's `object_kind` (push, merge_request, pipeline, ...), id
  `gitlab-<X-Gitlab-Event-UUID>`, subject the project's path;
- alertmanager: one event per alert, kind its status (firing, resolved), id
  `alertmanager-<hash of groupKey, fingerprint, status>`, subject its `alertname`;
- a generic hook: source its name, kind `X-Corral-Event` (else `received`), id
  `hook-<name>-<X-Corral-Delivery>`, subject the hook's name.

Without a delivery id, the id is a hash of the body, so a retry of the same body within the
deduplication window is still dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral.bus.names import Names
from corral.schemas.envelope import CloudEvent
from corral.schemas.errors import InvalidInput, field_errors_from_pydantic
from corral.services.gateway.routing import TOKEN, ext_subject, ext_type, token

GITHUB = "github"
GITLAB = "gitlab"
ALERTMANAGER = "alertmanager"
RESERVED = frozenset({GITHUB, GITLAB, ALERTMANAGER})
DEFAULT_KIND = "received"
_DELIVERY = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")


@dataclass(frozen=True)
class Outgoing:
    """One event to publish, and where."""

    subject: str
    event: CloudEvent


def _body_hash(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _event_id(source: str, delivery: str | None, body: bytes) -> str:
    if delivery and _DELIVERY.match(delivery):
        return f"{source}-{delivery}"
    return f"{source}-{_body_hash(source.encode(), body)}"


def _kind(raw: str | None, what: str) -> str:
    if raw is None or not raw.strip():
        raise InvalidInput(f"missing {what}")
    kind = token(raw)
    if not TOKEN.match(kind):
        raise InvalidInput(f"{what} {raw!r} is not a usable event name")
    return kind


def json_body(body: bytes, content_type: str = "") -> Any:
    """The JSON of a webhook body; a form-encoded `payload=` field (GitHub's other content
    type) works too."""
    media = content_type.split(";")[0].strip().lower()
    text = body
    if media == "application/x-www-form-urlencoded":
        fields = parse_qs(body.decode("utf-8", errors="replace"))
        if "payload" not in fields:
            raise InvalidInput("a form-encoded webhook needs a `payload` field")
        text = fields["payload"][0].encode()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from exc


def _string_at(payload: Any, *path: str) -> str | None:
    for key in path:
        if not isinstance(payload, dict):
            return None
        payload = payload.get(key)
    return payload if isinstance(payload, str) and payload else None


def _outgoing(
    names: Names, source: str, kind: str, event_id: str, origin: str, subject: str | None, data: Any
) -> Outgoing:
    event = CloudEvent(
        id=event_id, source=origin, type=ext_type(source, kind), subject=subject, data=data
    )
    return Outgoing(ext_subject(names, source, kind), event)


def github(
    names: Names, event_name: str | None, delivery: str | None, body: bytes, payload: Any
) -> Outgoing:
    kind = _kind(event_name, "X-GitHub-Event header")
    origin = _string_at(payload, "repository", "html_url") or "https://github.com"
    subject = _string_at(payload, "repository", "full_name")
    return _outgoing(
        names, GITHUB, kind, _event_id(GITHUB, delivery, body), origin, subject, payload
    )


def gitlab(
    names: Names, event_header: str | None, delivery: str | None, body: bytes, payload: Any
) -> Outgoing:
    object_kind = _string_at(payload, "object_kind") or _string_at(payload, "event_name")
    if object_kind is None and event_header:
        object_kind = event_header.removesuffix(" Hook")
    kind = _kind(object_kind, "X-Gitlab-Event header (or the payload's object_kind)")
    origin = _string_at(payload, "project", "web_url") or "gitlab"
    subject = _string_at(payload, "project", "path_with_namespace")
    return _outgoing(
        names, GITLAB, kind, _event_id(GITLAB, delivery, body), origin, subject, payload
    )


def hook(
    names: Names, name: str, event_name: str | None, delivery: str | None, body: bytes, payload: Any
) -> Outgoing:
    kind = _kind(event_name or DEFAULT_KIND, "X-Corral-Event header")
    source = f"hook-{name}"
    return _outgoing(
        names, name, kind, _event_id(source, delivery, body), f"/v1/hooks/{name}", name, payload
    )


class Alert(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str = Field(pattern=r"^(firing|resolved)$")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: str | None = None
    endsAt: str | None = None
    generatorURL: str | None = None
    fingerprint: str | None = None


class AlertmanagerPayload(BaseModel):
    """Alertmanager's webhook payload, version 4."""

    model_config = ConfigDict(extra="allow")

    version: str = Field(pattern=r"^4$")
    groupKey: str
    truncatedAlerts: int = 0
    status: str = Field(pattern=r"^(firing|resolved)$")
    receiver: str = ""
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str = ""
    alerts: list[Alert] = Field(max_length=10_000)


def alert_fingerprint(alert: Alert) -> str:
    """Alertmanager's fingerprint, or (from an older sender) a hash of the sorted labels."""
    if alert.fingerprint:
        return alert.fingerprint
    return _body_hash(json.dumps(alert.labels, sort_keys=True).encode())[:16]


def alert_event_id(group_key: str, fingerprint: str, status: str) -> str:
    return f"{ALERTMANAGER}-{_body_hash(group_key.encode(), fingerprint.encode(), status.encode())}"


def alertmanager(names: Names, payload: Any) -> list[Outgoing]:
    """One event per alert, deduplicated on groupKey + fingerprint + status."""
    try:
        parsed = AlertmanagerPayload.model_validate(payload)
    except ValidationError as exc:
        raise InvalidInput(
            "not an Alertmanager v4 webhook payload", field_errors_from_pydantic(exc)
        ) from exc
    out = []
    origin = parsed.externalURL or ALERTMANAGER
    for alert in parsed.alerts:
        fingerprint = alert_fingerprint(alert)
        data = {
            **alert.model_dump(mode="json"),
            "fingerprint": fingerprint,
            "receiver": parsed.receiver,
            "groupKey": parsed.groupKey,
            "groupLabels": parsed.groupLabels,
            "externalURL": parsed.externalURL,
        }
        out.append(
            _outgoing(
                names,
                ALERTMANAGER,
                alert.status,
                alert_event_id(parsed.groupKey, fingerprint, alert.status),
                origin,
                alert.labels.get("alertname"),
                data,
            )
        )
    return out
