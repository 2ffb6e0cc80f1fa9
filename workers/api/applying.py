"""Pure: what a command does to a service's desired state."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from corral.schemas.commands import (
    COMMANDS,
    OWNERS,
    RollbackCommand,
    ScaleCommand,
    command_type,
)
from corral.schemas.envelope import CloudEvent
from corral.schemas.errors import (
    InvalidInput,
    NotFound,
    RejectedError,
    UnknownCommand,
    field_errors_from_pydantic,
)
from corral.schemas.spec import ServiceSpec
from corral.schemas.state import MAX_REVISIONS, Revision, ServiceRecord, Template


@dataclass(frozen=True)
class Command:
    resource: str
    name: str
    verb: str
    id: str
    data: BaseModel


RECENT_COMMANDS = 64
"""how many applied command ids a service record remembers, to spot a command sent twice"""


@dataclass(frozen=True)
class Outcome:
    """`record` is what to write; a delete writes a tombstone, so that the deployer can
    tell the removal (and the command behind it) from a key it never saw."""

    record: ServiceRecord
    changed: bool


def parse_command(resource: str, name: str, verb: str, event: CloudEvent) -> Command:
    # COMMANDS lists every command on the bus; this worker applies only its own resources
    ours = sorted(r for r in COMMANDS if OWNERS.get(r) == "api")
    verbs = COMMANDS.get(resource) if resource in ours else None
    if verbs is None:
        raise UnknownCommand(f"unknown resource {resource!r}; known: {', '.join(ours)}")
    model = verbs.get(verb)
    if model is None:
        raise UnknownCommand(
            f"unknown command {resource}.{verb}; known: {', '.join(sorted(verbs))}"
        )
    expected = command_type(resource, verb)
    if event.type != expected:
        raise InvalidInput(
            f"ce-type {event.type!r} does not match the subject; expected {expected!r}"
        )
    data: Any = event.data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidInput(f"data must be a JSON object, not {type(data).__name__}")
    if model is ServiceSpec:
        data = {"name": name, **data}
        if data["name"] != name:
            raise InvalidInput(
                f"spec name {data['name']!r} does not match the subject's name {name!r}"
            )
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        errors = field_errors_from_pydantic(exc)
        summary = "; ".join(str(e) for e in errors[:5])
        raise InvalidInput(f"invalid {resource}.{verb} data: {summary}", errors) from exc
    return Command(resource, name, verb, event.id, parsed)


def apply(command: Command, current: ServiceRecord | None, now: datetime) -> Outcome:
    """Decide the new desired state. Raises NotFound for any verb but deploy on nothing, and
    InvalidInput for a rollback or promote that cannot be done."""
    data = command.data
    if command.verb == "deploy":
        assert isinstance(data, ServiceSpec)
        return _deploy(command, data, current, now)
    live = current if current is not None and not current.deleted else None
    if live is None:
        raise NotFound(f"service {command.name!r} not found")
    if command.verb == "scale":
        assert isinstance(data, ScaleCommand)
        if live.spec.replicas == data.replicas:
            return Outcome(live, changed=False)
        spec = live.spec.model_copy(update={"replicas": data.replicas})
        # a scale without a preference clears an older one: it described other replicas' load
        prefer = list(data.prefer_remove) if data.replicas < live.spec.replicas else []
        pins = list(data.place_on) if data.replicas > live.spec.replicas else []
        return Outcome(
            _next(command, live, now, spec=spec, prefer_remove=prefer, place_on=pins),
            changed=True,
        )
    if command.verb == "delete":
        return Outcome(_next(command, live, now, deleted=True), changed=True)
    if command.verb == "rollback":
        assert isinstance(data, RollbackCommand)
        return _rollback(command, data, live, now)
    if command.verb == "promote":
        return _promote(command, live, now)
    raise UnknownCommand(f"unknown command {command.resource}.{command.verb}")


def history(record: ServiceRecord) -> list[Revision]:
    """The record's revisions, oldest first. A record written before revisions were kept
    counts its spec as its one revision."""
    if record.revisions:
        return list(record.revisions)
    return [
        Revision(
            revision=record.revision,
            spec=record.spec,
            created_at=record.updated_at,
            command_id=record.command_id,
        )
    ]


def latest_revision(record: ServiceRecord) -> int:
    """The highest revision number the service has used; numbers are never reused."""
    return max([record.revision, *(entry.revision for entry in record.revisions)])


def _next(command: Command, record: ServiceRecord, now: datetime, **changes: Any) -> ServiceRecord:
    """`record` as changed by `command`: the next generation, which remembers the command."""
    return record.model_copy(
        update={
            "generation": record.generation + 1,
            "command_id": command.id,
            "updated_at": now,
            "recent_commands": [*record.recent_commands, command.id][-RECENT_COMMANDS:],
            "place_on": [],  # pins belong to the scale that set them, not to what follows
            **changes,
        }
    )


def _deploy(
    command: Command, spec: ServiceSpec, current: ServiceRecord | None, now: datetime
) -> Outcome:
    if current is None:
        first = Revision(revision=1, spec=spec, created_at=now, command_id=command.id)
        record = ServiceRecord(
            spec=spec,
            generation=1,
            command_id=command.id,
            updated_at=now,
            revisions=[first],
            recent_commands=[command.id],
        )
        return Outcome(record, changed=True)
    if current.deleted:
        # a revived service starts a new revision even with the old spec: numbers never repeat
        return Outcome(_new_revision(command, current, spec, now, cause="deploy"), changed=True)
    return _change_spec(command, current, spec, now, cause="deploy", rollback_of=0)


def _change_spec(
    command: Command,
    live: ServiceRecord,
    spec: ServiceSpec,
    now: datetime,
    *,
    cause: str,
    rollback_of: int,
) -> Outcome:
    """A new revision when the runtime template changes; otherwise the current revision
    takes the new spec in place (replicas, labels, placement, update policy)."""
    if spec == live.spec:
        return Outcome(live, changed=False)
    if Template.from_spec(spec) != Template.from_spec(live.spec):
        record = _new_revision(command, live, spec, now, cause=cause, rollback_of=rollback_of)
        return Outcome(record, changed=True)
    revisions = [
        entry.model_copy(update={"spec": spec}) if entry.revision == live.revision else entry
        for entry in history(live)
    ]
    return Outcome(_next(command, live, now, spec=spec, revisions=revisions), changed=True)


def _new_revision(
    command: Command,
    record: ServiceRecord,
    spec: ServiceSpec,
    now: datetime,
    *,
    cause: str,
    rollback_of: int = 0,
) -> ServiceRecord:
    number = latest_revision(record) + 1
    entry = Revision(revision=number, spec=spec, created_at=now, command_id=command.id, cause=cause)
    return _next(
        command,
        record,
        now,
        spec=spec,
        deleted=False,
        revision=number,
        revisions=[*history(record), entry][-MAX_REVISIONS:],
        rollback_of=rollback_of,
    )


def _rollback(
    command: Command, data: RollbackCommand, live: ServiceRecord, now: datetime
) -> Outcome:
    name = command.name
    if data.expected_revision is not None and data.expected_revision != live.revision:
        raise InvalidInput(
            f"service {name!r} is at revision {live.revision} now, not "
            f"{data.expected_revision}; nothing rolled back"
        )
    if data.to_revision == live.revision:
        return Outcome(live, changed=False)
    revisions = history(live)
    if data.to_revision is None:
        earlier = [entry for entry in revisions if entry.revision < live.revision]
        if not earlier:
            raise InvalidInput(f"service {name!r} has no earlier revision to roll back to")
        target = earlier[-1]
    else:
        found = [entry for entry in revisions if entry.revision == data.to_revision]
        if not found:
            known = ", ".join(str(entry.revision) for entry in revisions)
            raise NotFound(
                f"service {name!r} has no revision {data.to_revision}; known revisions: {known}"
            )
        target = found[0]
    spec = target.spec.model_copy(update={"replicas": live.spec.replicas})
    return _change_spec(
        command, live, spec, now, cause=f"rollback to {target.revision}", rollback_of=live.revision
    )


def _promote(command: Command, live: ServiceRecord, now: datetime) -> Outcome:
    why_not = ""
    if live.spec.update.canary == 0:
        why_not = "its update policy has no canary"
    elif live.promoted_revision == live.revision:
        why_not = f"revision {live.revision} is already promoted"
    elif not any(entry.revision < live.revision for entry in history(live)):
        why_not = f"revision {live.revision} is its first, which rolls out in full"
    if why_not:
        raise InvalidInput(f"service {command.name!r} has no canary waiting: {why_not}")
    return Outcome(_next(command, live, now, promoted_revision=live.revision), changed=True)


@dataclass(frozen=True)
class Result:
    """What became of one command: accepted (maybe a duplicate), or rejected with `error`."""

    command: Command
    generation: int = 0
    changed: bool = False
    duplicate: bool = False
    error: RejectedError | None = None


def fold(
    commands: list[Command], current: ServiceRecord | None, now: datetime
) -> tuple[ServiceRecord | None, list[Result]]:
    """Apply one service's commands in order, in memory.

    Returns the record to write (None when nothing changed) and a result per command. A
    command whose id the record remembers is a duplicate: it is answered, not applied again.
    """
    record = current
    changed = False
    results: list[Result] = []
    for command in commands:
        if record is not None and command.id in record.recent_commands:
            results.append(Result(command, record.generation, duplicate=True))
            continue
        try:
            outcome = apply(command, record, now)
        except RejectedError as exc:
            results.append(Result(command, error=exc))
            continue
        if outcome.changed:
            record = outcome.record  # it remembers the command (`_next`)
            changed = True
        results.append(Result(command, outcome.record.generation, changed=outcome.changed))
    return (record if changed else None), results
