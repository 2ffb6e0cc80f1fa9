"""Pure: where an event from outside goes on the bus.

- A CloudEvent whose type is a Corral command, `io.corral.<resource>.<verb>` (for example
  `io.corral.service.scale`), goes to `<prefix>.cmd.<resource>.<subject>.<verb>`: its
  `subject` attribute names the service. Its data is validated here first.
- Any other `io.corral.*` type is refused: that namespace is Corral's own.
- Everything else is an external event, on `<prefix>.evt.ext.<source>.<kind>`:
  `<source>` is the integration (github, gitlab, alertmanager, a generic hook's name) or,
  for a CloudEvent posted as is, its `source` attribute as a subject token; `<kind>` is the
  event's name (push, firing) or the CloudEvent's `type` as a token. A token keeps
  `[a-z0-9_-]`: the URI scheme is dropped, other runs become `_`, and a long one is cut to 64
  characters ending in a hash of the whole, so distinct names stay distinct.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from corral.bus.names import Names
from corral.schemas.commands import COMMANDS, TYPE_PREFIX
from corral.schemas.envelope import CloudEvent
from corral.schemas.errors import FieldError, InvalidInput, field_errors_from_pydantic
from corral.schemas.pipeline import RUN_ID, PipelineSpec
from corral.schemas.rules import Rule
from corral.schemas.runs import ApplyPipeline, RunPipeline
from corral.schemas.spec import DNS_LABEL, ServiceSpec
from corral.services.gateway.auth import Scope

EXT = "ext"
MAX_TOKEN = 64
TOKEN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:(//)?")
_OTHER = re.compile(r"[^a-z0-9-]+")
_SERVICE = re.compile(DNS_LABEL)
_NAMES = {"run": (re.compile(RUN_ID), "a run id")}
"""how a command's `subject` must look, by resource; a DNS label unless listed"""
_FILTER_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
DEFAULT_FILTER = "evt.>"


def token(text: str) -> str:
    """A subject token made from any text (see the module docstring); never empty."""
    lowered = _SCHEME.sub("", text.strip().lower())
    cleaned = _OTHER.sub("_", lowered).strip("_") or "unknown"
    if not cleaned[0].isalnum():
        cleaned = f"x{cleaned}"
    if len(cleaned) <= MAX_TOKEN:
        return cleaned
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{cleaned[: MAX_TOKEN - 9].rstrip('_-')}_{digest}"


def ext_type(source: str, kind: str) -> str:
    """The CloudEvents type Corral gives a verified webhook's event."""
    return f"{TYPE_PREFIX}{EXT}.{source}.{kind}"


def ext_subject(names: Names, source: str, kind: str) -> str:
    return names.evt(EXT, source, kind)


ADMIN_COMMANDS = frozenset(
    {("service", "delete"), ("rule", "apply"), ("rule", "delete"), ("run", "approve")}
)
"""commands that need the admin scope through the gateway, as `DELETE /v1/services/{name}`
does: removing a service, changing automation, and approving a job (the approver named in the
data is taken on the token's word, so only an admin token may name one)"""


@dataclass(frozen=True)
class Route:
    subject: str
    command: bool
    """a command for the api worker (the command stream), or an event (the events stream)"""
    scope: Scope = Scope.DEPLOY
    """the scope a token needs to send it"""


def command_of(event_type: str) -> tuple[str, str] | None:
    """(resource, verb) when `event_type` is a known Corral command."""
    if not event_type.startswith(TYPE_PREFIX):
        return None
    resource, _, verb = event_type.removeprefix(TYPE_PREFIX).partition(".")
    if verb in COMMANDS.get(resource, {}):
        return resource, verb
    return None


