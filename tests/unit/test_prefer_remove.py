"""Scale-in removes the replicas the scale command named first (the least busy, as the
autoscaler measured them), then follows the usual order. A replica that is not running still
goes before any of them: it has no work in flight at all."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from corral.schemas.spec import ServiceSpec
from corral.schemas.state import Assignment, ReplicaState, ReplicaStatus, ServiceRecord, Template
from corral.workers.deployer.planning import plan

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def record(replicas: int, prefer: list[str] | None = None, **spec: Any) -> ServiceRecord:
    fields: dict[str, Any] = {"name": "web", "command": ["serve"], "replicas": replicas}
    fields.update(spec)
    return ServiceRecord(
        spec=ServiceSpec.model_validate(fields),
        generation=1,
        command_id="c",
        updated_at=T0,
        prefer_remove=prefer or [],
    )


CURRENT = Template.from_spec(record(1).spec)
OLD = Template.from_spec(record(1, command=["serve", "--old"]).spec)


def assign(
    replica: str, node: str = "n1", *, age: int = 0, template: Template = CURRENT
) -> Assignment:
    return Assignment(
        replica=replica,
        service="web",
        node=node,
        generation=1,
        template=template,
        assigned_at=T0 - timedelta(seconds=age),
    )


def statuses(
    *assignments: Assignment, state: ReplicaState = ReplicaState.RUNNING
) -> dict[str, ReplicaStatus]:
    return {
        a.replica: ReplicaStatus(
            replica=a.replica,
            service="web",
            node=a.node,
            generation=1,
            state=state,
            updated_at=T0,
            ready=True,
            ready_at=T0 - timedelta(hours=1),
        )
        for a in assignments
    }


def drained(result: Any) -> list[str]:
    return [a.replica for a in result.drain]


FOUR = [assign("a", age=4), assign("b", age=3), assign("c", age=2), assign("d", age=1)]


def test_without_preferences_the_newest_go_first() -> None:
    assert drained(plan(record(2), FOUR, statuses(*FOUR))) == ["d", "c"]


def test_the_named_replicas_go_first_in_the_order_named() -> None:
    result = plan(record(2, ["b", "a"]), FOUR, statuses(*FOUR))
    assert drained(result) == ["b", "a"]


def test_only_as_many_as_the_surplus_go() -> None:
    result = plan(record(3, ["b", "a", "c"]), FOUR, statuses(*FOUR))
    assert drained(result) == ["b"]


def test_a_short_list_is_topped_up_in_the_usual_order() -> None:
    result = plan(record(1, ["a"]), FOUR, statuses(*FOUR))
    assert drained(result) == ["a", "d", "c"]


def test_names_of_replicas_that_are_gone_are_skipped() -> None:
    result = plan(record(2, ["gone", "c"]), FOUR, statuses(*FOUR))
    assert drained(result) == ["c", "d"]


def test_a_replica_not_running_still_goes_before_the_named_ones() -> None:
    states = statuses(*FOUR) | statuses(FOUR[3], state=ReplicaState.FAILED)
    result = plan(record(2, ["a", "b"]), FOUR, states)
    assert drained(result) == ["d", "a"]


def test_named_replicas_win_over_the_crowded_node_rule() -> None:
    spread = [assign("a", "n1"), assign("b", "n1"), assign("c", "n1"), assign("x", "n2")]
    assert drained(plan(record(3), spread, statuses(*spread)))[0] != "x"
    result = plan(record(3, ["x"]), spread, statuses(*spread))
    assert drained(result) == ["x"]


def test_a_scale_up_ignores_the_list() -> None:
    result = plan(record(6, ["a"]), FOUR, statuses(*FOUR))
    assert result.drain == []
    assert result.add == 2


def test_the_list_also_orders_surplus_during_a_rollout() -> None:
    old = [assign("o1", age=9, template=OLD), assign("o2", age=8, template=OLD)]
    new = [assign("n1", age=2), assign("n2", age=1), assign("n3", age=0)]
    result = plan(record(2, ["n1"]), old + new, statuses(*old, *new), now=T0)
    assert "n1" in drained(result)
    assert "n3" not in drained(result)


# the whole order, as Kubernetes' ReplicaSet controller has it (`ActivePods`: unscheduled or
# pending, then not ready, then the lower `pod-deletion-cost`, ...), with `prefer_remove` in
# the place of the deletion cost: not running, running but not ready, the named ones in order,
# then the most crowded node and the newest
def test_pending_starting_and_unreported_replicas_go_before_the_named_ones() -> None:
    fleet = [*FOUR, assign("p", age=9), assign("s", age=8), assign("u", age=7)]
    states = (
        statuses(*FOUR)
        | statuses(fleet[4], state=ReplicaState.PENDING)
        | statuses(fleet[5], state=ReplicaState.STARTING)
    )  # "u" has no status yet
    result = plan(record(4, ["a", "b"]), fleet, states)
    assert sorted(drained(result)) == ["p", "s", "u"]


def test_a_running_replica_that_is_not_ready_goes_before_the_named_ones() -> None:
    states = statuses(*FOUR)
    states["c"] = states["c"].model_copy(update={"ready": False})
    result = plan(record(2, ["a", "b"]), FOUR, states)
    assert drained(result) == ["c", "a"]


def test_the_full_order() -> None:
    fleet = [*FOUR, assign("x", age=9), assign("y", age=8)]
    states = statuses(*FOUR) | statuses(fleet[4], state=ReplicaState.FAILED)
    states["y"] = statuses(fleet[5])["y"].model_copy(update={"ready": False})
    result = plan(record(1, ["b", "a"]), fleet, states)
    # not running, not ready, then named in order, then the newest of the rest
    assert drained(result) == ["x", "y", "b", "a", "d"]
