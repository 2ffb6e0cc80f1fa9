"""Sharding a batch: the split, merge-and-repair, evenness across shards (without Ray: the
shards are solved here, as Ray tasks would solve them), and Ray staying unimported."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

from corral.workers.scheduler.executors import Sharded, placements
from corral.workers.scheduler.placement import (
    ClassRequest,
    Group,
    NodeTable,
    NodeView,
    solve_batch,
)
from corral.workers.scheduler.sharding import Shard, deal, merge, pack, solve_shard, split

GiB = float(2**30)


def cluster(n: int, zones: int = 3, seed: int = 0) -> list[NodeView]:
    rng = random.Random(seed)
    return [
        NodeView(
            id=f"n{i:04d}",
            labels={"zone": f"z{i % zones}", "pool": "gpu" if i % 7 == 0 else "cpu"},
            capacity={"cpu": rng.choice([8.0, 16.0, 32.0]), "memory": 64 * GiB},
            allocated={},
        )
        for i in range(n)
    ]


def sharded(table: NodeTable, classes: list[ClassRequest], shards: int) -> list:
    plan = split(table, classes, shards)
    answers = [solve_shard(table.shard(s.rows), s.units) for s in plan]
    return merge(table, classes, plan, answers)


def test_deal_gives_every_shard_the_same_zone_mix() -> None:
    table = NodeTable.build(cluster(30, zones=3))
    rows = deal(table, 2, ["zone"])
    zone = table.domains("zone")
    assert sorted(np.concatenate(rows).tolist()) == list(range(30))
    for part in rows:
        counts = np.bincount(zone[part], minlength=3)
        assert counts.max() - counts.min() <= 1


def parts_of(plan: list[Shard], which: Callable[[int], bool]) -> list[ClassRequest]:
    """The classes (not groups) of a split whose batch position passes `which`."""
    out = []
    for shard in plan:
        for owners, unit in zip(shard.owners, shard.units, strict=True):
            assert isinstance(unit, ClassRequest)
            if which(owners[0]):
                out.append(unit)
    return out


def test_split_shares_add_up_small_classes_go_whole() -> None:
    table = NodeTable.build(cluster(12))
    counts = (0, 1, 5, 7, 200, 301)
    classes = [ClassRequest(count=c, service=f"s{c}", spread_by="zone") for c in counts]
    plan = split(table, classes, 3)
    for i, c in enumerate(classes):
        shares = [part.count for part in parts_of(plan, {i}.__contains__)]
        assert sum(shares) == c.count
        if c.count < 100:
            assert len(shares) == 1  # whole, to one shard
        else:
            assert len(shares) == 3
            assert max(shares) - min(shares) <= 1
    # the odd replicas of the two split classes start in different domains and shards
    rotations = [part.rotation for part in parts_of(plan, lambda owner: owner >= 4)]
    assert len(set(rotations)) > 1


def test_split_balances_the_work() -> None:
    table = NodeTable.build(cluster(40))
    classes = [
        ClassRequest(count=5, service=f"s{i}", spread_by="zone" if i % 2 == 0 else None)
        for i in range(40)
    ]
    plan = split(table, classes, 2)
    groups = [[u for u in s.units if isinstance(u, Group)] for s in plan]
    assert [len(g) for g in groups] == [2, 2]  # two shapes, each split over both shards
    spread = [sum(len(g.services) for g in mine if g.template.spread_by) for mine in groups]
    assert spread == [10, 10]


@pytest.mark.parametrize("shards", [2, 3, 4])
def test_sharded_spread_stays_within_one_per_zone(shards: int) -> None:
    rng = random.Random(shards)
    nodes = cluster(60, zones=5, seed=shards)
    table = NodeTable.build(nodes)
    classes = [
        ClassRequest(
            count=rng.randint(1, 80), service=f"s{i}", resources={"cpu": 0.25}, spread_by="zone"
        )
        for i in range(40)
    ]
    solutions = sharded(table, classes, shards)
    zone = table.domains("zone")
    for c, s in zip(classes, solutions, strict=True):
        assert s.placed == c.count
        per_zone = np.bincount(zone[s.where], weights=s.take, minlength=5)
        assert per_zone.max() - per_zone.min() <= 1
        assert set(s.why) == set(s.per_node)


def test_repair_places_what_a_shard_could_not() -> None:
    """Only one node matches the selector; the other shard's share comes back and is
    placed on it by the repair pass."""
    nodes = cluster(6, zones=2)
    table = NodeTable.build(nodes)
    request = ClassRequest(count=6, service="g", node_selector={"pool": "gpu"})
    (solution,) = sharded(table, [request], 2)
    assert solution.per_node == {"n0000": 6}
    assert solution.unplaced == 0
    assert solution.reason == ""


def test_repair_reason_speaks_of_the_whole_class() -> None:
    nodes = cluster(4, zones=2)
    table = NodeTable.build(nodes)
    request = ClassRequest(count=5, service="g", resources={"gpu": 1.0})
    (solution,) = sharded(table, [request], 2)
    assert solution.unplaced == 5
    assert solution.reason == "5 of 5 replicas fit no node: 4 nodes lack gpu"


def test_sharded_capacity_is_never_exceeded() -> None:
    nodes = cluster(20, zones=2)
    table = NodeTable.build(nodes)
    classes = [
        ClassRequest(count=50, service=f"s{i}", resources={"cpu": 1.0}, spread_by="zone")
        for i in range(12)
    ]
    solutions = sharded(table, classes, 3)
    used = table.used("cpu")
    cap = np.array([n.capacity["cpu"] for n in nodes])
    assert (used <= cap + 1e-9).all()
    assert sum(s.placed for s in solutions) == min(600, int(cap.sum()))


def test_one_shard_equals_one_process() -> None:
    nodes = cluster(30)
    classes = [ClassRequest(count=9, service=f"s{i}", spread_by="zone") for i in range(5)]
    alone = solve_batch(classes, NodeTable.build(nodes))
    merged = sharded(NodeTable.build(nodes), classes, 1)
    assert [s.per_node for s in alone] == [s.per_node for s in merged]


def test_importing_the_scheduler_and_runner_does_not_import_ray() -> None:
    code = (
        "import sys\n"
        "import corral.services.runner, corral.services.cli.main\n"
        "import corral.workers.scheduler.worker, corral.workers.scheduler.executors\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_packed_answers_keep_every_reason() -> None:
    nodes = cluster(12)
    classes = [
        ClassRequest(count=7, service="a", spread_by="zone"),
        ClassRequest(count=5, service="b", resources={"cpu": 1.0}, strategy="binpack"),
        ClassRequest(count=3, service="c", resources={"gpu": 1.0}),
    ]
    direct = solve_batch(classes, NodeTable.build(nodes))
    table = NodeTable.build(nodes)
    unpacked = pack(table.ids, solve_batch(classes, table)).unpack()
    assert [s.why for s in unpacked] == [s.why for s in direct]
    assert [s.reason for s in unpacked] == [s.reason for s in direct]
    assert [s.per_node for s in unpacked] == [s.per_node for s in direct]


def test_groups_placed_in_shards_merge_into_the_whole_table() -> None:
    nodes = cluster(40)
    classes = (
        [
            ClassRequest(count=6, service=f"g{i}", resources={"cpu": 1.0}, spread_by="zone")
            for i in range(10)
        ]
        + [
            ClassRequest(count=4, service=f"b{i}", resources={"cpu": 2.0}, strategy="binpack")
            for i in range(6)
        ]
        + [ClassRequest(count=5, service="alone", resources={"cpu": 3.0}, max_per_node=1)]
    )
    table = NodeTable.build(nodes)
    plan = split(table, classes, 2)
    answers = [solve_shard(table.shard(s.rows), s.units) for s in plan]
    assert all(a.groups for a in answers)  # the shards did place groups
    solutions = merge(table, classes, plan, answers)
    used = np.zeros(len(nodes))
    position = {n.id: i for i, n in enumerate(nodes)}
    zone = {n.id: n.labels["zone"] for n in nodes}
    for c, s in zip(classes, solutions, strict=True):
        assert s.placed == c.count
        assert not s.reason
        assert set(s.why) == set(s.per_node)
        for node, count in s.per_node.items():
            used[position[node]] += count * c.resources["cpu"]
        found = table.placed[c.service]
        assert sorted(found[0].tolist()) == sorted(position[n] for n in s.per_node)
        if c.spread_by:
            per_zone = [
                sum(k for n, k in s.per_node.items() if zone[n] == z) for z in ("z0", "z1", "z2")
            ]
            assert max(per_zone) - min(per_zone) <= 1
    assert np.allclose(table.used("cpu"), used)
    assert table.totals.sum() == sum(c.count for c in classes)


async def test_a_large_batch_of_few_shapes_is_solved_in_process() -> None:
    nodes = cluster(30)
    classes = [ClassRequest(count=5, service=f"g{i}", resources={"cpu": 0.5}) for i in range(20)]
    classes += [
        ClassRequest(count=5, service=f"a{i}", resources={"cpu": 0.1 * (i + 1)}) for i in range(3)
    ]
    table = NodeTable.build(nodes)
    assert placements(classes, table) == 4  # one group, three alone
    executor = Sharded(above=10, shards=2, placements_above=4)
    solutions = await executor.solve(classes, table)
    assert executor.used == 0
    assert not executor._started  # Ray was never started
    assert sum(s.placed for s in solutions) == 115


class _CountingRay:
    """Stands in for the Ray module where only `cluster_resources` is read."""

    def __init__(self, cpus: int) -> None:
        self.cpus = cpus
        self.asked = 0

    def cluster_resources(self) -> dict[str, float]:
        self.asked += 1
        return {"CPU": float(self.cpus)}


def test_the_cluster_cpu_count_is_read_again_only_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import corral.workers.scheduler.executors as executors

    clock = [100.0]
    monkeypatch.setattr(executors.time, "monotonic", lambda: clock[0])
    ray = _CountingRay(2)
    executor = Sharded(above=0)
    assert executor._shard_count(ray) == 2
    ray.cpus = 6  # the cluster grew
    clock[0] += executors.CPUS_EVERY - 1
    assert executor._shard_count(ray) == 2  # not asked again yet
    assert ray.asked == 1
    clock[0] += 2
    assert executor._shard_count(ray) == 6
    assert ray.asked == 2
    assert Sharded(above=0, shards=3)._shard_count(ray) == 3  # a set shard count needs no asking
    assert ray.asked == 2
