"""New services of one shape placed as one group, then dealt out: each service still gets
what it would alone (its count, max_per_node, its zones within one of each other), its own
reasons, and a group that does not fit whole falls back to placing its members one by one."""

from __future__ import annotations

import gc
import random
import re
from collections import Counter

import numpy as np
import pytest

from corral.schemas.spec import Affinity, Preference
from corral.workers.scheduler.placement import (
    ClassRequest,
    Group,
    NodeTable,
    NodeView,
    Solution,
    collection_paused,
    identical_groups,
    solutions_of,
    solve_batch,
    solve_units,
)

GiB = float(2**30)


def view(id_: str, *, cpu: float = 8.0, zone: str | None = None, **labels: str) -> NodeView:
    if zone is not None:
        labels["zone"] = zone
    return NodeView(id=id_, labels=labels, capacity={"cpu": cpu, "memory": 64 * GiB}, allocated={})


def zoned(count: int, zones: str = "abc", cpu: float = 8.0) -> list[NodeView]:
    return [view(f"n{i:03d}", cpu=cpu, zone=zones[i % len(zones)]) for i in range(count)]


def same(count: int, services: int, **rules: object) -> list[ClassRequest]:
    return [
        ClassRequest(count=count, service=f"s{i:02d}", resources={"cpu": 1.0}, **rules)  # type: ignore[arg-type]
        for i in range(services)
    ]


def one_by_one(requests: list[ClassRequest], table: NodeTable) -> list[Solution]:
    """Each class in a batch of its own: nothing is ever grouped."""
    return [solve_batch([r], table)[0] for r in requests]


def zone_counts(solution: Solution, nodes: list[NodeView]) -> Counter[str]:
    zone = {n.id: n.labels.get("zone", "") for n in nodes}
    out: Counter[str] = Counter()
    for node, count in solution.per_node.items():
        out[zone[node]] += count
    return out


def test_same_shape_new_services_form_one_group() -> None:
    table = NodeTable.build(zoned(6))
    requests = [*same(3, 4), ClassRequest(count=3, service="other", resources={"cpu": 2.0})]
    assert identical_groups(requests, table) == {0: [0, 1, 2, 3]}


def test_what_is_never_grouped() -> None:
    nodes = [view("n0", zone="a"), view("n1", zone="b")]
    table = NodeTable.build(
        [NodeView("n0", {"zone": "a"}, {"cpu": 8.0}, {}, services={"old": 1}), nodes[1]],
        avoids={"x": ("y",)},
    )
    base = ClassRequest(count=2, resources={"cpu": 1.0})
    requests = [
        ClassRequest(count=2, service="a", resources={"cpu": 1.0}),
        ClassRequest(count=2, service="b", resources={"cpu": 1.0}),
        ClassRequest(count=2, service="old", resources={"cpu": 1.0}),  # already placed
        ClassRequest(count=2, service="x", resources={"cpu": 1.0}),  # avoids y
        ClassRequest(count=2, service="y", resources={"cpu": 1.0}),  # avoided by x
        ClassRequest(
            count=2,
            service="p",
            resources={"cpu": 1.0},
            prefer=(Preference(label="zone", value="a"),),
        ),
        ClassRequest(count=2, service="r", resources={"cpu": 1.0}, rotation=1),
        ClassRequest(count=2, service="", resources={"cpu": 1.0}),
        ClassRequest(count=2, service="twice", resources={"cpu": 1.0}),
        ClassRequest(count=2, service="twice", resources={"cpu": 1.0}),
        ClassRequest(count=0, service="none", resources={"cpu": 1.0}),
        ClassRequest(count=3, service="three", resources={"cpu": 1.0}),  # another count
    ]
    assert base.count == 2
    assert identical_groups(requests, table) == {0: [0, 1]}


def test_each_service_gets_its_count_and_its_max_per_node() -> None:
    nodes = zoned(8, "a")
    table = NodeTable.build(nodes)
    solutions = solve_batch(same(10, 6, max_per_node=2), table)
    for s in solutions:
        assert s.placed == 10
        assert s.unplaced == 0
        assert s.reason == ""
        assert max(s.per_node.values()) <= 2
    assert (table.used("cpu") <= 8.0).all()
    assert table.used("cpu").sum() == 60.0
    assert table.totals.sum() == 60


