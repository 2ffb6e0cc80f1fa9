"""The rebalance search sharded by service (without Ray: the shards are searched here, as Ray
tasks would search them): the split keeps linked services together, the merged moves are as
good as one process's on generated clusters, and moves that two shards planned onto the same
room are repaired or dropped, never both kept."""

from __future__ import annotations

import copy
import random
from collections import Counter
from typing import Any

import numpy as np
import pytest

from corral.workers.scheduler.placement import ClassRequest, NodeTable, NodeView, room_for
from corral.workers.scheduler.rebalance import Move, plan_moves
from corral.workers.scheduler.rebalance_shards import groups, merge_moves, split_search
from corral.workers.scheduler.searching import InProcessShards, MoveSearch


def node(id_: str, zone: str, services: dict[str, int] | None = None, cpu: float = 8.0) -> NodeView:
    services = services or {}
    return NodeView(
        id=id_,
        labels={"zone": zone},
        capacity={"cpu": cpu},
        allocated={"cpu": float(sum(services.values()))},
        services=services,
        total=sum(services.values()),
    )


def spread(name: str, **rules: object) -> ClassRequest:
    return ClassRequest(count=0, service=name, resources={"cpu": 1.0}, spread_by="zone", **rules)  # type: ignore[arg-type]


def sharded(table: NodeTable, services: list[ClassRequest], budget: int, shards: int) -> list[Move]:
    search = MoveSearch(above=0, shards=shards, runner=InProcessShards())
    return search.plan_now(table, services, budget).moves


def generated(seed: int, nodes: int = 60, zones: int = 4, services: int = 12) -> list[NodeView]:
    """Services crowded into one or two zones, on nodes of mixed sizes, some nearly full."""
    rng = random.Random(seed)
    per: list[dict[str, int]] = [{} for _ in range(nodes)]
    cpu = [rng.choice([4.0, 8.0, 16.0]) for _ in range(nodes)]
    for s in range(services):
        hot = rng.sample(range(zones), 2)
        for _ in range(rng.randint(5, 40)):
            zone = hot[0] if rng.random() < 0.7 else hot[1]
            choices = [
                i for i in range(nodes) if i % zones == zone and sum(per[i].values()) < cpu[i]
            ]
            if choices:
                i = rng.choice(choices)
                per[i][f"s{s}"] = per[i].get(f"s{s}", 0) + 1
    return [node(f"n{i:03d}", f"z{i % zones}", per[i], cpu[i]) for i in range(nodes)]


def replay(nodes: list[NodeView], services: list[ClassRequest], moves: list[Move]) -> NodeTable:
    """Carry the moves out one by one on the cluster, checking each against the hard rules
    and the room left (independently of the merge's own checks)."""
    table = NodeTable.build(nodes)
    by_name = {s.service: s for s in services}
    position = {n: i for i, n in enumerate(table.ids)}
    for m in moves:
        s = by_name[m.service]
        counts = table.counts(m.service)
        source, target = position[m.source], position[m.target]
        assert counts[source] > 0, f"{m}: no replica left on the source"
        assert room_for(s, table, counts)[target] > 0, f"{m}: no room on the target"
        col = table.column("cpu")
        assert col is not None
        table.allocated[col, source] -= 1.0
        table.allocated[col, target] += 1.0
        table.totals[source] -= 1
        table.totals[target] += 1
        where, take = table.placed[m.service]
        table.placed[m.service] = (
            np.concatenate([where, np.array([source, target], dtype=np.intp)]),
            np.concatenate([take, np.array([-1, 1], dtype=np.int64)]),
        )
    return table


def skew(table: NodeTable, service: str) -> int:
    zone = table.domains("zone")
    per = Counter[int]()
    for i, c in zip(*table.placed.get(service, ([], [])), strict=True):
        per[int(zone[i])] += int(c)
    values = [per.get(z, 0) for z in range(len(table.vocab["zone"]))]
    return max(values) - min(values)


def test_groups_keep_avoiding_services_together_and_binpack_out_of_the_shards() -> None:
    services = [
        spread("a", avoid=("c",)),
        spread("b"),
        spread("c"),
        ClassRequest(count=0, service="p", strategy="binpack"),
        spread("d"),
        ClassRequest(count=0, service="q", strategy="binpack"),
        spread("e"),
    ]
    found = groups(services, {"e": ("d",)})
    assert sorted(found) == [[0, 2], [1], [3], [4, 6], [5]]
    parts = split_search(services, {"e": ("d",)}, 2)
    assert [[s.service for s in part] for part in parts] == [["a", "b", "c"], ["d", "e"]]