def route(event: CloudEvent, names: Names) -> Route:
    """Where a CloudEvent posted to the gateway goes; InvalidInput says why it cannot go."""
    command = command_of(event.type)
    if command is not None:
        resource, verb = command
        name = event.subject or ""
        pattern, what = _NAMES.get(resource, (_SERVICE, "a DNS label"))
        if not pattern.match(name):
            raise InvalidInput(
                f"a {event.type} command needs `subject` set to the {resource}'s name ({what}), "
                f"not {event.subject!r}"
            )
        validate_command(resource, verb, name, event.data)
        scope = Scope.ADMIN if (resource, verb) in ADMIN_COMMANDS else Scope.DEPLOY
        return Route(names.cmd(resource, name, verb), command=True, scope=scope)
    if event.type.startswith(TYPE_PREFIX):
        known = ", ".join(
            f"{TYPE_PREFIX}{resource}.{verb}"
            for resource, verbs in COMMANDS.items()
            for verb in verbs
        )
        raise InvalidInput(
            f"type {event.type!r} is in Corral's own namespace; the ones you may send are the "
            f"commands ({known}). Give an external event a type of your own."
        )
    return Route(ext_subject(names, token(event.source), token(event.type)), command=False)


def validate_command(resource: str, verb: str, name: str, data: Any) -> None:
    """The check the api worker will make, made early so the caller hears of it at once."""
    model = COMMANDS[resource][verb]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidInput(f"data must be a JSON object, not {type(data).__name__}")
    if model is ServiceSpec:
        data = {"name": name, **data}
        if data["name"] != name:
            raise InvalidInput(f"spec name {data['name']!r} does not match the subject {name!r}")
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        errors = field_errors_from_pydantic(exc)
        raise InvalidInput(f"invalid {resource}.{verb} data", errors) from exc
    if isinstance(parsed, Rule) and parsed.name != name:
        raise InvalidInput(
            f"the subject names rule {name!r} but the rule is named {parsed.name!r}",
            [FieldError("name", f"must be {name!r}, the CloudEvent's subject")],
        )
    if isinstance(parsed, RunPipeline | ApplyPipeline) and parsed.spec is not None:
        _validate_pipeline(resource, verb, name, parsed.spec)


def _validate_pipeline(resource: str, verb: str, name: str, spec: dict[str, Any]) -> None:
    """The pipeline worker's own check of a spec sent with the command: every field, the DAG,
    and the name the subject gives."""
    try:
        pipeline = PipelineSpec.model_validate(spec)
    except ValidationError as exc:
        errors = [
            FieldError(f"spec.{e.loc}" if e.loc else "spec", e.msg)
            for e in field_errors_from_pydantic(exc)
        ]
        raise InvalidInput(f"invalid {resource}.{verb} data: pipeline spec", errors) from exc
    if pipeline.name != name:
        raise InvalidInput(
            f"the spec is named {pipeline.name!r}, but the subject names {name!r}",
            [FieldError("spec.name", f"must be {name!r}, the CloudEvent's subject")],
        )
    for job_name, job in pipeline.jobs.items():
        if isinstance(job.deploy, str):
            raise InvalidInput(
                f"job {job_name!r} deploys the file {job.deploy!r}: send the service spec itself",
                [FieldError(f"spec.jobs.{job_name}.deploy", "must be a service spec, not a file")],
            )


def subject_filter(names: Names, text: str | None) -> str:
    """A NATS subject filter for events, given under the prefix (`evt.service.web.*`) or with
    it; `*` matches one token and a final `>` the rest."""
    wanted = (text or DEFAULT_FILTER).strip()
    if wanted.startswith(f"{names.prefix}."):
        wanted = wanted[len(names.prefix) + 1 :]
    tokens = wanted.split(".")
    if len(wanted) > 256 or len(tokens) > 16:
        raise InvalidInput("subject filter is too long")
    if tokens[0] != "evt":
        raise InvalidInput(f"subject filter {text!r} must start with `evt.` (events only)")
    for position, part in enumerate(tokens):
        last = position == len(tokens) - 1
        if part == "*" or (part == ">" and last):
            continue
        if not _FILTER_TOKEN.match(part):
            raise InvalidInput(
                f"subject filter {text!r}: token {part!r} must be letters, digits, '_' or '-', "
                "or a wildcard (`*`, or `>` at the end)"
            )
    if len(tokens) == 1:
        tokens.append(">")
    return ".".join([names.prefix, *tokens])


def type_matches(pattern: str | None, event_type: str) -> bool:
    """A glob on the type, with or without the `io.corral.` prefix (`service.*`)."""
    if not pattern:
        return True
    return fnmatch.fnmatchcase(event_type, pattern) or fnmatch.fnmatchcase(
        event_type.removeprefix(TYPE_PREFIX), pattern
    )