def test_each_service_stays_within_one_replica_per_zone() -> None:
    nodes = zoned(30)
    table = NodeTable.build(nodes)
    solutions = solve_batch(same(7, 20, spread_by="zone"), table)
    for s in solutions:
        per_zone = zone_counts(s, nodes)
        assert sum(per_zone.values()) == 7
        assert max(per_zone.values()) - min(per_zone[z] for z in "abc") <= 1
        # seven replicas and thirty nodes: alone it would put one on each of seven nodes
        assert set(s.per_node.values()) == {1}
    # the group as a whole is even too: every node holds four or five
    assert set(table.totals.tolist()) <= {4, 5}


def test_a_group_spreads_over_the_least_loaded_nodes_first() -> None:
    busy = [NodeView(f"b{i}", {}, {"cpu": 8.0}, {}, total=6, services={"x": 6}) for i in range(4)]
    idle = [NodeView(f"i{i}", {}, {"cpu": 8.0}, {}) for i in range(4)]
    table = NodeTable.build(busy + idle)
    solutions = solve_batch(same(2, 4), table)
    assert all(node.startswith("i") for s in solutions for node in s.per_node)


def test_reasons_read_as_if_each_service_was_placed_alone() -> None:
    nodes = zoned(6, cpu=4.0)
    table = NodeTable.build(nodes)
    solutions = solve_batch(same(4, 5, spread_by="zone"), table)
    rooms: dict[str, list[int]] = {}
    for s in solutions:
        per_zone = zone_counts(s, nodes)
        for node, note in s.why.items():
            match = re.fullmatch(
                r"spread by zone: (\d) of this service in zone=(\w), 1 on (n\d+), room for (\d)",
                note,
            )
            assert match, note
            assert int(match[1]) == per_zone[match[2]]
            assert match[3] == node
            rooms.setdefault(node, []).append(int(match[4]))
    # a node's room counts down as the group's services come to it, one by one
    used = dict(zip(table.ids, table.used("cpu").astype(int).tolist(), strict=True))
    for node, seen in rooms.items():
        assert sorted(seen, reverse=True) == list(range(4, 4 - used[node], -1))


def test_more_replicas_than_nodes_go_several_to_a_node() -> None:
    nodes = zoned(4, "a")
    table = NodeTable.build(nodes)
    solutions = solve_batch(same(10, 3), table)
    for s in solutions:
        assert s.placed == 10
        assert sorted(s.per_node.values()) == [2, 2, 3, 3]
        for node, note in s.why.items():
            assert note.startswith(f"spread: {s.per_node[node]} of this service on {node}")
    assert table.totals.tolist() == [8, 8, 7, 7]


def test_binpack_groups_fill_the_fewest_nodes() -> None:
    nodes = zoned(20, "a")
    table = NodeTable.build(nodes)
    solutions = solve_batch(same(10, 10, strategy="binpack"), table)
    assert sum(s.placed for s in solutions) == 100
    assert int((table.totals > 0).sum()) == 13  # 100 replicas of 1 cpu, 8 per node
    assert all(note.startswith("binpack: ") for s in solutions for note in s.why.values())


def test_a_group_that_does_not_fit_whole_places_its_members_one_by_one() -> None:
    nodes = zoned(2, "a")
    grouped = solve_batch(same(10, 3), NodeTable.build(nodes))
    alone = one_by_one(same(10, 3), NodeTable.build(nodes))
    assert [s.per_node for s in grouped] == [s.per_node for s in alone]
    assert [s.reason for s in grouped] == [s.reason for s in alone]
    assert [s.placed for s in grouped] == [10, 6, 0]
    assert grouped[2].reason.startswith("10 of 10 replicas fit no node")


