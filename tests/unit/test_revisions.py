"""Revisions of a service's runtime template: numbering, history, rollback and promote."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from corral.schemas.commands import COMMANDS, PromoteCommand, RollbackCommand, command_type
from corral.schemas.envelope import CloudEvent
from corral.schemas.errors import InvalidInput, NotFound
from corral.schemas.spec import ServiceSpec
from corral.schemas.state import MAX_REVISIONS, Revision, ServiceRecord
from corral.workers.api.applying import (
    Command,
    apply,
    fold,
    history,
    latest_revision,
    parse_command,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def version(n: int, **fields: Any) -> dict[str, Any]:
    """A spec whose runtime template is version `n`."""
    return {"command": ["serve", f"v{n}", "${PORT}"], "ports": ["http"], "replicas": 2, **fields}


def cmd(verb: str, data: Any = None, *, id_: str, name: str = "web") -> Command:
    event = CloudEvent(id=id_, source="tests", type=f"io.corral.service.{verb}", data=data)
    return parse_command("service", name, verb, event)


def deploy(n: int, *, id_: str, **fields: Any) -> Command:
    return cmd("deploy", version(n, **fields), id_=id_)


def rollback(*, id_: str, **data: Any) -> Command:
    return cmd("rollback", data, id_=id_)


def promote(*, id_: str) -> Command:
    return cmd("promote", None, id_=id_)


def spec_of(n: int, **fields: Any) -> ServiceSpec:
    return ServiceSpec.model_validate({"name": "web", **version(n, **fields)})


class Clock:
    """Applies commands one after another, a second apart, keeping the record they write."""

    def __init__(self) -> None:
        self.record: ServiceRecord | None = None
        self.ticks = 0

    @property
    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.ticks)

    def __call__(self, command: Command) -> tuple[ServiceRecord, bool]:
        outcome = apply(command, self.record, self.now)
        self.ticks += 1
        if outcome.changed:
            self.record = outcome.record
        return outcome.record, outcome.changed


def numbers(record: ServiceRecord) -> list[int]:
    return [entry.revision for entry in record.revisions]


# --- the commands -------------------------------------------------------------------------


def test_rollback_and_promote_are_service_commands() -> None:
    assert COMMANDS["service"]["rollback"] is RollbackCommand
    assert COMMANDS["service"]["promote"] is PromoteCommand
    assert command_type("service", "rollback") == "io.corral.service.rollback"
    assert command_type("service", "promote") == "io.corral.service.promote"


def test_parse_rollback_from_a_cloudevent() -> None:
    command = rollback(id_="r1", to_revision=3, expected_revision=4, reason="5xx spike")
    assert (command.resource, command.name, command.verb, command.id) == (
        "service",
        "web",
        "rollback",
        "r1",
    )
    assert command.data == RollbackCommand(to_revision=3, expected_revision=4, reason="5xx spike")


@pytest.mark.parametrize("data", [None, {}])
def test_parse_rollback_without_data_goes_back_one(data: Any) -> None:
    assert cmd("rollback", data, id_="r1").data == RollbackCommand()


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"to_revision": 0}, "to_revision"),
        ({"to_revision": "latest"}, "to_revision"),
        ({"expected_revision": -1}, "expected_revision"),
        ({"reason": "x" * 501}, "reason"),
        ({"revision": 2}, "revision"),
    ],
)
def test_parse_rollback_validation_errors_carry_field_paths(data: dict[str, Any], loc: str) -> None:
    with pytest.raises(InvalidInput) as info:
        cmd("rollback", data, id_="r1")
    assert [e.loc for e in info.value.errors] == [loc]
    assert info.value.reason.startswith("invalid service.rollback data: ")


@pytest.mark.parametrize("data", [None, {}])
def test_parse_promote_from_a_cloudevent(data: Any) -> None:
    command = cmd("promote", data, id_="p1")
    assert (command.verb, command.id, command.data) == ("promote", "p1", PromoteCommand())


def test_parse_promote_takes_no_fields() -> None:
    with pytest.raises(InvalidInput) as info:
        cmd("promote", {"revision": 2}, id_="p1")
    assert [e.loc for e in info.value.errors] == ["revision"]


def test_a_rollback_event_must_carry_the_rollback_type() -> None:
    event = CloudEvent(id="r1", source="tests", type="io.corral.service.promote", data={})
    with pytest.raises(InvalidInput, match="does not match the subject"):
        parse_command("service", "web", "rollback", event)


# --- deploy -------------------------------------------------------------------------------


def test_a_new_service_starts_at_revision_one() -> None:
    record, changed = Clock()(deploy(1, id_="d1"))
    assert changed
    assert record.revision == 1
    assert record.revisions == [
        Revision(revision=1, spec=spec_of(1), created_at=T0, command_id="d1", cause="deploy")
    ]
    assert (record.rollback_of, record.promoted_revision) == (0, 0)


def test_a_template_change_is_a_new_revision() -> None:
    step = Clock()
    step(deploy(1, id_="d1"))
    record, changed = step(deploy(2, id_="d2"))
    assert changed
    assert (record.revision, record.generation) == (2, 2)
    assert numbers(record) == [1, 2]
    assert record.revisions[-1] == Revision(
        revision=2,
        spec=spec_of(2),
        created_at=T0 + timedelta(seconds=1),
        command_id="d2",
        cause="deploy",
    )
    assert record.revisions[0].spec == spec_of(1)


def test_an_identical_deploy_keeps_everything() -> None:
    step = Clock()
    first, _ = step(deploy(1, id_="d1"))
    record, changed = step(deploy(1, id_="d2"))
    assert not changed
    assert record == first


@pytest.mark.parametrize(
    "fields",
    [
        {"labels": {"team": "web"}},
        {"replicas": 5},
        {"placement": {"node_selector": {"zone": "a"}}},
        {"update": {"max_surge": 2}},
    ],
)
def test_a_change_outside_the_template_keeps_the_revision(fields: dict[str, Any]) -> None:
    step = Clock()
    step(deploy(1, id_="d1"))
    step(deploy(2, id_="d2"))
    record, changed = step(deploy(2, id_="d3", **fields))
    assert changed
    assert (record.revision, record.generation) == (2, 3)
    assert numbers(record) == [1, 2]
    latest = record.revisions[-1]
    assert latest.spec == spec_of(2, **fields) == record.spec
    assert (latest.command_id, latest.created_at) == ("d2", T0 + timedelta(seconds=1))
    assert record.revisions[0].spec == spec_of(1)


def test_scale_does_not_touch_revisions() -> None:
    step = Clock()
    step(deploy(1, id_="d1"))
    before, _ = step(deploy(2, id_="d2"))
    record, changed = step(cmd("scale", {"replicas": 9}, id_="s1"))
    assert changed
    assert record.spec.replicas == 9
    assert (record.revision, record.revisions) == (2, before.revisions)
    assert record.generation == 3


def test_history_keeps_the_last_revisions_only() -> None:
    step = Clock()
    for n in range(1, MAX_REVISIONS + 3):
        record, _ = step(deploy(n, id_=f"d{n}"))
    assert record.revision == MAX_REVISIONS + 2
    assert numbers(record) == list(range(3, MAX_REVISIONS + 3))
    assert record.revisions[0].spec == spec_of(3)


def test_a_deploy_keeps_the_promoted_revision_and_clears_rollback_of() -> None:
    base = ServiceRecord(
        spec=spec_of(1),
        generation=4,
        command_id="x",
        updated_at=T0,
        revision=3,
        revisions=[
            Revision(revision=3, spec=spec_of(1), created_at=T0, command_id="x", cause="rb")
        ],
        promoted_revision=2,
        rollback_of=2,
    )
    record = apply(deploy(7, id_="d7"), base, T0).record
    assert (record.revision, record.promoted_revision, record.rollback_of) == (4, 2, 0)


def test_delete_keeps_the_revisions() -> None:
    step = Clock()
    step(deploy(1, id_="d1"))
    before, _ = step(deploy(2, id_="d2"))
    record, _ = step(cmd("delete", id_="x1"))
    assert record.deleted
    assert (record.revision, record.revisions) == (2, before.revisions)


def test_a_revived_service_never_reuses_a_revision_number() -> None:
    step = Clock()
    step(deploy(1, id_="d1"))
    step(deploy(2, id_="d2"))
    step(cmd("delete", id_="x1"))
    record, changed = step(deploy(2, id_="d3"))  # the very spec it had: still a new revision
    assert changed
    assert not record.deleted
    assert (record.revision, record.generation, record.rollback_of) == (3, 4, 0)
    assert numbers(record) == [1, 2, 3]
    assert record.revisions[-1].command_id == "d3"


def test_numbers_go_past_the_highest_ever_used() -> None:
    # the record says revision 2, but its history (say, after a rollback) went further
    entries = [
        Revision(revision=n, spec=spec_of(n), created_at=T0, command_id=f"d{n}") for n in (1, 2, 5)
    ]
    base = ServiceRecord(
        spec=spec_of(2), generation=5, command_id="d2", updated_at=T0, revision=2, revisions=entries
    )
    assert latest_revision(base) == 5
    record = apply(deploy(9, id_="d9"), base, T0).record
    assert record.revision == 6


def test_a_record_from_before_revisions_counts_its_spec_as_its_revision() -> None:
    legacy = ServiceRecord(spec=spec_of(1), generation=3, command_id="old", updated_at=T0)
    assert history(legacy) == [
        Revision(revision=1, spec=spec_of(1), created_at=T0, command_id="old", cause="deploy")
    ]
    record = apply(deploy(2, id_="d2"), legacy, T0).record
    assert (record.revision, numbers(record)) == (2, [1, 2])
    back = apply(rollback(id_="r1"), record, T0).record
    assert (back.revision, back.spec) == (3, spec_of(1))


# --- rollback -----------------------------------------------------------------------------


def test_rollback_goes_back_one_revision_as_a_new_revision() -> None:
    step = Clock()
    step(deploy(1, id_="d1"))
    step(deploy(2, id_="d2"))
    record, changed = step(rollback(id_="r1"))
    assert changed
    assert record.revision == 3
    assert record.spec == spec_of(1)
    assert record.rollback_of == 2
    assert (record.generation, record.command_id) == (3, "r1")
    assert record.updated_at == T0 + timedelta(seconds=2)
    assert numbers(record) == [1, 2, 3]
    assert record.revisions[-1] == Revision(
        revision=3,
        spec=spec_of(1),
        created_at=T0 + timedelta(seconds=2),
        command_id="r1",
        cause="rollback to 1",
    )

    record, changed = step(rollback(id_="r2"))
    assert changed
    assert (record.revision, record.spec, record.rollback_of) == (4, spec_of(2), 3)
    assert record.revisions[-1].cause == "rollback to 2"
    assert numbers(record) == [1, 2, 3, 4]


def test_rollback_keeps_the_live_replica_count() -> None:
    step = Clock()
    step(deploy(1, id_="d1", replicas=2))
    step(deploy(2, id_="d2", replicas=2))
    step(cmd("scale", {"replicas": 7}, id_="s1"))
    record, _ = step(rollback(id_="r1"))
    assert record.spec == spec_of(1, replicas=7)


def test_rollback_restores_the_targets_latest_non_runtime_fields() -> None:
    step = Clock()
    step(deploy(1, id_="d1"))
    step(deploy(1, id_="d2", labels={"tier": "gold"}))  # amends revision 1 in place
    step(deploy(2, id_="d3"))
    record, _ = step(rollback(id_="r1"))
    assert record.spec == spec_of(1, labels={"tier": "gold"})


def test_rollback_to_a_named_revision() -> None:
    step = Clock()
    for n in (1, 2, 3):
        step(deploy(n, id_=f"d{n}"))
    record, changed = step(rollback(id_="r1", to_revision=1, reason="bad since v2"))
    assert changed
    assert (record.revision, record.spec, record.rollback_of) == (4, spec_of(1), 3)
    assert record.revisions[-1].cause == "rollback to 1"


def test_rollback_to_the_current_revision_is_unchanged() -> None:
    step = Clock()
    step(deploy(1, id_="d1"))
    current, _ = step(deploy(2, id_="d2"))
    record, changed = step(rollback(id_="r1", to_revision=2))
    assert not changed
    assert record == current


def test_rollback_to_an_unknown_revision_lists_the_known_ones() -> None:
    step = Clock()
    step(deploy(1, id_="d1"))
    current, _ = step(deploy(2, id_="d2"))
    with pytest.raises(NotFound, match=r"service 'web' has no revision 7; known revisions: 1, 2"):
        apply(rollback(id_="r1", to_revision=7), current, T0)


def test_rollback_to_a_revision_that_fell_out_of_history_is_not_found() -> None:
    step = Clock()
    for n in range(1, MAX_REVISIONS + 2):
        current, _ = step(deploy(n, id_=f"d{n}"))
    with pytest.raises(NotFound, match="has no revision 1; known revisions: 2, 3,"):
        apply(rollback(id_="r1", to_revision=1), current, T0)


def test_rollback_trims_history_too() -> None:
    step = Clock()
    for n in range(1, MAX_REVISIONS + 1):
        step(deploy(n, id_=f"d{n}"))
    record, _ = step(rollback(id_="r1"))
    assert record.revision == MAX_REVISIONS + 1
    assert numbers(record) == list(range(2, MAX_REVISIONS + 2))
    assert record.spec == spec_of(MAX_REVISIONS - 1)


def test_rollback_of_the_first_revision_is_invalid() -> None:
    current, _ = Clock()(deploy(1, id_="d1"))
    with pytest.raises(InvalidInput, match="service 'web' has no earlier revision to roll back to"):
        apply(rollback(id_="r1"), current, T0)


def test_rollback_of_a_missing_or_deleted_service_is_not_found() -> None:
    with pytest.raises(NotFound, match="service 'web' not found"):
        apply(rollback(id_="r1"), None, T0)
    step = Clock()
    step(deploy(1, id_="d1"))
    step(deploy(2, id_="d2"))
    tombstone, _ = step(cmd("delete", id_="x1"))
    with pytest.raises(NotFound):
        apply(rollback(id_="r1"), tombstone, T0)


def test_a_stale_rollback_is_refused() -> None:
    step = Clock()
    step(deploy(1, id_="d1"))
    step(deploy(2, id_="d2"))
    current, _ = step(deploy(3, id_="d3"))  # a newer deploy since the rollback was decided
    with pytest.raises(InvalidInput) as info:
        apply(rollback(id_="r1", expected_revision=2), current, T0)
    assert info.value.reason == ("service 'web' is at revision 3 now, not 2; nothing rolled back")


def test_the_stale_check_comes_before_the_target() -> None:
    current, _ = Clock()(deploy(1, id_="d1"))
    with pytest.raises(InvalidInput, match="is at revision 1 now, not 2"):
        apply(rollback(id_="r1", expected_revision=2, to_revision=1), current, T0)


def test_a_rollback_at_the_expected_revision_goes_ahead() -> None:
    step = Clock()
    step(deploy(1, id_="d1"))
    step(deploy(2, id_="d2"))
    record, changed = step(rollback(id_="r1", expected_revision=2))
    assert changed
    assert (record.revision, record.spec, record.rollback_of) == (3, spec_of(1), 2)


def test_rollback_keeps_the_promoted_revision() -> None:
    step = Clock()
    step(deploy(1, id_="d1", update={"canary": 1}))
    step(deploy(2, id_="d2", update={"canary": 1}))
    step(promote(id_="p1"))
    record, _ = step(rollback(id_="r1"))
    assert (record.revision, record.promoted_revision) == (3, 2)


def test_rollback_to_the_same_template_makes_no_new_revision() -> None:
    # revived with the spec it had: revision 2 runs what revision 1 ran
    step = Clock()
    step(deploy(1, id_="d1"))
    step(cmd("delete", id_="x1"))
    current, _ = step(deploy(1, id_="d2", labels={"tier": "gold"}))
    assert current.revision == 2
    record, changed = step(rollback(id_="r1"))
    assert changed  # the labels go back to revision 1's
    assert (record.revision, record.rollback_of, numbers(record)) == (2, 0, [1, 2])
    assert record.spec == spec_of(1)
    record, changed = step(rollback(id_="r2"))
    assert not changed


# --- promote ------------------------------------------------------------------------------


def test_promote_lets_a_waiting_canary_roll_out() -> None:
    step = Clock()
    step(deploy(1, id_="d1", update={"canary": 1}))
    before, _ = step(deploy(2, id_="d2", update={"canary": 1}))
    record, changed = step(promote(id_="p1"))
    assert changed
    assert record.promoted_revision == 2
    assert (record.revision, record.revisions, record.spec) == (2, before.revisions, before.spec)
    assert (record.generation, record.command_id) == (3, "p1")
    assert record.updated_at == T0 + timedelta(seconds=2)


def test_promote_without_a_canary_policy_is_invalid() -> None:
    step = Clock()
    step(deploy(1, id_="d1"))
    current, _ = step(deploy(2, id_="d2"))
    with pytest.raises(
        InvalidInput,
        match="service 'web' has no canary waiting: its update policy has no canary",
    ):
        apply(promote(id_="p1"), current, T0)


def test_promote_of_a_first_revision_is_invalid() -> None:
    current, _ = Clock()(deploy(1, id_="d1", update={"canary": 1}))
    with pytest.raises(InvalidInput, match="has no canary waiting: revision 1 is its first"):
        apply(promote(id_="p1"), current, T0)


def test_promote_twice_is_invalid_until_the_next_revision() -> None:
    step = Clock()
    step(deploy(1, id_="d1", update={"canary": 1}))
    step(deploy(2, id_="d2", update={"canary": 1}))
    promoted, _ = step(promote(id_="p1"))
    with pytest.raises(InvalidInput, match="no canary waiting: revision 2 is already promoted"):
        apply(promote(id_="p2"), promoted, T0)
    step(deploy(3, id_="d3", update={"canary": 1}))
    record, changed = step(promote(id_="p2"))
    assert changed
    assert record.promoted_revision == 3


def test_promote_of_a_missing_service_is_not_found() -> None:
    with pytest.raises(NotFound, match="service 'web' not found"):
        apply(promote(id_="p1"), None, T0)


# --- fold ---------------------------------------------------------------------------------


def test_fold_applies_rollback_and_promote_and_remembers_them() -> None:
    commands = [
        deploy(1, id_="d1", update={"canary": 1}),
        deploy(2, id_="d2", update={"canary": 1}),
        rollback(id_="r1"),
        promote(id_="p1"),
    ]
    record, results = fold(commands, None, T0)
    assert record is not None
    assert (record.revision, record.promoted_revision, record.generation) == (3, 3, 4)
    assert [r.generation for r in results] == [1, 2, 3, 4]
    assert all(r.changed and r.error is None for r in results)
    assert record.recent_commands == ["d1", "d2", "r1", "p1"]


def test_fold_answers_a_repeated_rollback_without_rolling_back_again() -> None:
    record, _ = fold([deploy(1, id_="d1"), deploy(2, id_="d2"), rollback(id_="r1")], None, T0)
    assert record is not None
    again, results = fold([rollback(id_="r1")], record, T0)
    assert again is None
    assert results[0].duplicate
    assert results[0].generation == record.generation


def test_fold_rejects_a_bad_rollback_without_stopping_the_group() -> None:
    commands = [
        deploy(1, id_="d1"),
        rollback(id_="r1"),
        promote(id_="p1"),
        cmd("scale", {"replicas": 3}, id_="s1"),
    ]
    record, results = fold(commands, None, T0)
    assert isinstance(results[1].error, InvalidInput)
    assert isinstance(results[2].error, InvalidInput)
    assert results[3].error is None
    assert record is not None
    assert (record.revision, record.generation, record.spec.replicas) == (1, 2, 3)
    assert record.recent_commands == ["d1", "s1"]