def test_split_deals_each_service_once_in_order_and_evenly() -> None:
    services = [spread(f"s{i}") for i in range(10)]
    parts = split_search(services, {}, 3)
    assert sorted(s.service for part in parts for s in part) == sorted(s.service for s in services)
    assert sorted(len(part) for part in parts) == [3, 3, 4]
    for part in parts:
        names = [int(s.service[1:]) for s in part]
        assert names == sorted(names)
    assert len(split_search(services[:1], {}, 4)) == 1  # never an empty shard


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_search_is_as_good_as_one_process(seed: int, shards: int) -> None:
    nodes = generated(seed)
    services = [spread(f"s{s}") for s in range(12)]
    for budget in (5, 40):
        single = plan_moves(NodeTable.build(nodes), services, budget)
        split = sharded(NodeTable.build(nodes), services, budget, shards)
        assert len(split) <= budget
        after_single = replay(nodes, services, single)
        after_split = replay(nodes, services, split)
        total_single = sum(skew(after_single, s.service) for s in services)
        total_split = sum(skew(after_split, s.service) for s in services)
        assert total_split <= total_single, (seed, shards, budget)
        assert len(split) == len(single)
        assert split == single  # on these clusters, exactly one process's moves
        if budget == 5:  # the first moves are the worst skews, as one process picks them
            assert [m.skew for m in split] == [m.skew for m in single]


def test_two_shards_planning_the_last_room_keep_only_one_move() -> None:
    # x and y crowd zone a; zone b has room for one more replica, on b0
    nodes = [
        node("a0", "a", {"x": 4}),
        node("a1", "a", {"y": 4}),
        node("b0", "b", {"z": 7}),
    ]
    services = [spread("x"), spread("y")]
    table = NodeTable.build(nodes)
    parts = split_search(services, {}, 2)
    assert [[s.service for s in part] for part in parts] == [["x"], ["y"]]
    answers = [plan_moves(table, part, 10) for part in parts]
    assert [m.target for a in answers for m in a] == ["b0", "b0"]  # each shard took it
    merged = merge_moves(table, services, answers, 10)
    assert [(m.service, m.target) for m in merged.moves] == [("x", "b0")]
    assert merged.dropped == 1
    assert merged.moves == plan_moves(table, services, 10)
    replay(nodes, services, merged.moves)


def test_a_conflicting_move_is_repaired_onto_other_room() -> None:
    # both shards pick b0 (least loaded in zone b); b1 also has room: y moves there instead
    nodes = [
        node("a0", "a", {"x": 4}),
        node("a1", "a", {"y": 4}),
        node("b0", "b", {"z": 7}),
        node("b1", "b", {"z": 7, "w": 0}, cpu=9.0),
    ]
    services = [spread("x"), spread("y")]
    table = NodeTable.build(nodes)
    answers = [plan_moves(table, [s], 10) for s in services]
    assert [m.target for a in answers for m in a][:1] == ["b0"]
    assert answers[1][0].target == "b0"
    merged = merge_moves(table, services, answers, 10)
    assert [(m.service, m.target) for m in merged.moves][:2] == [("x", "b0"), ("y", "b1")]
    assert merged.repaired == 1
    assert merged.moves == plan_moves(table, services, 10)
    replay(nodes, services, merged.moves)


def test_binpack_runs_after_the_merge_on_where_the_spread_moves_landed() -> None:
    # web's move to zone b picks n1 (the least loaded there): searched alone, binpack would
    # free n1, but one process (and the merge) sees web there and leaves it
    nodes = [
        node("a0", "a", {"web": 4}),
        node("a1", "a", {"api": 4}),
        node("n0", "b", {"batch": 5}),
        node("n1", "b", {"batch": 1}),
    ]
    batch = ClassRequest(count=0, service="batch", resources={"cpu": 1.0}, strategy="binpack")
    services = [spread("web"), spread("api"), batch]
    table = NodeTable.build(nodes)
    assert [m.source for m in plan_moves(table, [batch], 10)] == ["n1"]
    parts = split_search(services, {}, 2)
    assert [[s.service for s in part] for part in parts] == [["web"], ["api"]]
    merged = merge_moves(table, services, [plan_moves(table, part, 10) for part in parts], 10)
    assert merged.moves == plan_moves(table, services, 10)
    assert "n1" in {m.target for m in merged.moves}
    assert all(m.service != "batch" for m in merged.moves)


