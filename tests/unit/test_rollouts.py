"""The planner during rollouts: surges, min_healthy, failure, rollback, canaries, node loss.

Multi-step tests run a tiny simulated cluster: each plan is applied (drained replicas marked,
forgotten and lost ones removed, added ones assigned), then replicas become ready and time
moves on, and the planner is asked again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from corral.schemas.spec import ServiceSpec
from corral.schemas.state import (
    LIVE_STATES,
    Assignment,
    ReplicaState,
    ReplicaStatus,
    ServiceRecord,
    Template,
)
from corral.workers.deployer.planning import Plan, plan

T0 = datetime(2025, 1, 1, tzinfo=UTC)
STARTED = T0 - timedelta(seconds=1)
"""when the rollout under test began: every replica the tests assign counts as its own"""
NODES = ("n1", "n2", "n3", "n4")
V1 = ["serve", "--v1"]
V2 = ["serve", "--v2"]


def record(
    replicas: int = 3,
    *,
    command: list[str] | None = None,
    revision: int = 2,
    promoted: int = 0,
    rollback_of: int = 0,
    **spec: Any,
) -> ServiceRecord:
    """By default revision 2 of the service, running V2, which replaces V1."""
    fields: dict[str, Any] = {"name": "web", "command": command or V2, "replicas": replicas}
    fields.update(spec)
    return ServiceRecord(
        spec=ServiceSpec.model_validate(fields),
        generation=revision,
        command_id="c",
        updated_at=T0,
        revision=revision,
        promoted_revision=promoted,
        rollback_of=rollback_of,
    )


NEW = Template.from_spec(record(command=V2).spec)
OLD = Template.from_spec(record(command=V1).spec)


def assign(
    replica: str,
    node: str = "n1",
    *,
    template: Template = NEW,
    age: float = 0,
    draining: bool = False,
) -> Assignment:
    return Assignment(
        replica=replica,
        service="web",
        node=node,
        generation=1,
        template=template,
        assigned_at=T0 - timedelta(seconds=age),
        draining=draining,
    )


def status(
    replica: str,
    state: ReplicaState = ReplicaState.RUNNING,
    *,
    node: str = "n1",
    ready_for: float | None = None,
    **extra: Any,
) -> ReplicaStatus:
    """`ready_for` seconds before T0 the replica became ready; None: not ready."""
    return ReplicaStatus(
        replica=replica,
        service="web",
        node=node,
        generation=1,
        state=state,
        updated_at=T0,
        ready=ready_for is not None,
        ready_at=T0 - timedelta(seconds=ready_for) if ready_for is not None else None,
        **extra,
    )


def healthy(*assignments: Assignment, ready_for: float = 3600) -> dict[str, ReplicaStatus]:
    return {
        a.replica: status(a.replica, ReplicaState.HEALTHY, node=a.node, ready_for=ready_for)
        for a in assignments
    }


def starting(*assignments: Assignment) -> dict[str, ReplicaStatus]:
    return {a.replica: status(a.replica, ReplicaState.STARTING, node=a.node) for a in assignments}


def fleet(prefix: str, count: int, template: Template, *, age: float = 1000) -> list[Assignment]:
    """`count` replicas spread over NODES, each a second older than the next."""
    return [
        assign(f"{prefix}{i}", NODES[i % len(NODES)], template=template, age=age + count - i)
        for i in range(count)
    ]


def names(assignments: list[Assignment]) -> list[str]:
    return [a.replica for a in assignments]


# a simulated cluster -------------------------------------------------------------------------


@dataclass
class Cluster:
    record: ServiceRecord
    assignments: list[Assignment]
    statuses: dict[str, ReplicaStatus]
    now: datetime = T0
    live_nodes: set[str] | None = None
    rollout_started: datetime | None = None
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def plan(self) -> Plan:
        return plan(
            self.record,
            self.assignments,
            self.statuses,
            self.live_nodes,
            now=self.now,
            rollout_started=self.rollout_started,
        )

    def apply(self, the_plan: Plan) -> list[str]:
        """Carry out a plan as the deployer and scheduler would; returns the added ids."""
        drain = {a.replica for a in the_plan.drain}
        remove = {a.replica for a in the_plan.forget + the_plan.lost}
        kept = []
        for a in self.assignments:
            if a.replica in remove:
                self.statuses.pop(a.replica, None)
                continue
            kept.append(a.model_copy(update={"draining": True}) if a.replica in drain else a)
        added = []
        for _ in range(the_plan.add):
            n = next(self._ids)
            replica = f"new{n}"
            assert the_plan.template is not None
            kept.append(
                Assignment(
                    replica=replica,
                    service="web",
                    node=NODES[n % len(NODES)],
                    generation=1,
                    template=the_plan.template,
                    assigned_at=self.now,
                )
            )
            self.statuses[replica] = self.status(replica, ReplicaState.STARTING)
            added.append(replica)
        self.assignments = kept
        return added

    def status(self, replica: str, state: ReplicaState, **extra: Any) -> ReplicaStatus:
        return ReplicaStatus(
            replica=replica,
            service="web",
            node="n1",
            generation=1,
            state=state,
            updated_at=self.now,
            **extra,
        )

    def become_ready(self, replicas: list[str] | None = None) -> None:
        """The given replicas (default: all starting ones) pass their probe now."""
        for replica, st in list(self.statuses.items()):
            if replicas is None and st.state != ReplicaState.STARTING:
                continue
            if replicas is not None and replica not in replicas:
                continue
            self.statuses[replica] = st.model_copy(
                update={"state": ReplicaState.HEALTHY, "ready": True, "ready_at": self.now}
            )

    def stop_draining(self) -> None:
        """Agents stop every draining replica."""
        for a in self.assignments:
            if a.draining:
                self.statuses[a.replica] = self.status(a.replica, ReplicaState.STOPPED)

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def active(self, template: Template | None = None) -> list[Assignment]:
        return [
            a
            for a in self.assignments
            if not a.draining and (template is None or a.template == template)
        ]

    def available(self, template: Template, min_healthy: float) -> int:
        """Active replicas that serve: ready old ones, and new ones ready for min_healthy."""
        count = 0
        for a in self.active():
            st = self.statuses.get(a.replica)
            if st is None or not st.ready or st.state not in LIVE_STATES:
                continue
            settled = (
                st.ready_at is not None and (self.now - st.ready_at).total_seconds() >= min_healthy
            )
            if a.template != template or settled:
                count += 1
        return count


def rolling(desired: int, old: int | None = None, **spec: Any) -> Cluster:
    """A cluster of `old` (default `desired`) ready V1 replicas, with V2 now desired."""
    replicas = fleet("old", desired if old is None else old, OLD)
    return Cluster(record(desired, **spec), replicas, healthy(*replicas))


# the rolling update, step by step ------------------------------------------------------------


def test_twenty_replicas_roll_five_at_a_time() -> None:
    cluster = rolling(20)
    drained_per_round = []
    for _round in range(4):
        # a surge of 25% of 20: five new replicas beside the old ones
        first = cluster.plan()
        assert first.drain == []
        assert first.add == 5
        assert first.failure == ""
        added = cluster.apply(first)
        assert len(cluster.active()) == 25

        # while they start nothing else happens
        waiting = cluster.plan()
        assert waiting.empty
        assert waiting.recheck_after is None
        assert waiting.ready == len(cluster.active(NEW)) - 5

        # ready, but not yet for min_healthy (5s): the plan says when to look again
        cluster.become_ready(added)
        settling = cluster.plan()
        assert settling.empty
        assert settling.recheck_after == pytest.approx(5.0)
        assert settling.ready == len(cluster.active(NEW))
        cluster.advance(3)
        assert cluster.plan().recheck_after == pytest.approx(2.0)
        cluster.advance(2)

        # settled: five old replicas go, nothing is added in the same plan
        replacing = cluster.plan()
        assert replacing.add == 0
        assert replacing.recheck_after is None
        assert all(a.template == OLD for a in replacing.drain)
        drained_per_round.append(len(replacing.drain))
        cluster.apply(replacing)
        cluster.stop_draining()
        assert len(cluster.active()) == 20
        forgetting = cluster.plan()
        assert len(forgetting.forget) == 5
        cluster.apply(replace_add(forgetting))

    assert drained_per_round == [5, 5, 5, 5]
    done = cluster.plan()
    assert done.empty
    assert done.old == 0
    assert done.ready == 20
    assert all(a.template == NEW for a in cluster.active())


def replace_add(the_plan: Plan) -> Plan:
    """The same plan with nothing added: lets a test look at one kind of intent at a time."""
    return Plan(drain=the_plan.drain, forget=the_plan.forget, lost=the_plan.lost)


def test_twenty_replicas_next_round_adds_five_once_the_old_are_draining() -> None:
    cluster = rolling(20)
    cluster.apply(cluster.plan())
    cluster.become_ready()
    cluster.advance(5)
    replacing = cluster.plan()
    assert len(replacing.drain) == 5
    cluster.apply(replacing)
    following = cluster.plan()
    # draining replicas no longer count as old: the next five can start at once
    assert following.old == 15
    assert following.add == 5
    assert following.drain == []


def test_old_replicas_go_from_the_most_crowded_node_then_newest() -> None:
    old = [
        assign("a1", "n1", template=OLD, age=50),
        assign("a2", "n1", template=OLD, age=40),
        assign("a3", "n1", template=OLD, age=30),
        assign("b1", "n2", template=OLD, age=10),
    ]
    new = [assign("x", "n3"), assign("y", "n4")]
    result = plan(record(4, update={"max_surge": 2}), old + new, healthy(*old, *new), now=T0)
    assert names(result.drain) == ["a3", "a2"]


@pytest.mark.parametrize(
    ("desired", "surge", "unavailable"),
    [
        (20, "25%", 0),
        (10, 1, 0),
        (10, 0, 1),
        (10, "50%", "50%"),
        (7, "100%", 0),
        (5, 0, "20%"),
        (3, "25%", 0),
        (1, "25%", 0),
        (1, 0, 0),
        (6, 2, 2),
    ],
)
def test_rollout_completes_within_its_bounds(desired: int, surge: Any, unavailable: Any) -> None:
    cluster = rolling(desired, update={"max_surge": surge, "max_unavailable": unavailable})
    update = cluster.record.spec.update
    step_surge, step_unavailable = update.steps(desired)
    for _step in range(200):
        the_plan = cluster.plan()
        assert the_plan.failure == ""
        cluster.apply(the_plan)
        assert len(cluster.active()) <= desired + step_surge
        assert cluster.available(NEW, update.min_healthy) >= desired - step_unavailable
        if the_plan.empty and the_plan.old == 0 and the_plan.ready == desired:
            break
        cluster.stop_draining()
        cluster.become_ready()
        if the_plan.recheck_after is not None:
            cluster.advance(the_plan.recheck_after)
    else:
        pytest.fail("the rollout did not finish")
    assert len(cluster.active(NEW)) == desired
    assert cluster.active(OLD) == []


@pytest.mark.parametrize(
    ("desired", "old", "new", "max_surge", "add"),
    [
        (20, 20, 0, "25%", 5),
        (20, 20, 5, "25%", 0),
        (20, 15, 5, "25%", 5),
        (20, 3, 15, "25%", 5),
        (20, 1, 18, "25%", 2),
        (3, 3, 0, "25%", 1),
        (4, 4, 0, "100%", 4),
        (10, 10, 0, 3, 3),
        (10, 10, 0, "0%", 1),
        (10, 12, 0, "25%", 1),
        (10, 14, 0, "25%", 0),
    ],
)
def test_surge_bounds_what_is_added(
    desired: int, old: int, new: int, max_surge: Any, add: int
) -> None:
    replicas = fleet("old", old, OLD) + fleet("new", new, NEW, age=0)
    result = plan(
        record(desired, update={"max_surge": max_surge}),
        replicas,
        healthy(*replicas, ready_for=0),
        now=T0,
    )
    assert result.add == add
    assert result.old == old


# max_unavailable and min_healthy --------------------------------------------------------------


def test_max_unavailable_drains_ready_old_replicas_at_once() -> None:
    cluster = rolling(10, update={"max_surge": 0, "max_unavailable": 3})
    first = cluster.plan()
    assert len(first.drain) == 3
    assert first.add == 0
    cluster.apply(first)
    second = cluster.plan()
    assert second.add == 3
    assert second.drain == []
    assert second.old == 7


def test_recreate_with_max_unavailable_of_all() -> None:
    cluster = rolling(4, update={"max_unavailable": "100%"})
    first = cluster.plan()
    assert sorted(names(first.drain)) == ["old0", "old1", "old2", "old3"]
    # the surge (25% of 4) still bounds the first step while the old ones are active
    assert first.add == 1
    cluster.apply(first)
    second = cluster.plan()
    assert second.old == 0
    assert second.add == 3


def test_max_unavailable_together_with_surge() -> None:
    cluster = rolling(8, update={"max_surge": 2, "max_unavailable": 2})
    first = cluster.plan()
    assert first.add == 2
    assert len(first.drain) == 2


@pytest.mark.parametrize(
    ("ready_for", "min_healthy", "recheck", "drained"),
    [
        (0, 10, 10.0, 0),
        (4, 10, 6.0, 0),
        (9.5, 10, 0.5, 0),
        (10, 10, None, 1),
        (15, 10, None, 1),
        (0, 0, None, 1),
        (0, "500ms", 0.5, 0),
        (1, "500ms", None, 1),
        (30, "1m", 30.0, 0),
    ],
)
def test_min_healthy_before_an_old_replica_goes(
    ready_for: float, min_healthy: Any, recheck: float | None, drained: int
) -> None:
    old = fleet("old", 2, OLD)
    new = [assign("new0")]
    statuses = healthy(*old) | healthy(*new, ready_for=ready_for)
    result = plan(record(2, update={"min_healthy": min_healthy}), old + new, statuses, now=T0)
    if recheck is None:
        assert result.recheck_after is None
    else:
        assert result.recheck_after == pytest.approx(recheck)
    assert len(result.drain) == drained
    assert result.ready == 1


def test_recheck_after_is_the_soonest_window_to_end() -> None:
    old = fleet("old", 4, OLD)
    new = [assign("a"), assign("b"), assign("c")]
    statuses = (
        healthy(*old)
        | healthy(new[0], ready_for=1)
        | healthy(new[1], ready_for=3)
        | healthy(new[2], ready_for=60)
    )
    result = plan(record(4, update={"max_surge": 3}), old + new, statuses, now=T0)
    assert result.recheck_after == pytest.approx(2.0)
    # one new replica is settled, so one old one may go
    assert len(result.drain) == 1


def test_ready_without_a_ready_time_waits_the_whole_window() -> None:
    old = fleet("old", 1, OLD)
    new = assign("new0")
    statuses = healthy(*old) | {
        "new0": status("new0", ReplicaState.HEALTHY).model_copy(update={"ready": True})
    }
    result = plan(record(1), [*old, new], statuses, now=T0)
    assert result.recheck_after == pytest.approx(5.0)
    assert result.drain == []
    assert result.ready == 1


@pytest.mark.parametrize(
    "new_status",
    [
        status("new0", ReplicaState.RUNNING),
        status("new0", ReplicaState.STARTING),
        status("new0", ReplicaState.PENDING),
        status("new0", ReplicaState.UNHEALTHY),
        # ready, yet no longer in a live state
        status("new0", ReplicaState.STOPPING, ready_for=3600),
    ],
    ids=["running", "starting", "pending", "unhealthy", "stopping"],
)
def test_new_replicas_that_are_not_ready_do_not_replace_old_ones(
    new_status: ReplicaStatus,
) -> None:
    old = fleet("old", 2, OLD)
    statuses = healthy(*old) | {"new0": new_status}
    result = plan(record(2), [*old, assign("new0")], statuses, now=T0)
    assert result.drain == []
    assert result.ready == 0
    assert result.recheck_after is None
    assert result.add == 0


def test_old_replicas_that_are_not_ready_are_drained_first() -> None:
    ready_old = [assign("r1", "n1", template=OLD), assign("r2", "n2", template=OLD)]
    unready = [
        assign("u-running", "n3", template=OLD),
        assign("u-failed", "n3", template=OLD),
        assign("u-unknown", "n4", template=OLD),
    ]
    statuses = healthy(*ready_old) | {
        "u-running": status("u-running"),
        "u-failed": status("u-failed", ReplicaState.FAILED, exit_code=1),
    }
    result = plan(record(5), ready_old + unready, statuses, now=T0)
    assert sorted(names(result.drain)) == ["u-failed", "u-running", "u-unknown"]
    # 5 desired, 5 old still active in this plan: the surge of 2 bounds the add
    assert result.add == 2
    assert result.old == 5


def test_old_unready_go_even_when_max_unavailable_is_zero_and_ready_old_wait() -> None:
    ready_old = fleet("old", 3, OLD)
    unready = assign("sick", "n4", template=OLD)
    new = [assign("new0")]
    statuses = healthy(*ready_old) | {"sick": status("sick")} | healthy(*new, ready_for=60)
    result = plan(record(4), [*ready_old, unready, *new], statuses, now=T0)
    # available: 3 ready old + 1 settled new = 4 = desired: none of the ready old may go
    assert names(result.drain) == ["sick"]


# scaling during a rollout ------------------------------------------------------------------


def test_scale_up_during_a_rollout() -> None:
    old = fleet("old", 3, OLD)
    new = [assign("new0")]
    statuses = healthy(*old) | starting(*new)
    result = plan(record(6), old + new, statuses, now=T0)
    # surge: 25% of 6 rounds up to 2; 6 + 2 - 1 new - 3 old = 4
    assert result.add == 4
    assert result.drain == []


def test_scale_down_during_a_rollout_drains_old_beyond_the_new_count() -> None:
    old = fleet("old", 5, OLD)
    new = [assign("new0")]
    statuses = healthy(*old) | healthy(*new, ready_for=60)
    result = plan(record(2), old + new, statuses, now=T0)
    # available: 5 old + 1 settled = 6; 2 must stay available, so four old ones go
    assert len(result.drain) == 4
    assert all(a.template == OLD for a in result.drain)
    assert result.add == 0


def test_scale_down_during_a_rollout_drains_surplus_new_replicas() -> None:
    old = fleet("old", 2, OLD)
    new = [assign("a", "n1", age=3), assign("b", "n2", age=2), assign("c", "n3", age=1)]
    statuses = healthy(*old) | healthy(*new, ready_for=60)
    result = plan(record(2), old + new, statuses, now=T0)
    assert sorted(names(result.drain)) == ["c", "old0", "old1"]
    assert result.add == 0


def test_scale_down_during_a_rollout_keeps_max_unavailable() -> None:
    """Source bug: the surplus new replica drained on scale-in is chosen by state (RUNNING
    counts as live, ready or not), yet the old ones are then drained as if every settled new
    replica stayed. Here s2 (settled) and o1 (ready, old) both go, leaving s1 ready and u1
    not ready: one available replica of 2 desired with max_unavailable 0."""
    replicas = [
        assign("s1", "n1", age=30),
        assign("s2", "n1", age=20),
        assign("u1", "n2", age=1),
        assign("o1", "n3", template=OLD, age=100),
    ]
    statuses = healthy(replicas[0], replicas[1], ready_for=20) | {"u1": status("u1")}
    statuses |= healthy(replicas[3])
    result = plan(record(2), replicas, statuses, now=T0)
    drained = set(names(result.drain))
    still_ready = [
        a.replica for a in replicas if a.replica not in drained and statuses[a.replica].ready
    ]
    assert len(still_ready) >= 2, f"drained {sorted(drained)}; only {still_ready} stay ready"


@pytest.mark.parametrize("rescale", [2, 4, 16, 30])
def test_rescaled_mid_rollout_the_rollout_still_completes(rescale: int) -> None:
    cluster = rolling(10)
    for _step in range(3):
        the_plan = cluster.plan()
        cluster.apply(the_plan)
        cluster.stop_draining()
        cluster.become_ready()
        cluster.advance(the_plan.recheck_after or 0)
    assert cluster.active(OLD)
    cluster.record = record(rescale)
    surge, _ = cluster.record.spec.update.steps(rescale)
    largest = len(cluster.active())
    for _step in range(200):
        the_plan = cluster.plan()
        assert the_plan.failure == ""
        cluster.apply(the_plan)
        assert cluster.available(NEW, 5.0) >= min(rescale, 10)
        assert len(cluster.active()) <= max(largest, rescale + surge)
        if the_plan.empty and the_plan.old == 0 and the_plan.ready == rescale:
            break
        cluster.stop_draining()
        cluster.become_ready()
        cluster.advance(the_plan.recheck_after or 0)
    else:
        pytest.fail("the rollout did not finish")
    assert len(cluster.active(NEW)) == rescale
    assert cluster.active(OLD) == []


def test_desired_zero_during_a_rollout_drains_everything() -> None:
    old = fleet("old", 3, OLD)
    new = fleet("new", 2, NEW, age=0)
    statuses = healthy(*old) | healthy(*new[:1], ready_for=1) | starting(*new[1:])
    result = plan(record(0), old + new, statuses, now=T0)
    assert sorted(names(result.drain)) == ["new0", "new1", "old0", "old1", "old2"]
    assert result.add == 0
    assert result.failure == ""


def test_desired_zero_during_a_canary_drains_everything() -> None:
    old = fleet("old", 3, OLD)
    new = fleet("new", 1, NEW, age=0)
    statuses = healthy(*old) | healthy(*new)
    result = plan(record(0, update={"canary": 1}), old + new, statuses, now=T0)
    assert sorted(names(result.drain)) == ["new0", "old0", "old1", "old2"]
    assert result.add == 0


# failure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("crashed", "detail"),
    [
        (status("new0", ReplicaState.FAILED, exit_code=3), "exit code 3"),
        (status("new0", ReplicaState.FAILED, message="image not found"), "image not found"),
        (status("new0", ReplicaState.EXITED, exit_code=0), "exit code 0"),
        (status("new0", ReplicaState.EXITED), "exited"),
        (status("new0", ReplicaState.RUNNING, restarts=1), "running"),
        (status("new0", ReplicaState.HEALTHY, ready_for=60, restarts=2), "healthy"),
        (status("new0", ReplicaState.STARTING, restarts=1, message="OOM"), "OOM"),
    ],
    ids=["failed", "failed-message", "exited-0", "exited", "restarted", "healthy", "starting"],
)
def test_a_crashed_new_replica_fails_the_rollout(crashed: ReplicaStatus, detail: str) -> None:
    old = fleet("old", 3, OLD)
    new = [assign("new0"), assign("new1")]
    statuses = healthy(*old) | healthy(new[1], ready_for=60) | {"new0": crashed}
    result = plan(record(3), old + new, statuses, now=T0, rollout_started=STARTED)
    assert result.failure == f"replica new0 crashed ({detail})"
    # the plan holds: nothing added, nothing drained
    assert result.add == 0
    assert result.drain == []
    assert result.old == 3
    assert result.template == NEW


def test_a_failed_rollout_still_forgets_stopped_and_lost_replicas() -> None:
    old = fleet("old", 3, OLD)
    unready_old = assign("sick", "n2", template=OLD)
    stopped = assign("gone", "n1", template=OLD, draining=True)
    on_dead = assign("dead-old", "dead", template=OLD)
    new = [assign("new0")]
    statuses = (
        healthy(*old)
        | {"sick": status("sick")}
        | {"gone": status("gone", ReplicaState.STOPPED)}
        | healthy(on_dead)
        | {"new0": status("new0", ReplicaState.FAILED, exit_code=1)}
    )
    result = plan(
        record(3),
        [*old, unready_old, stopped, on_dead, *new],
        statuses,
        set(NODES),
        now=T0,
        rollout_started=STARTED,
    )
    assert result.failure.startswith("replica new0 crashed")
    assert names(result.forget) == ["gone"]
    assert names(result.lost) == ["dead-old"]
    # even the unready old replica is held
    assert result.drain == []
    assert result.add == 0


def test_crashed_old_replicas_do_not_fail_the_rollout() -> None:
    old = fleet("old", 2, OLD)
    statuses = healthy(old[0]) | {"old1": status("old1", ReplicaState.FAILED, restarts=4)}
    result = plan(record(2), old, statuses, now=T0)
    assert result.failure == ""
    assert names(result.drain) == ["old1"]


@pytest.mark.parametrize(
    ("elapsed", "deadline", "failed"),
    [
        (299, None, False),
        (300, None, False),
        (301, None, True),
        (59, "1m", False),
        (61, "1m", True),
        (91, "1m30s", True),
        (3600, "2h", False),
    ],
)
def test_progress_deadline(elapsed: float, deadline: str | None, failed: bool) -> None:
    update = {} if deadline is None else {"progress_deadline": deadline}
    old = fleet("old", 3, OLD)
    new = [assign("new0"), assign("new1")]
    statuses = healthy(*old) | healthy(new[0], ready_for=1) | starting(new[1])
    result = plan(
        record(3, update=update),
        old + new,
        statuses,
        now=T0,
        rollout_started=T0 - timedelta(seconds=elapsed),
    )
    if failed:
        limit = (
            300 if deadline is None else int(record(update=update).spec.update.progress_deadline)
        )
        assert result.failure == (
            f"not ready within the progress deadline of {limit}s (1 of 3 new replicas ready)"
        )
        assert result.add == 0
        assert result.drain == []
    else:
        assert result.failure == ""


def test_no_progress_deadline_without_a_rollout_start() -> None:
    old = fleet("old", 3, OLD)
    result = plan(record(3), old, healthy(*old), now=T0 + timedelta(days=30))
    assert result.failure == ""
    assert result.add == 1


def test_a_crash_is_reported_before_the_deadline() -> None:
    old = fleet("old", 1, OLD)
    new = assign("new0")
    statuses = healthy(*old) | {"new0": status("new0", ReplicaState.EXITED, exit_code=2)}
    result = plan(record(1), [*old, new], statuses, now=T0, rollout_started=T0 - timedelta(hours=1))
    assert result.failure == "replica new0 crashed (exit code 2)"


def test_the_simulated_rollout_holds_once_a_new_replica_crashes() -> None:
    cluster = rolling(8)
    cluster.rollout_started = STARTED
    added = cluster.apply(cluster.plan())
    assert len(added) == 2
    cluster.become_ready(added[:1])
    cluster.statuses[added[1]] = cluster.status(added[1], ReplicaState.FAILED, exit_code=137)
    cluster.advance(60)
    for _ in range(3):
        held = cluster.plan()
        assert held.failure == f"replica {added[1]} crashed (exit code 137)"
        assert held.empty
        cluster.apply(held)
    assert len(cluster.active(OLD)) == 8


def test_a_recreate_rollout_whose_new_replica_crashes_fails() -> None:
    cluster = rolling(1, update={"max_unavailable": 1})
    cluster.rollout_started = T0
    first = cluster.plan()
    assert names(first.drain) == ["old0"]
    (added,) = cluster.apply(first)
    cluster.stop_draining()
    cluster.statuses[added] = cluster.status(added, ReplicaState.FAILED, exit_code=1)
    cluster.advance(600)
    assert cluster.plan().failure != ""


# rollback -------------------------------------------------------------------------------------


def rollback_record(replicas: int = 3, **spec: Any) -> ServiceRecord:
    """Revision 3 undoes revision 2 (V2): it runs V1 again."""
    return record(replicas, command=V1, revision=3, rollback_of=2, **spec)


def test_rollback_drains_the_crashed_replicas_of_the_bad_revision_at_once() -> None:
    v1 = [assign("v1-a", "n1", template=OLD), assign("v1-b", "n2", template=OLD)]
    v2 = [assign("v2-a", "n3"), assign("v2-b", "n4")]
    statuses = healthy(*v1) | {
        "v2-a": status("v2-a", ReplicaState.FAILED, exit_code=1),
        "v2-b": status("v2-b", ReplicaState.RUNNING, restarts=3),
    }
    result = plan(rollback_record(3), v1 + v2, statuses, now=T0)
    # the V2 replicas are now the old ones; they crash, but crashes of old ones are no failure
    assert result.failure == ""
    assert result.template == OLD
    assert sorted(names(result.drain)) == ["v2-a", "v2-b"]
    assert result.old == 2
    assert result.ready == 2
    # 3 desired, 2 V1 kept, 2 V2 still active in this plan: min(1, 3 + 1 - 2 - 2) = 0
    assert result.add == 0


def test_rollback_rolls_ready_replicas_of_the_bad_revision_back_gradually() -> None:
    cluster = Cluster(rollback_record(4), fleet("v2-", 4, NEW), healthy(*fleet("v2-", 4, NEW)))
    first = cluster.plan()
    assert first.template == OLD
    assert first.old == 4
    assert first.add == 1
    assert first.drain == []
    for _step in range(50):
        the_plan = cluster.plan()
        assert the_plan.failure == ""
        cluster.apply(the_plan)
        if the_plan.empty and the_plan.old == 0:
            break
        cluster.stop_draining()
        cluster.become_ready()
        cluster.advance(the_plan.recheck_after or 0)
    assert len(cluster.active(OLD)) == 4
    assert cluster.active(NEW) == []


def test_a_rollback_can_fail_too() -> None:
    v2 = fleet("v2-", 2, NEW)
    v1 = assign("v1-a", template=OLD)
    statuses = healthy(*v2) | {"v1-a": status("v1-a", ReplicaState.FAILED, exit_code=1)}
    result = plan(rollback_record(2), [*v2, v1], statuses, now=T0, rollout_started=STARTED)
    assert result.failure == "replica v1-a crashed (exit code 1)"
    assert result.empty


def test_rollback_skips_the_canary() -> None:
    v2 = fleet("v2-", 8, NEW)
    result = plan(rollback_record(8, update={"canary": 1}), v2, healthy(*v2), now=T0)
    # a full surge (25% of 8), not a single canary, and never paused
    assert result.add == 2
    assert not result.paused


# canary ---------------------------------------------------------------------------------------


def canary_cluster(desired: int = 10, canary: int = 2, **kwargs: Any) -> Cluster:
    replicas = fleet("old", desired, OLD)
    return Cluster(
        record(desired, update={"canary": canary}, **kwargs), replicas, healthy(*replicas)
    )


def test_canary_starts_its_replicas_then_pauses_once_settled() -> None:
    cluster = canary_cluster(10, 2)
    first = cluster.plan()
    assert first.add == 2
    assert first.drain == []
    assert not first.paused
    added = cluster.apply(first)

    starting_up = cluster.plan()
    assert starting_up.empty
    assert not starting_up.paused

    cluster.become_ready(added[:1])
    one_ready = cluster.plan()
    assert one_ready.ready == 1
    assert not one_ready.paused

    cluster.become_ready(added)
    cluster.advance(1)
    settling = cluster.plan()
    assert not settling.paused
    assert settling.recheck_after == pytest.approx(4.0)

    cluster.advance(4)
    for _ in range(3):
        paused = cluster.plan()
        assert paused.paused
        assert paused.empty
        assert paused.ready == 2
        assert paused.old == 10
        assert paused.recheck_after is None
    # every old replica still runs beside the canary
    assert len(cluster.active(OLD)) == 10


def test_promoted_canary_proceeds_as_a_rolling_update() -> None:
    cluster = canary_cluster(10, 2)
    cluster.apply(cluster.plan())
    cluster.become_ready()
    cluster.advance(5)
    assert cluster.plan().paused
    cluster.record = cluster.record.model_copy(update={"promoted_revision": 2})
    promoted = cluster.plan()
    assert not promoted.paused
    # surge: 25% of 10 rounds up to 3; 10 + 3 - 2 new - 10 old = 1
    assert promoted.add == 1
    # available: 10 old + 2 settled = 12, 10 must stay: two old replicas go
    assert len(promoted.drain) == 2
    assert all(a.template == OLD for a in promoted.drain)
    for _step in range(100):
        the_plan = cluster.plan()
        assert not the_plan.paused
        cluster.apply(the_plan)
        if the_plan.empty and the_plan.old == 0:
            break
        cluster.stop_draining()
        cluster.become_ready()
        cluster.advance(the_plan.recheck_after or 0)
    assert len(cluster.active(NEW)) == 10
    assert cluster.active(OLD) == []


def test_promotion_of_an_earlier_revision_does_not_promote_this_one() -> None:
    cluster = canary_cluster(10, 2, promoted=1)
    assert cluster.plan().add == 2
    cluster.apply(cluster.plan())
    cluster.become_ready()
    cluster.advance(5)
    assert cluster.plan().paused


@pytest.mark.parametrize(
    ("desired", "canary", "add"),
    [(10, 1, 1), (10, 3, 3), (3, 5, 3), (1, 1, 1)],
)
def test_canary_is_at_most_the_desired_count(desired: int, canary: int, add: int) -> None:
    result = canary_cluster(desired, canary).plan()
    assert result.add == add
    assert result.drain == []


def test_canary_with_every_replica_pauses_beside_all_old_ones() -> None:
    old = fleet("old", 3, OLD)
    new = fleet("new", 3, NEW, age=0)
    result = plan(record(3, update={"canary": 5}), old + new, healthy(*old, *new), now=T0)
    assert result.paused
    assert result.drain == []
    assert result.old == 3


def test_canary_drains_old_replicas_beyond_the_desired_count_only() -> None:
    old = fleet("old", 4, OLD)
    statuses = healthy(*old[:3]) | {"old3": status("old3")}
    result = plan(record(2, update={"canary": 1}), old, statuses, now=T0)
    assert len(result.drain) == 2
    # not ready goes first
    assert "old3" in names(result.drain)
    assert result.add == 1


def test_canary_keeps_unready_old_replicas_within_the_desired_count() -> None:
    old = fleet("old", 3, OLD)
    statuses = healthy(old[0]) | {"old1": status("old1"), "old2": status("old2")}
    result = plan(record(3, update={"canary": 1}), old, statuses, now=T0)
    assert result.drain == []
    assert result.add == 1


def test_canary_lowered_drains_surplus_new_replicas() -> None:
    old = fleet("old", 4, OLD)
    new = fleet("new", 3, NEW, age=0)
    result = plan(record(4, update={"canary": 1}), old + new, healthy(*old, *new), now=T0)
    assert len(result.drain) == 2
    assert all(a.template == NEW for a in result.drain)
    assert result.paused


def test_a_crashing_canary_fails_the_rollout() -> None:
    old = fleet("old", 4, OLD)
    statuses = healthy(*old) | {"new0": status("new0", ReplicaState.RUNNING, restarts=1)}
    result = plan(
        record(4, update={"canary": 1}),
        [*old, assign("new0")],
        statuses,
        now=T0,
        rollout_started=STARTED,
    )
    assert result.failure == "replica new0 crashed (running)"
    assert not result.paused
    assert result.empty


def test_canary_without_old_replicas_is_a_plain_deploy() -> None:
    result = plan(record(4, update={"canary": 1}), [], {}, now=T0)
    assert result.add == 4
    assert not result.paused


# node loss ------------------------------------------------------------------------------------


def test_lost_and_forgotten_replicas_on_dead_nodes() -> None:
    active = assign("active", "dead")
    leaving = assign("leaving", "dead", draining=True)
    alive = [assign("a", "n1"), assign("b", "n2")]
    statuses = healthy(active, leaving, *alive)
    result = plan(record(3), [active, leaving, *alive], statuses, {"n1", "n2"}, now=T0)
    assert names(result.lost) == ["active"]
    assert names(result.forget) == ["leaving"]
    assert result.add == 1
    assert result.drain == []
    assert result.ready == 2


def test_without_live_nodes_nothing_is_judged_lost() -> None:
    replicas = [assign("a", "dead"), assign("b", "dead", draining=True)]
    statuses = healthy(*replicas)
    result = plan(record(1), replicas, statuses, None, now=T0)
    assert result.lost == []
    assert result.forget == []
    assert result.empty


def test_every_node_lost_replaces_every_replica() -> None:
    replicas = fleet("new", 4, NEW)
    result = plan(record(4), replicas, healthy(*replicas), set(), now=T0)
    assert sorted(names(result.lost)) == ["new0", "new1", "new2", "new3"]
    assert result.add == 4
    assert result.ready == 0


def test_lost_old_replicas_during_a_rollout_make_room_for_new_ones() -> None:
    old = [
        assign("o1", "dead", template=OLD),
        assign("o2", "dead", template=OLD),
        assign("o3", "n1", template=OLD),
        assign("o4", "n2", template=OLD),
    ]
    result = plan(record(4), old, healthy(*old), {"n1", "n2"}, now=T0)
    assert sorted(names(result.lost)) == ["o1", "o2"]
    assert result.old == 2
    # surge 1: 4 + 1 - 0 new - 2 old = 3
    assert result.add == 3
    assert result.drain == []


def test_lost_new_replicas_during_a_rollout_are_replaced() -> None:
    old = fleet("old", 4, OLD)
    new = [assign("gone-new", "dead")]
    result = plan(record(4), old + new, healthy(*old) | starting(*new), set(NODES), now=T0)
    assert names(result.lost) == ["gone-new"]
    assert result.add == 1
    assert result.ready == 0


def test_lost_replicas_are_reported_while_a_canary_is_paused() -> None:
    old = [*fleet("old", 3, OLD), assign("lost-old", "dead", template=OLD)]
    new = [assign("canary", "n1")]
    result = plan(
        record(4, update={"canary": 1}),
        old + new,
        healthy(*old, *new),
        set(NODES),
        now=T0,
    )
    assert names(result.lost) == ["lost-old"]
    assert result.paused
    assert result.old == 3