def test_groups_and_other_classes_share_the_batch_by_priority() -> None:
    nodes = zoned(3, "a", cpu=4.0)
    urgent = ClassRequest(count=6, service="urgent", resources={"cpu": 1.0}, priority=10)
    solutions = solve_batch([*same(3, 3), urgent], NodeTable.build(nodes))
    assert solutions[3].placed == 6  # placed first: the group fits the rest, or falls back
    assert sum(s.placed for s in solutions) == 12


def test_selectors_and_affinity_hold_for_every_member() -> None:
    nodes = [view(f"n{i}", zone="abc"[i % 3], pool="web" if i % 2 else "db") for i in range(12)]
    rules = {
        "node_selector": {"pool": "web"},
        "node_affinity": (Affinity(key="zone", operator="In", values=["a", "b"]),),
    }
    solutions = solve_batch(same(2, 5, **rules), NodeTable.build(nodes))
    allowed = {n.id for n in nodes if n.labels["pool"] == "web" and n.labels["zone"] in "ab"}
    for s in solutions:
        assert s.placed == 2
        assert set(s.per_node) <= allowed


@pytest.mark.parametrize("seed", range(12))
def test_random_batches_keep_every_rule(seed: int) -> None:
    rng = random.Random(seed)
    nodes = [
        NodeView(
            f"n{i:03d}",
            {"zone": f"z{i % 4}", "pool": rng.choice(["web", "db"])},
            {"cpu": rng.choice([4.0, 8.0, 16.0]), "memory": 64 * GiB},
            {},
        )
        for i in range(rng.randint(8, 60))
    ]
    shapes = [
        {
            "resources": {"cpu": rng.choice([0.5, 1.0, 2.0])},
            "spread_by": rng.choice([None, "zone"]),
            "max_per_node": rng.choice([None, 1, 2]),
            "node_selector": rng.choice([{}, {"pool": "web"}]),
            "strategy": rng.choice(["spread", "spread", "binpack"]),
        }
        for _ in range(3)
    ]
    requests = []
    for i in range(rng.randint(5, 30)):
        shape = rng.choice(shapes)
        requests.append(ClassRequest(count=rng.choice([2, 5]), service=f"s{i}", **shape))  # type: ignore[arg-type]
    table = NodeTable.build(nodes)
    solutions = solve_batch(requests, table)
    cap = np.array([n.capacity["cpu"] for n in nodes])
    used = np.zeros(len(nodes))
    position = {n.id: i for i, n in enumerate(nodes)}
    for r, s in zip(requests, solutions, strict=True):
        assert s.placed + s.unplaced == r.count
        assert bool(s.unplaced) == bool(s.reason)
        assert set(s.why) == set(s.per_node)
        for node, count in s.per_node.items():
            used[position[node]] += count * r.resources["cpu"]
            if r.max_per_node is not None:
                assert count <= r.max_per_node
            if r.node_selector:
                assert nodes[position[node]].labels["pool"] == "web"
        found = table.placed.get(r.service)
        on_table = {} if found is None else _per_node(table, found)
        assert on_table == s.per_node
    assert np.allclose(used, table.used("cpu"))
    assert (used <= cap + 1e-9).all()


def _per_node(table: NodeTable, found: tuple[np.ndarray, np.ndarray]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, count in zip(found[0].tolist(), found[1].tolist(), strict=True):
        out[table.ids[i]] = out.get(table.ids[i], 0) + count
    return out


def test_the_collector_is_paused_while_placing_and_restored_after() -> None:
    assert gc.isenabled()
    with collection_paused():
        assert not gc.isenabled()
        with collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collection_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


def test_a_group_of_one_places_as_its_service_alone() -> None:
    nodes = zoned(9)
    template = ClassRequest(count=7, service="only", resources={"cpu": 1.0}, spread_by="zone")
    (placed,) = solve_units([Group(template, ["only"])], NodeTable.build(nodes))
    assert not isinstance(placed, list)
    (grouped,) = solutions_of(placed, [n.id for n in nodes])
    (alone,) = solve_batch([template], NodeTable.build(nodes))
    assert grouped.per_node == alone.per_node
    assert grouped.why == alone.why