def test_binpack_moves_are_whole_nodes_within_the_budget() -> None:
    nodes = [
        node("n0", "a", {"batch": 4}),
        node("n1", "a", {"batch": 2}),
        node("n2", "a", {"batch": 1}),
    ]
    batch = ClassRequest(count=0, service="batch", resources={"cpu": 1.0}, strategy="binpack")
    services = [batch, spread("web")]
    table = NodeTable.build(nodes)
    for budget in (1, 2, 3):
        got = sharded(table, services, budget, 2)
        assert got == plan_moves(table, services, budget)
    assert {m.source for m in sharded(table, services, 3, 2)} == {"n1", "n2"}


def test_small_clusters_are_searched_in_one_process() -> None:
    nodes = [node("a0", "a", {"web": 6}), node("b0", "b")]
    table = NodeTable.build(nodes)
    search = MoveSearch(above=6, shards=2, runner=InProcessShards())
    found = search.plan_now(table, [spread("web"), spread("other")], 5)
    assert (found.shards, search.used) == (0, 0)
    assert len(found.moves) == 3
    bigger = MoveSearch(above=5, shards=2, runner=InProcessShards())
    again = bigger.plan_now(copy.deepcopy(table), [spread("web"), spread("other")], 5)
    assert (again.shards, bigger.used) == (2, 1)
    assert again.moves == found.moves


class Broken:
    """A runner whose Ray never starts."""

    def width(self) -> int:
        raise ConnectionError("could not reach the Ray cluster at 10.0.0.1:6379\nmore")

    def run(self, table: NodeTable, parts: list[list[ClassRequest]], budget: int) -> list[Any]:
        raise AssertionError("not reached")

    async def close(self) -> None:
        return None


def test_a_ray_that_does_not_start_falls_back_to_one_process() -> None:
    nodes = [node("a0", "a", {"web": 6}), node("b0", "b")]
    table = NodeTable.build(nodes)
    search = MoveSearch(above=0, runner=Broken())
    found = search.plan_now(table, [spread("web"), spread("api")], 5)
    assert found.moves == plan_moves(table, [spread("web"), spread("api")], 5)
    assert found.fallback == "ConnectionError: could not reach the Ray cluster at 10.0.0.1:6379"
    assert (found.shards, search.used) == (0, 0)


@pytest.mark.parametrize("seed", range(6))
def test_mixed_spread_binpack_and_avoid_is_as_good_as_one_process(seed: int) -> None:
    """Spread services (two of them avoiding each other) on one pool, binpack services
    scattered thinly over another: the same skew and at least as many nodes freed."""
    rng = random.Random(seed)
    nodes = generated(seed, nodes=48, zones=3, services=6)
    for i in range(16):
        services: dict[str, int] = {}
        for p in range(3):
            if rng.random() < 0.5:
                services[f"p{p}"] = rng.randint(1, 2)
        nodes.append(node(f"q{i:02d}", f"z{i % 3}", services, cpu=8.0))
    spreads = [spread(f"s{s}") for s in range(6)]
    spreads[1] = spread("s1", avoid=("s4",))
    packs = [
        ClassRequest(count=0, service=f"p{p}", resources={"cpu": 1.0}, strategy="binpack")
        for p in range(3)
    ]
    services_ = [*spreads, *packs]
    for budget in (6, 300):  # 300: spread runs out of moves, binpack frees nodes
        table = NodeTable.build(nodes)
        single = plan_moves(table, services_, budget)
        split = sharded(NodeTable.build(nodes), services_, budget, 3)
        assert len(split) <= budget
        after_single = replay(nodes, services_, single)
        after_split = replay(nodes, services_, split)
        for after in (after_single, after_split):
            assert (after.used("cpu") <= after.capacity[after.column("cpu") or 0]).all()
        freed_single = int(((table.totals > 0) & (after_single.totals == 0)).sum())
        freed_split = int(((table.totals > 0) & (after_split.totals == 0)).sum())
        assert freed_split >= freed_single, (seed, budget)
        skew_single = sum(skew(after_single, s.service) for s in spreads)
        skew_split = sum(skew(after_split, s.service) for s in spreads)
        assert skew_split <= skew_single, (seed, budget)
        assert split == single
