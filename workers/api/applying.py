"""Pure: what a command does to a service's desired state."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from corral.schemas.commands import COMMANDS, ScaleCommand, command_type
from corral.schemas.envelope import CloudEvent
from corral.schemas.errors import (
    InvalidInput,
    NotFound,
    RejectedError,
    UnknownCommand,
    field_errors_from_pydantic,
)
from corral.schemas.spec import ServiceSpec
from corral.schemas.state import ServiceRecord


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
    verbs = COMMANDS.get(resource)
    if verbs is None:
        raise UnknownCommand(f"unknown resource {resource!r}; known: {', '.join(sorted(COMMANDS))}")
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
    """Decide the new desired state. Raises NotFound for scale or delete of nothing."""
    data = command.data
    live = current if current is not None and not current.deleted else None
    generation = current.generation + 1 if current else 1
    if command.verb == "deploy":
        assert isinstance(data, ServiceSpec)
        if live is not None and live.spec == data:
            return Outcome(live, changed=False)
        record = ServiceRecord(
            spec=data, generation=generation, command_id=command.id, updated_at=now
        )
        return Outcome(record, changed=True)
    if live is None:
        raise NotFound(f"service {command.name!r} not found")
    if command.verb == "scale":
        assert isinstance(data, ScaleCommand)
        if live.spec.replicas == data.replicas:
            return Outcome(live, changed=False)
        spec = live.spec.model_copy(update={"replicas": data.replicas})
        record = ServiceRecord(
            spec=spec, generation=generation, command_id=command.id, updated_at=now
        )
        return Outcome(record, changed=True)
    if command.verb == "delete":
        record = live.model_copy(
            update={
                "deleted": True,
                "generation": generation,
                "command_id": command.id,
                "updated_at": now,
            }
        )
        return Outcome(record, changed=True)
    raise UnknownCommand(f"unknown command {command.resource}.{command.verb}")


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
            previous = record.recent_commands if record is not None else []
            remembered = [*previous, command.id][-RECENT_COMMANDS:]
            record = outcome.record.model_copy(update={"recent_commands": remembered})
            changed = True
        results.append(Result(command, outcome.record.generation, changed=outcome.changed))
    return (record if changed else None), results
