"""The api worker's pure core: parsing commands and applying them to desired state."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from corral.schemas.commands import DeleteCommand, ScaleCommand
from corral.schemas.envelope import CloudEvent
from corral.schemas.errors import InvalidInput, NotFound, UnknownCommand
from corral.schemas.spec import ServiceSpec
from corral.schemas.state import ServiceRecord
from corral.workers.api.applying import RECENT_COMMANDS, Command, apply, fold, parse_command

T0 = datetime(2025, 1, 1, tzinfo=UTC)
SPEC: dict[str, Any] = {"command": ["serve", "${PORT}"], "ports": ["http"], "replicas": 2}


def event(verb: str, data: Any = None, *, type_: str | None = None, id_: str = "c1") -> CloudEvent:
    return CloudEvent(id=id_, source="tests", type=type_ or f"io.corral.service.{verb}", data=data)


def cmd(verb: str, data: Any = None, *, name: str = "web", id_: str = "c1") -> Command:
    return parse_command("service", name, verb, event(verb, data, id_=id_))


def deploy(data: dict[str, Any] | None = None, *, id_: str = "c1") -> Command:
    return cmd("deploy", SPEC if data is None else data, id_=id_)


# --- parse_command ------------------------------------------------------------------------


def test_parse_deploy_takes_the_name_from_the_subject() -> None:
    command = deploy(id_="cmd-7")
    assert (command.resource, command.name, command.verb, command.id) == (
        "service",
        "web",
        "deploy",
        "cmd-7",
    )
    assert isinstance(command.data, ServiceSpec)
    assert command.data.name == "web"
    assert command.data.replicas == 2


def test_parse_deploy_accepts_a_matching_name() -> None:
    command = cmd("deploy", {**SPEC, "name": "web"})
    assert isinstance(command.data, ServiceSpec)
    assert command.data.name == "web"


def test_parse_deploy_rejects_a_mismatched_name() -> None:
    with pytest.raises(
        InvalidInput, match="spec name 'api' does not match the subject's name 'web'"
    ):
        cmd("deploy", {**SPEC, "name": "api"})


def test_parse_deploy_with_an_invalid_subject_name_is_invalid() -> None:
    with pytest.raises(InvalidInput) as info:
        cmd("deploy", SPEC, name="Not_A_Label")
    assert [e.loc for e in info.value.errors] == ["name"]


def test_parse_deploy_errors_carry_field_paths() -> None:
    bad = {**SPEC, "replicas": -1, "resources": {"memory": "lots"}, "typo": 1}
    with pytest.raises(InvalidInput) as info:
        cmd("deploy", bad)
    error = info.value
    assert {e.loc for e in error.errors} == {"replicas", "resources.memory", "typo"}
    assert error.reason.startswith("invalid service.deploy data: ")
    assert "replicas:" in error.reason


def test_parse_deploy_without_data_says_command_or_image_is_missing() -> None:
    with pytest.raises(InvalidInput) as info:
        cmd("deploy", None)
    assert "a service needs a `command`, an `image`, or both" in info.value.reason


def test_parse_deploy_with_infinite_memory_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        cmd("deploy", {**SPEC, "resources": {"memory": float("inf")}})


@pytest.mark.parametrize("replicas", [0, 5])
def test_parse_scale(replicas: int) -> None:
    command = cmd("scale", {"replicas": replicas})
    assert command.data == ScaleCommand(replicas=replicas)


@pytest.mark.parametrize(
    ("data", "locs"),
    [
        ({"replicas": -1}, ["replicas"]),
        ({"replicas": 10_001}, ["replicas"]),
        ({"replicas": "many"}, ["replicas"]),
        ({}, ["replicas"]),
        ({"replicas": 2, "count": 3}, ["count"]),
    ],
)
def test_parse_scale_validation_errors_carry_field_paths(
    data: dict[str, Any], locs: list[str]
) -> None:
    with pytest.raises(InvalidInput) as info:
        cmd("scale", data)
    assert [e.loc for e in info.value.errors] == locs
    assert info.value.reason.startswith("invalid service.scale data: " + locs[0])


def test_parse_delete_with_or_without_empty_data() -> None:
    assert cmd("delete").data == DeleteCommand()
    assert cmd("delete", {}).data == DeleteCommand()
    with pytest.raises(InvalidInput):
        cmd("delete", {"force": True})


@pytest.mark.parametrize("data", [[1, 2], "scale", 3])
def test_parse_data_must_be_an_object(data: Any) -> None:
    with pytest.raises(
        InvalidInput, match=f"data must be a JSON object, not {type(data).__name__}"
    ):
        cmd("scale", data)


def test_unknown_resource() -> None:
    with pytest.raises(UnknownCommand, match="unknown resource 'pipeline'; known: service"):
        parse_command("pipeline", "x", "run", event("run", type_="io.corral.pipeline.run"))


def test_unknown_verb_lists_known_verbs() -> None:
    with pytest.raises(UnknownCommand) as info:
        parse_command("service", "web", "restart", event("restart"))
    assert "unknown command service.restart" in info.value.reason
    assert "known: delete, deploy, promote, rollback, scale" in info.value.reason


@pytest.mark.parametrize("type_", ["io.corral.service.scale", "io.corral.service.deploy.v2", "x"])
def test_type_must_match_the_subject(type_: str) -> None:
    with pytest.raises(InvalidInput, match="does not match the subject") as info:
        parse_command("service", "web", "deploy", event("deploy", SPEC, type_=type_))
    assert "'io.corral.service.deploy'" in info.value.reason


# --- apply --------------------------------------------------------------------------------


def run(*commands: Command) -> list[tuple[ServiceRecord, bool]]:
    """Apply commands in order, each on the record the previous one wrote."""
    current: ServiceRecord | None = None
    out = []
    for index, command in enumerate(commands):
        outcome = apply(command, current, T0 + timedelta(seconds=index))
        if outcome.changed:
            current = outcome.record
        out.append((outcome.record, outcome.changed))
    return out


def test_first_deploy_creates_generation_one() -> None:
    [(record, changed)] = run(deploy(id_="d1"))
    assert changed
    assert record.generation == 1
    assert record.spec.name == "web"
    assert record.command_id == "d1"
    assert record.updated_at == T0
    assert not record.deleted


def test_identical_deploy_is_unchanged() -> None:
    (first, _), (second, changed) = run(deploy(id_="d1"), deploy(id_="d2"))
    assert not changed
    assert second == first
    assert second.command_id == "d1"


def test_changed_deploy_bumps_generation() -> None:
    (_, _), (record, changed) = run(deploy(id_="d1"), deploy({**SPEC, "env": {"A": "1"}}, id_="d2"))
    assert changed
    assert record.generation == 2
    assert record.spec.env == {"A": "1"}
    assert record.command_id == "d2"
    assert record.updated_at == T0 + timedelta(seconds=1)


def test_scale_of_a_missing_service_is_not_found() -> None:
    with pytest.raises(NotFound, match="service 'web' not found"):
        apply(cmd("scale", {"replicas": 3}), None, T0)


def test_delete_of_a_missing_service_is_not_found() -> None:
    with pytest.raises(NotFound):
        apply(cmd("delete"), None, T0)


def test_scale_to_the_same_count_is_unchanged() -> None:
    (first, _), (record, changed) = run(deploy(), cmd("scale", {"replicas": 2}, id_="s1"))
    assert not changed
    assert record == first


def test_scale_changes_only_replicas_and_bumps_generation() -> None:
    (first, _), (record, changed) = run(deploy(), cmd("scale", {"replicas": 7}, id_="s1"))
    assert changed
    assert record.generation == 2
    assert record.spec.replicas == 7
    assert record.spec.model_dump(exclude={"replicas"}) == first.spec.model_dump(
        exclude={"replicas"}
    )
    assert record.command_id == "s1"


def test_delete_writes_a_tombstone() -> None:
    (first, _), (record, changed) = run(deploy(), cmd("delete", id_="x1"))
    assert changed
    assert record.deleted is True
    assert record.generation == first.generation + 1
    assert record.command_id == "x1"
    assert record.spec == first.spec
    assert record.updated_at == T0 + timedelta(seconds=1)


def test_deploy_after_delete_revives_with_a_higher_generation() -> None:
    results = run(deploy(), cmd("delete", id_="x1"), deploy(id_="d2"))
    record, changed = results[-1]
    assert changed
    assert not record.deleted
    assert record.generation == 3
    assert record.command_id == "d2"


@pytest.mark.parametrize("verb_data", [("scale", {"replicas": 5}), ("delete", None)])
def test_scale_or_delete_after_delete_is_not_found(verb_data: tuple[str, Any]) -> None:
    live = apply(deploy(), None, T0).record
    tombstone = apply(cmd("delete"), live, T0).record
    verb, data = verb_data
    with pytest.raises(NotFound):
        apply(cmd(verb, data), tombstone, T0)


def test_generation_keeps_rising_across_a_history() -> None:
    results = run(
        deploy(id_="a"),
        cmd("scale", {"replicas": 3}, id_="b"),
        deploy({**SPEC, "replicas": 3}, id_="c"),  # same as current: no change
        deploy({**SPEC, "replicas": 4}, id_="d"),
        cmd("delete", id_="e"),
        deploy(id_="f"),
    )
    assert [(r.generation, changed) for r, changed in results] == [
        (1, True),
        (2, True),
        (2, False),
        (3, True),
        (4, True),
        (5, True),
    ]


def _cmd(verb: str, data: object, name: str = "web", cid: str | None = None) -> Command:
    payload = {"replicas": data} if verb == "scale" else data
    event = CloudEvent(
        id=cid or uuid.uuid4().hex, source="t", type=f"io.corral.service.{verb}", data=payload
    )
    return parse_command("service", name, verb, event)


def test_fold_applies_a_group_in_order_and_writes_once() -> None:
    now = datetime.now(UTC)
    deploy = _cmd("deploy", {"command": ["sleep", "1"], "replicas": 1})
    record, results = fold([deploy, _cmd("scale", 5), _cmd("scale", 1)], None, now)
    assert record is not None
    assert record.spec.replicas == 1
    assert record.generation == 3
    assert [r.generation for r in results] == [1, 2, 3]
    assert all(r.changed and r.error is None for r in results)
    assert len(record.recent_commands) == 3


def test_fold_answers_a_repeated_command_without_applying_it_again() -> None:
    now = datetime.now(UTC)
    deploy = _cmd("deploy", {"command": ["sleep", "1"], "replicas": 1})
    scale = _cmd("scale", 4, cid="same-id")
    record, _ = fold([deploy, scale], None, now)
    assert record is not None
    again, results = fold([_cmd("scale", 4, cid="same-id")], record, now)
    assert again is None  # nothing to write
    assert results[0].duplicate
    assert results[0].generation == record.generation


def test_fold_rejects_without_stopping_the_group() -> None:
    now = datetime.now(UTC)
    record, results = fold([_cmd("scale", 3), _cmd("deploy", {"command": ["true"]})], None, now)
    assert isinstance(results[0].error, NotFound)
    assert results[1].error is None
    assert record is not None
    assert record.generation == 1


def test_fold_remembers_a_bounded_number_of_commands() -> None:
    now = datetime.now(UTC)
    record, _ = fold([_cmd("deploy", {"command": ["true"], "replicas": 0})], None, now)
    for count in range(1, RECENT_COMMANDS + 10):
        record, _ = fold([_cmd("scale", count)], record, now)
    assert record is not None
    assert len(record.recent_commands) == RECENT_COMMANDS


def test_a_changed_record_remembers_its_command_and_an_unchanged_one_does_not() -> None:
    first = apply(deploy(id_="d1"), None, T0).record
    assert first.recent_commands == ["d1"]
    scaled = apply(cmd("scale", {"replicas": 3}, id_="s1"), first, T0)
    assert scaled.changed
    assert scaled.record.recent_commands == ["d1", "s1"]
    same = apply(cmd("scale", {"replicas": 3}, id_="s2"), scaled.record, T0)
    assert not same.changed
    assert same.record.recent_commands == ["d1", "s1"]
    gone = apply(cmd("delete", id_="x1"), scaled.record, T0).record
    assert gone.recent_commands == ["d1", "s1", "x1"]


# --- scale-in preferences (the autoscaler names the least busy replicas) ----------------------


def test_a_scale_in_keeps_the_replicas_to_remove_first() -> None:
    (_, _), (record, changed) = run(
        deploy({**SPEC, "replicas": 4}),
        cmd("scale", {"replicas": 2, "prefer_remove": ["web-b", "web-a"]}, id_="s1"),
    )
    assert changed
    assert record.spec.replicas == 2
    assert record.prefer_remove == ["web-b", "web-a"]


def test_a_scale_without_preferences_clears_older_ones() -> None:
    runs = run(
        deploy({**SPEC, "replicas": 4}),
        cmd("scale", {"replicas": 3, "prefer_remove": ["web-b"]}, id_="s1"),
        cmd("scale", {"replicas": 1}, id_="s2"),
    )
    assert runs[1][0].prefer_remove == ["web-b"]
    assert runs[2][0].prefer_remove == []


def test_a_scale_up_keeps_no_preferences() -> None:
    (_, _), (record, _) = run(deploy(), cmd("scale", {"replicas": 5, "prefer_remove": ["x"]}))
    assert record.prefer_remove == []


def test_other_commands_leave_the_preferences_alone() -> None:
    runs = run(
        deploy({**SPEC, "replicas": 4}, id_="d1"),
        cmd("scale", {"replicas": 3, "prefer_remove": ["web-b"]}, id_="s1"),
        deploy({**SPEC, "replicas": 3, "labels": {"team": "a"}}, id_="d2"),
    )
    assert runs[2][1]
    assert runs[2][0].prefer_remove == ["web-b"]


def test_prefer_remove_is_bounded() -> None:
    with pytest.raises(InvalidInput) as info:
        cmd("scale", {"replicas": 1, "prefer_remove": [f"r{i}" for i in range(257)]})
    assert [e.loc for e in info.value.errors] == ["prefer_remove"]


def test_a_scale_with_the_same_count_ignores_new_preferences() -> None:
    (_, _), (record, changed) = run(
        deploy(), cmd("scale", {"replicas": 2, "prefer_remove": ["web-a"]}, id_="s1")
    )
    assert not changed
    assert record.prefer_remove == []
