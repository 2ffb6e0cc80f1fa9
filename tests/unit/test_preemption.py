"""Preemption, pure: who is evicted for a class that did not fit, and where it then goes."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest

from corral.schemas.placement import Eviction
from corral.schemas.spec import Affinity
from corral.workers.scheduler.placement import ClassRequest, NodeTable, NodeView, solve_batch
from corral.workers.scheduler.preempting import still_unplaced
from corral.workers.scheduler.preemption import (
    NodePlan,
    Running,
    preempt,
    preempt_batch,
)


def cluster(
    nodes: dict[str, float],
    running: list[Running],
    *,
    labels: dict[str, dict[str, str]] | None = None,
    gpus: dict[str, float] | None = None,
    ready: set[str] | None = None,
    avoids: dict[str, tuple[str, ...]] | None = None,
) -> NodeTable:
    """A table of nodes (id -> cpu) holding `running`."""
    views = []
    for node_id, cpu in nodes.items():
        mine = [r for r in running if r.node == node_id]
        allocated: dict[str, float] = {}
        for r in mine:
            for resource, amount in r.resources.items():
                allocated[resource] = allocated.get(resource, 0.0) + amount
        capacity = {"cpu": cpu, "memory": 64.0}
        if gpus and node_id in gpus:
            capacity["gpu"] = gpus[node_id]
        views.append(
            NodeView(
                id=node_id,
                labels=(labels or {}).get(node_id, {}),
                capacity=capacity,
                allocated=allocated,
                ready=ready is None or node_id in ready,
                total=len(mine),
                services=dict(Counter(r.service for r in mine)),
            )
        )
    return NodeTable.build(views, avoids=avoids)


def fill(service: str, node: str, count: int, priority: int = 0, cpu: float = 1.0) -> list[Running]:
    return [
        Running(f"{service}-{node}-{j}", service, node, priority, {"cpu": cpu})
        for j in range(count)
    ]


def wants(service: str = "hi", count: int = 1, cpu: float = 1.0, **rules: Any) -> ClassRequest:
    return ClassRequest(count=count, resources={"cpu": cpu}, service=service, **rules)


def test_evicts_only_what_makes_room() -> None:
    running = fill("lo", "n0", 4)
    table = cluster({"n0": 4.0}, running)
    got = preempt(wants(priority=100, cpu=2.0), 1, table, running)
    assert got.placed == 1
    [plan] = got.plans
    assert plan.node == "n0"
    assert len(plan.victims) == 2  # two cpus freed for one replica that asks two


def test_equal_or_higher_priority_is_never_a_victim() -> None:
    running = fill("same", "n0", 2, priority=100) + fill("higher", "n1", 2, priority=200)
    table = cluster({"n0": 2.0, "n1": 2.0}, running)
    got = preempt(wants(priority=100), 2, table, running)
    assert got.plans == []
    assert got.placed == 0


def test_no_ping_pong_the_victim_cannot_preempt_back() -> None:
    running = fill("lo", "n0", 2)
    table = cluster({"n0": 2.0}, running)
    first = preempt(wants("hi", count=2, priority=10), 2, table, running)
    assert first.placed == 2
    now = [Running(f"hi-{j}", "hi", "n0", 10, {"cpu": 1.0}) for j in range(2)]
    table = cluster({"n0": 2.0}, now)
    back = preempt(wants("lo", count=2, priority=0), 2, table, now)
    assert back.placed == 0


def test_lowest_priority_victims_go_first_on_a_node() -> None:
    running = fill("mid", "n0", 2, priority=50) + fill("low", "n0", 2, priority=-10)
    table = cluster({"n0": 4.0}, running)
    got = preempt(wants(priority=100, cpu=2.0), 1, table, running)
    assert {v.service for v in got.victims} == {"low"}
    assert len(got.victims) == 2


def test_one_big_victim_beats_many_small_ones_of_the_same_priority() -> None:
    running = [Running("big", "lo", "n0", 0, {"cpu": 4.0})] + [
        Running(f"small-{j}", "lo", "n0", 0, {"cpu": 1.0}) for j in range(4)
    ]
    table = cluster({"n0": 8.0}, running)
    got = preempt(wants(priority=1, cpu=4.0), 1, table, running)
    assert [v.replica for v in got.victims] == ["big"]


def test_prefers_the_node_whose_victims_matter_least() -> None:
    running = fill("mid", "n0", 2, priority=50) + fill("low", "n1", 2, priority=0)
    table = cluster({"n0": 2.0, "n1": 2.0}, running)
    got = preempt(wants(priority=100), 1, table, running)
    assert [p.node for p in got.plans] == ["n1"]


def test_prefers_the_node_needing_the_fewest_evictions() -> None:
    # n0 is full of one-cpu replicas, n1 has a half-free node: one eviction there is enough
    running = fill("lo", "n0", 4) + fill("lo", "n1", 3)
    table = cluster({"n0": 4.0, "n1": 4.0}, running)
    got = preempt(wants(priority=5, cpu=2.0), 1, table, running)
    [plan] = got.plans
    assert plan.node == "n1"
    assert len(plan.victims) == 1


def test_places_as_many_as_a_node_can_take_then_moves_on() -> None:
    running = fill("lo", "n0", 4) + fill("lo", "n1", 4) + fill("lo", "n2", 4)
    table = cluster({"n0": 4.0, "n1": 4.0, "n2": 4.0}, running)
    got = preempt(wants(priority=5, cpu=2.0), 3, table, running)
    assert got.placed == 3
    assert sorted(p.take for p in got.plans) == [1, 2]
    assert len(got.victims) == 6  # exactly the room for three two-cpu replicas
    assert len({v.replica for v in got.victims}) == 6


def test_never_evicts_more_than_the_wanted_replicas_need() -> None:
    running = fill("lo", "n0", 8)
    table = cluster({"n0": 8.0}, running)
    got = preempt(wants(priority=5), 3, table, running)
    assert got.placed == 3
    assert len(got.victims) == 3


def test_max_per_node_caps_what_a_node_takes() -> None:
    running = fill("lo", "n0", 4) + fill("lo", "n1", 4)
    table = cluster({"n0": 4.0, "n1": 4.0}, running)
    got = preempt(wants(priority=5, max_per_node=1), 4, table, running)
    assert got.placed == 2
    assert {p.node: p.take for p in got.plans} == {"n0": 1, "n1": 1}
    assert len(got.victims) == 2


def test_max_per_node_counts_replicas_already_there() -> None:
    running = [*fill("lo", "n0", 3), Running("hi-0", "hi", "n0", 5, {"cpu": 1.0})]
    table = cluster({"n0": 4.0}, running)
    got = preempt(wants(priority=5, max_per_node=1), 1, table, running)
    assert got.plans == []


@pytest.mark.parametrize(
    "rules",
    [
        {"node_selector": {"disk": "ssd"}},
        {"node_affinity": (Affinity(key="disk", operator="In", values=["ssd"]),)},
    ],
)
def test_hard_rules_pick_the_candidate_nodes(rules: dict[str, Any]) -> None:
    running = fill("lo", "n0", 2) + fill("lo", "n1", 2)
    table = cluster({"n0": 2.0, "n1": 2.0}, running, labels={"n1": {"disk": "ssd"}})
    got = preempt(wants(priority=5, **rules), 2, table, running)
    assert {p.node for p in got.plans} == {"n1"}


def test_a_node_running_an_avoided_service_is_no_candidate() -> None:
    running = fill("lo", "n0", 2) + fill("lo", "n1", 1) + fill("db", "n1", 1, priority=9)
    table = cluster({"n0": 2.0, "n1": 2.0}, running, avoids={"hi": ("db",)})
    got = preempt(wants(priority=5), 4, table, running)
    assert {p.node for p in got.plans} == {"n0"}
    assert got.placed == 2


def test_not_ready_nodes_are_no_candidates() -> None:
    running = fill("lo", "n0", 2) + fill("lo", "n1", 2)
    table = cluster({"n0": 2.0, "n1": 2.0}, running, ready={"n1"})
    got = preempt(wants(priority=5), 2, table, running)
    assert {p.node for p in got.plans} == {"n1"}


def test_gpu_room_comes_only_from_gpu_holders() -> None:
    running = [
        Running("train-0", "train", "g0", 0, {"cpu": 1.0, "gpu": 1.0}),
        Running("train-1", "train", "g0", 0, {"cpu": 1.0, "gpu": 1.0}),
        Running("web-0", "web", "g0", 0, {"cpu": 1.0}),
    ]
    table = cluster({"g0": 8.0, "c0": 8.0}, running, gpus={"g0": 2.0})
    request = ClassRequest(count=1, resources={"cpu": 1.0, "gpu": 1.0}, service="hi", priority=9)
    got = preempt(request, 1, table, running)
    [plan] = got.plans
    assert plan.node == "g0"
    assert [v.service for v in plan.victims] == ["train"]


def test_a_resource_no_node_advertises_preempts_nothing() -> None:
    running = fill("lo", "n0", 2)
    table = cluster({"n0": 2.0}, running)
    request = ClassRequest(count=1, resources={"fpga": 1.0}, service="hi", priority=9)
    assert preempt(request, 1, table, running).plans == []


def test_evicting_everything_still_too_small_preempts_nothing() -> None:
    running = fill("lo", "n0", 2)
    table = cluster({"n0": 2.0}, running)
    assert preempt(wants(priority=9, cpu=4.0), 1, table, running).plans == []


def test_overbooked_node_counts_what_is_already_promised() -> None:
    # a preemption already under way left n0 overbooked by 2: its victims still hold the room
    running = fill("lo", "n0", 4)
    table = cluster({"n0": 4.0}, running)
    table.allocated[table.column("cpu"), 0] += 2.0
    got = preempt(wants(priority=5), 1, table, running)
    assert len(got.victims) == 3


def test_commits_evictions_and_placements_into_the_table() -> None:
    running = fill("lo", "n0", 4)
    table = cluster({"n0": 4.0}, running)
    preempt(wants(priority=5, cpu=2.0), 1, table, running)
    col = table.column("cpu")
    assert col is not None
    assert table.allocated[col, 0] == pytest.approx(4.0)
    assert int(table.counts("lo")[0]) == 2
    assert int(table.counts("hi")[0]) == 1
    assert int(table.totals[0]) == 3


def test_batch_higher_priority_first_and_a_replica_is_evicted_once() -> None:
    running = fill("lo", "n0", 4)
    table = cluster({"n0": 4.0}, running)
    first = wants("mid", count=4, priority=10)
    second = wants("top", count=2, priority=20)
    got = preempt_batch([(first, 4), (second, 2)], table, running)
    assert [g.service for g in got] == ["mid", "top"]
    assert got[1].placed == 2
    assert got[0].placed == 2  # what the higher class left
    evicted = [v.replica for g in got for v in g.victims]
    assert len(evicted) == len(set(evicted)) == 4


def test_after_the_normal_solve_only_the_leftovers_preempt() -> None:
    running = fill("lo", "n0", 4) + fill("lo", "n1", 2)
    table = cluster({"n0": 4.0, "n1": 4.0}, running)
    request = wants(count=4, priority=5)
    [solution] = solve_batch([request], table)
    assert solution.placed == 2
    assert solution.unplaced == 2
    got = preempt(request, solution.unplaced, table, running)
    assert got.placed == 2
    assert len(got.victims) == 2


def test_notes_name_victims_and_preemptor() -> None:
    plan = NodePlan("n0", 2, tuple(fill("lo", "n0", 2)) + tuple(fill("batch", "n0", 1, -5)))
    assert plan.note == (
        "preemption: evicted 1 of batch (priority -5), 2 of lo (priority 0) on n0 "
        "to make room for 2"
    )
    eviction = Eviction(
        replica="lo-1", service="lo", node="n0", priority=0, preemptor="hi", preemptor_priority=100
    )
    assert eviction.note == "preempted by hi (priority 100)"


def test_random_clusters_keep_every_invariant() -> None:
    rng = random.Random(7)
    for _ in range(200):
        nodes = {f"n{i}": float(rng.choice([2, 4, 8])) for i in range(rng.randint(1, 6))}
        running: list[Running] = []
        for node_id, cpu in nodes.items():
            used = 0.0
            while True:
                size = float(rng.choice([0.5, 1, 2]))
                if used + size > cpu:
                    break
                used += size
                priority = rng.choice([-5, 0, 5, 10])
                running.append(
                    Running(f"r{len(running)}", f"s{priority}", node_id, priority, {"cpu": size})
                )
        table = cluster(nodes, running)
        before = table.allocated.copy()
        request = wants(count=rng.randint(1, 6), cpu=float(rng.choice([1, 2, 3])), priority=5)
        got = preempt(request, request.count, table, running)
        col = table.column("cpu")
        assert col is not None
        # capacity respected where something was placed; only lower priorities evicted
        for plan in got.plans:
            i = table.ids.index(plan.node)
            assert table.allocated[col, i] <= nodes[plan.node] + 1e-9
            assert all(v.priority < 5 for v in plan.victims)
            assert all(v.node == plan.node for v in plan.victims)
            # minimal: sparing any single victim leaves too little room
            freed = sum(v.resources["cpu"] for v in plan.victims)
            free_before = nodes[plan.node] - before[col, i]
            for v in plan.victims:
                assert (
                    free_before + freed - v.resources["cpu"]
                    < plan.take * request.resources["cpu"] - 1e-9
                )
        assert got.placed <= request.count
        assert np.all(table.allocated >= -1e-9)


def test_the_schedulers_reason_is_recounted_after_a_partial_preemption() -> None:
    reason = "3 of 3 replicas fit no node: 2 nodes lack cpu"
    assert still_unplaced(reason, 1, 2) == (
        "1 of 3 replicas fit no node: 2 nodes lack cpu; preemption placed 2, and no more "
        "lower-priority room fits"
    )
