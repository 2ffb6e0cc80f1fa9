"""The deployer's pure planner: drain, forget and add, from desired and observed state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from corral.schemas.spec import ServiceSpec
from corral.schemas.state import (
    Assignment,
    ReplicaState,
    ReplicaStatus,
    ServiceRecord,
    Template,
)
from corral.workers.deployer import planning
from corral.workers.deployer.planning import Plan, new_replica_ids, plan

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def record(replicas: int = 3, **spec: Any) -> ServiceRecord:
    fields: dict[str, Any] = {"name": "web", "command": ["serve"], "replicas": replicas}
    fields.update(spec)
    return ServiceRecord(
        spec=ServiceSpec.model_validate(fields), generation=1, command_id="c", updated_at=T0
    )


CURRENT = Template.from_spec(record().spec)
OLD = Template.from_spec(record(command=["serve", "--old"]).spec)


def assign(
    replica: str,
    node: str = "n1",
    *,
    template: Template = CURRENT,
    draining: bool = False,
    age: int = 0,
) -> Assignment:
    """`age` in seconds before now: a larger age is an older replica."""
    return Assignment(
        replica=replica,
        service="web",
        node=node,
        generation=1,
        template=template,
        assigned_at=T0 - timedelta(seconds=age),
        draining=draining,
    )


def status(replica: str, state: ReplicaState, node: str = "n1") -> ReplicaStatus:
    return ReplicaStatus(
        replica=replica, service="web", node=node, generation=1, state=state, updated_at=T0
    )


def running(*assignments: Assignment) -> dict[str, ReplicaStatus]:
    """Running but not (yet) ready: no probe has passed."""
    return {a.replica: status(a.replica, ReplicaState.RUNNING, a.node) for a in assignments}


def ready(*assignments: Assignment) -> dict[str, ReplicaStatus]:
    """Ready for long enough that min_healthy is over."""
    return {
        a.replica: status(a.replica, ReplicaState.HEALTHY, a.node).model_copy(
            update={"ready": True, "ready_at": T0 - timedelta(hours=1)}
        )
        for a in assignments
    }


def names(assignments: list[Assignment]) -> list[str]:
    return [a.replica for a in assignments]


def test_new_replica_ids_are_prefixed_and_unique() -> None:
    ids = new_replica_ids("web", 200, set())
    assert len(set(ids)) == 200
    for replica in ids:
        assert replica.startswith("web-")
        assert len(replica) == len("web-") + 8


def test_new_replica_ids_never_repeat_a_taken_or_drawn_id(monkeypatch: pytest.MonkeyPatch) -> None:
    # byte 0 is the alphabet's "b", 1 is "c", 2 is "d"; each draw asks for what is missing
    draws = iter([bytes([0] * 16), bytes([1] * 16), bytes([2] * 8)])
    asked: list[int] = []

    def token_bytes(n: int) -> bytes:
        asked.append(n)
        return next(draws)

    monkeypatch.setattr(planning.secrets, "token_bytes", token_bytes)
    ids = new_replica_ids("web", 2, {"web-bbbbbbbb"})
    assert ids == ["web-cccccccc", "web-dddddddd"]
    assert asked == [16, 16, 8]


def test_steady_state_is_an_empty_plan() -> None:
    current = [assign("a"), assign("b"), assign("c")]
    result = plan(record(3), current, running(*current))
    assert result.empty
    assert result.template == CURRENT


def test_plan_empty_property() -> None:
    assert Plan().empty
    assert not Plan(add=1).empty
    assert not Plan(drain=[assign("a")]).empty
    assert not Plan(forget=[assign("a")]).empty
    assert not Plan(lost=[assign("a")]).empty
    # what is only reported leaves a plan empty
    assert Plan(ready=2, old=1, recheck_after=1.0, failure="x", paused=True).empty


def test_scale_up_from_nothing() -> None:
    result = plan(record(3), [], {})
    assert result.add == 3
    assert result.drain == []
    assert result.template == CURRENT


def test_scale_up_adds_the_difference() -> None:
    current = [assign("a")]
    result = plan(record(4), current, running(*current))
    assert result.add == 3
    assert result.drain == []


def test_scale_down_drains_the_surplus() -> None:
    current = [assign("a", age=3), assign("b", age=2), assign("c", age=1), assign("d", age=0)]
    result = plan(record(1), current, running(*current))
    assert result.add == 0
    assert len(result.drain) == 3
    # newest first when nothing else tells them apart
    assert names(result.drain) == ["d", "c", "b"]


def test_scale_to_zero_drains_everything() -> None:
    current = [assign("a"), assign("b")]
    result = plan(record(0), current, running(*current))
    assert sorted(names(result.drain)) == ["a", "b"]
    assert result.add == 0


@pytest.mark.parametrize(
    "state",
    [ReplicaState.STARTING, ReplicaState.FAILED, ReplicaState.EXITED, None],
)
def test_scale_down_prefers_replicas_that_are_not_running(state: ReplicaState | None) -> None:
    # the not-running one is the oldest and on the least crowded node, and still goes first
    current = [
        assign("idle", node="n2", age=100),
        assign("a", node="n1", age=1),
        assign("b", node="n1", age=0),
    ]
    statuses = running(current[1], current[2])
    if state is not None:
        statuses["idle"] = status("idle", state, "n2")
    result = plan(record(2), current, statuses)
    assert names(result.drain) == ["idle"]


def test_scale_down_then_prefers_the_most_crowded_node() -> None:
    current = [
        assign("x1", node="n1", age=0),
        assign("y1", node="n2", age=5),
        assign("y2", node="n2", age=6),
        assign("y3", node="n2", age=7),
    ]
    result = plan(record(2), current, running(*current))
    # n2 holds three, so both go from n2, newest first, although x1 is the newest overall
    assert names(result.drain) == ["y1", "y2"]


def test_scale_down_newest_first_with_sub_second_times() -> None:
    older = assign("older")
    newer = older.model_copy(
        update={"replica": "newer", "assigned_at": T0 + timedelta(microseconds=500_000)}
    )
    result = plan(record(1), [older, newer], running(older, newer))
    assert names(result.drain) == ["newer"]


def test_template_change_rolls_instead_of_replacing_everything_at_once() -> None:
    # ready old replicas stay until new ones take over; 25% of 3 rounds up to a surge of 1
    current = [assign("a", template=OLD), assign("b", template=OLD), assign("c", template=OLD)]
    result = plan(record(3), current, ready(*current), now=T0)
    assert result.drain == []
    assert result.add == 1
    assert result.old == 3
    assert result.ready == 0
    assert result.template == CURRENT


def test_template_change_drains_old_replicas_that_are_not_ready_at_once() -> None:
    current = [assign("a", template=OLD), assign("b", template=OLD), assign("c", template=OLD)]
    result = plan(record(3), current, running(*current), now=T0)
    assert sorted(names(result.drain)) == ["a", "b", "c"]
    # the surge still bounds what is added while the old ones are active
    assert result.add == 1
    assert result.template == CURRENT


def test_template_change_keeps_fresh_replicas() -> None:
    current = [assign("old", template=OLD), assign("new1"), assign("new2")]
    result = plan(record(3), current, running(*current), now=T0)
    assert names(result.drain) == ["old"]
    assert result.add == 1


def test_template_change_drains_a_ready_old_replica_once_the_new_ones_are_settled() -> None:
    current = [assign("old", template=OLD), assign("new1"), assign("new2"), assign("new3")]
    result = plan(record(3), current, ready(*current), now=T0)
    assert names(result.drain) == ["old"]
    assert result.add == 0
    assert result.ready == 3
    assert result.old == 1


def test_replicas_and_labels_are_not_part_of_the_template() -> None:
    current = [assign("a"), assign("b")]
    result = plan(record(2, labels={"team": "x"}), current, running(*current))
    assert result.empty


def test_update_settings_are_not_part_of_the_template() -> None:
    current = [assign("a"), assign("b")]
    changed = record(2, update={"max_surge": 1, "min_healthy": "1m", "canary": 1})
    result = plan(changed, current, running(*current))
    assert result.empty
    assert result.old == 0


@pytest.mark.parametrize(
    "change",
    [
        {"env": {"A": "1"}},
        {"resources": {"cpu": "500m"}},
        {"ports": ["http"], "command": ["serve", "${PORT}"]},
        {"stop_grace_period": 1.0},
        {"image": "busybox:1.36"},
        {"health": {"exec": ["true"]}},
        {"restart": {"policy": "never"}},
    ],
)
def test_any_runtime_change_makes_replicas_stale(change: dict[str, Any]) -> None:
    current = [assign("a"), assign("b")]
    result = plan(record(2, **change), current, ready(*current), now=T0)
    assert result.old == 2
    assert result.template != CURRENT
    # a rollout begins: one surge replica of the new template, none of the old drained yet
    assert result.add == 1
    assert result.drain == []


def test_template_change_with_scale_down_drains_surplus_new_and_unready_old() -> None:
    current = [assign("old", template=OLD), assign("n1", age=1), assign("n2", age=0)]
    result = plan(record(1), current, running(*current), now=T0)
    assert names(result.drain) == ["n2", "old"]
    assert result.add == 0


def test_deleted_service_drains_everything_active() -> None:
    current = [assign("a"), assign("b", template=OLD)]
    gone = assign("gone", draining=True)
    result = plan(None, [*current, gone], running(*current))
    assert sorted(names(result.drain)) == ["a", "b"]
    assert names(result.forget) == ["gone"]
    assert result.add == 0
    assert result.template is None


def test_deleted_service_with_nothing_left_is_empty() -> None:
    assert plan(None, [], {}).empty


def test_draining_replicas_never_count_toward_current() -> None:
    current = [assign("a"), assign("b")]
    leaving = assign("leaving", draining=True)
    statuses = running(*current, leaving)
    result = plan(record(3), [*current, leaving], statuses)
    assert result.add == 1
    assert result.drain == []
    assert result.forget == []


def test_draining_replicas_are_not_drained_again() -> None:
    leaving = [assign("l1", draining=True), assign("l2", draining=True, template=OLD)]
    statuses = {a.replica: status(a.replica, ReplicaState.STOPPING) for a in leaving}
    result = plan(record(0), leaving, statuses)
    assert result.empty


@pytest.mark.parametrize(
    ("state", "forgotten"),
    [
        (None, True),
        (ReplicaState.STOPPED, True),
        (ReplicaState.STOPPING, False),
        (ReplicaState.RUNNING, False),
        (ReplicaState.STARTING, False),
    ],
)
def test_draining_replica_is_forgotten_once_stopped_or_gone(
    state: ReplicaState | None, forgotten: bool
) -> None:
    leaving = assign("leaving", draining=True)
    statuses = {} if state is None else {"leaving": status("leaving", state)}
    result = plan(record(0), [leaving], statuses)
    assert names(result.forget) == (["leaving"] if forgotten else [])


def test_draining_replica_on_a_dead_node_is_forgotten() -> None:
    on_dead = assign("a", node="dead", draining=True)
    on_live = assign("b", node="live", draining=True)
    statuses = {
        "a": status("a", ReplicaState.RUNNING, "dead"),
        "b": status("b", ReplicaState.RUNNING, "live"),
    }
    result = plan(record(0), [on_dead, on_live], statuses, live_nodes={"live"})
    assert names(result.forget) == ["a"]
    # without a view of live nodes nothing is assumed dead
    assert plan(record(0), [on_dead, on_live], statuses).forget == []


def test_active_replicas_on_dead_nodes_are_lost_and_replaced() -> None:
    current = [assign("a", node="dead"), assign("b", node="live")]
    result = plan(record(2), current, running(*current), live_nodes={"live"})
    assert names(result.lost) == ["a"]
    assert result.forget == []
    assert result.drain == []
    assert result.add == 1
    # without a view of live nodes nothing is assumed lost
    unjudged = plan(record(2), current, running(*current))
    assert unjudged.lost == []
    assert unjudged.empty


def test_deleted_service_on_a_dead_node_is_lost_not_drained() -> None:
    current = [assign("a", node="dead"), assign("b", node="live")]
    result = plan(None, current, running(*current), live_nodes={"live"})
    assert names(result.lost) == ["a"]
    assert names(result.drain) == ["b"]
    assert result.add == 0
