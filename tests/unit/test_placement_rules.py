"""The batch solver's rules: affinity, avoid, max_per_node, spread_by, prefer, binpack,
countable resources, priorities, and the fill primitives underneath."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from corral.schemas.spec import Affinity, Placement, Preference, ServiceSpec
from corral.workers.scheduler.filling import ordered_fill, water_fill
from corral.workers.scheduler.placement import ClassRequest, NodeTable, NodeView, solve_batch

GiB = float(2**30)


def view(
    id_: str,
    *,
    cpu: float = 8.0,
    memory: float = 16 * GiB,
    labels: dict[str, str] | None = None,
    services: dict[str, int] | None = None,
    used_cpu: float = 0.0,
    extra: dict[str, float] | None = None,
) -> NodeView:
    return NodeView(
        id=id_,
        labels=labels or {},
        capacity={"cpu": cpu, "memory": memory, **(extra or {})},
        allocated={"cpu": used_cpu},
        services=services or {},
        total=sum((services or {}).values()),
    )


def one(request: ClassRequest, nodes: list[NodeView]) -> tuple[dict[str, int], str]:
    solution = solve_batch([request], NodeTable.build(nodes))[0]
    return solution.per_node, solution.reason


def zoned(count: int, zones: str = "abc") -> list[NodeView]:
    return [view(f"n{i:03d}", labels={"zone": zones[i % len(zones)]}) for i in range(count)]


# --- fill primitives ------------------------------------------------------------------------
def test_water_fill_levels_then_hands_out_the_rest_by_key() -> None:
    counts = np.array([0, 2, 0, 5], dtype=np.int64)
    slots = np.array([10, 10, 10, 10], dtype=np.int64)
    key = np.array([3, 2, 1, 0], dtype=np.int64)
    take = water_fill(counts, slots, 5, key)
    # level 2 costs 4 replicas; the fifth goes to the level-2 node with the lowest key
    assert list(counts + take) == [2, 2, 3, 5]


def test_water_fill_respects_slots() -> None:
    take = water_fill(
        np.zeros(3, dtype=np.int64), np.array([1, 0, 9], dtype=np.int64), 20, np.arange(3)
    )
    assert list(take) == [1, 0, 9]


def test_ordered_fill_fills_in_key_order() -> None:
    take = ordered_fill(np.array([3, 5, 2, 0], dtype=np.int64), 6, np.array([2.0, 0.0, 1.0, -1]))
    assert list(take) == [0, 5, 1, 0]


# --- hard rules -----------------------------------------------------------------------------
def test_affinity_in_notin_exists_doesnotexist() -> None:
    nodes = [
        view("a", labels={"zone": "x", "gpu": "t4"}),
        view("b", labels={"zone": "y"}),
        view("c", labels={"zone": "z", "gpu": "a100"}),
        view("d"),
    ]

    def placed(*exprs: Affinity) -> set[str]:
        per_node, _ = one(ClassRequest(count=8, node_affinity=exprs), nodes)
        return set(per_node)

    assert placed(Affinity(key="zone", operator="In", values=["x", "y"])) == {"a", "b"}
    assert placed(Affinity(key="zone", operator="NotIn", values=["x", "y"])) == {"c", "d"}
    assert placed(Affinity(key="gpu", operator="Exists")) == {"a", "c"}
    assert placed(Affinity(key="gpu", operator="DoesNotExist")) == {"b", "d"}
    assert placed(
        Affinity(key="gpu", operator="Exists"), Affinity(key="zone", operator="NotIn", values=["x"])
    ) == {"c"}


def test_affinity_reason() -> None:
    _, reason = one(
        ClassRequest(count=2, node_affinity=(Affinity(key="gpu", operator="Exists"),)),
        [view("a"), view("b")],
    )
    assert reason == "2 of 2 replicas fit no node: 2 nodes fail node_affinity"


def test_affinity_on_unknown_key_and_value() -> None:
    nodes = [view("a", labels={"zone": "x"})]
    per_node, _ = one(
        ClassRequest(
            count=1, node_affinity=(Affinity(key="nope", operator="NotIn", values=["q"]),)
        ),
        nodes,
    )
    assert per_node == {"a": 1}
    per_node, _ = one(
        ClassRequest(count=1, node_affinity=(Affinity(key="zone", operator="In", values=["q"]),)),
        nodes,
    )
    assert per_node == {}


def test_max_per_node_caps_and_counts_existing() -> None:
    nodes = [view("a", services={"web": 2}), view("b"), view("c")]
    request = ClassRequest(count=10, service="web", max_per_node=3)
    per_node, reason = one(request, nodes)
    assert per_node == {"a": 1, "b": 3, "c": 3}
    assert reason.startswith("3 of 10 replicas fit no node: ")
    assert "3 nodes reached max_per_node=3" in reason


def test_max_per_node_already_full_nodes_are_named() -> None:
    nodes = [view("a", services={"web": 2}), view("b", services={"web": 2})]
    _, reason = one(ClassRequest(count=1, service="web", max_per_node=2), nodes)
    assert reason == "1 of 1 replicas fit no node: 2 nodes already hold max_per_node=2"


def test_avoid_keeps_off_nodes_with_those_services() -> None:
    nodes = [view("a", services={"db": 1}), view("b"), view("c", services={"cache": 2})]
    per_node, _ = one(ClassRequest(count=4, service="web", avoid=("db", "cache")), nodes)
    assert per_node == {"b": 4}


def test_avoid_is_mutual() -> None:
    """db does not list web, but web avoids db: db keeps off web's nodes too."""
    table = NodeTable.build([view("a", services={"web": 1}), view("b")], avoids={"web": ("db",)})
    solution = solve_batch([ClassRequest(count=3, service="db")], table)[0]
    assert solution.per_node == {"b": 3}


def test_avoid_within_one_batch() -> None:
    table = NodeTable.build([view("a"), view("b"), view("c"), view("d")])
    web, db = solve_batch(
        [
            ClassRequest(count=2, service="web", priority=1),
            ClassRequest(count=2, service="db", avoid=("web",)),
        ],
        table,
    )
    assert not set(web.per_node) & set(db.per_node)
    assert web.placed == db.placed == 2


def test_avoid_reason() -> None:
    _, reason = one(
        ClassRequest(count=1, service="web", avoid=("db",)), [view("a", services={"db": 1})]
    )
    assert reason == "1 of 1 replicas fit no node: 1 node runs a service it avoids"


def test_reason_counts_each_node_once_across_resources() -> None:
    nodes = [view("a", cpu=0.1, memory=0.1 * GiB), view("b", memory=0.1 * GiB)]
    _, reason = one(ClassRequest(count=1, resources={"cpu": 1.0, "memory": GiB}), nodes)
    assert reason == "1 of 1 replicas fit no node: 1 node lacks cpu, 1 node lacks memory"


def test_the_example_from_the_issue() -> None:
    nodes = [view(f"s{i}", memory=GiB, labels={"pool": "main"}) for i in range(38)]
    nodes += [view(f"o{i}", labels={"pool": "other"}) for i in range(12)]
    spec_like = ClassRequest(count=3, resources={"memory": 4 * GiB}, node_selector={"pool": "main"})
    _, reason = one(spec_like, nodes)
    assert (
        reason == "3 of 3 replicas fit no node: 12 nodes fail node_selector, 38 nodes lack memory"
    )


# --- countable resources --------------------------------------------------------------------
def test_gpu_nodes_only_and_by_count() -> None:
    nodes = [view("a", extra={"gpu": 4}), view("b"), view("c", extra={"gpu": 2})]
    per_node, reason = one(ClassRequest(count=5, resources={"gpu": 2.0}), nodes)
    assert per_node == {"a": 2, "c": 1}
    assert "1 node lacks gpu" in reason
    assert "2 nodes ran out of gpu" in reason


def test_resource_no_node_advertises() -> None:
    _, reason = one(ClassRequest(count=1, resources={"fpga": 1.0}), [view("a"), view("b")])
    assert reason == "1 of 1 replicas fit no node: 2 nodes lack fpga"


def test_batch_commits_resources_between_classes() -> None:
    table = NodeTable.build([view("a", cpu=4.0), view("b", cpu=4.0)])
    first, second = solve_batch(
        [
            ClassRequest(count=6, service="x", resources={"cpu": 1.0}),
            ClassRequest(count=6, service="y", resources={"cpu": 1.0}),
        ],
        table,
    )
    assert first.placed == 6
    assert second.placed == 2
    assert second.unplaced == 4
    assert table.used("cpu").tolist() == [4.0, 4.0]


# --- spread_by ------------------------------------------------------------------------------
def test_spread_by_zone_even_despite_uneven_node_counts() -> None:
    nodes = [view(f"a{i}", labels={"zone": "a"}) for i in range(10)]
    nodes += [view("b0", labels={"zone": "b"})]
    per_node, _ = one(ClassRequest(count=10, spread_by="zone"), nodes)
    by_zone: Counter[str] = Counter()
    for node_id, count in per_node.items():
        by_zone[node_id[0]] += count
    assert by_zone == {"a": 5, "b": 5}


def test_spread_by_counts_existing_replicas_per_zone() -> None:
    nodes = [
        view("a0", labels={"zone": "a"}, services={"web": 4}),
        view("b0", labels={"zone": "b"}),
        view("c0", labels={"zone": "c"}, services={"web": 1}),
    ]
    per_node, _ = one(ClassRequest(count=5, service="web", spread_by="zone"), nodes)
    assert per_node == {"b0": 3, "c0": 2} or per_node == {"b0": 3, "c0": 2}
    assert per_node.get("a0", 0) == 0


def test_spread_by_full_zone_overflows_to_others() -> None:
    nodes = [view("a0", labels={"zone": "a"}, cpu=1.0), view("b0", labels={"zone": "b"}, cpu=8)]
    per_node, _ = one(ClassRequest(count=6, spread_by="zone", resources={"cpu": 1.0}), nodes)
    assert per_node == {"a0": 1, "b0": 5}


def test_spread_by_unlabelled_nodes_take_only_overflow() -> None:
    nodes = [view("a0", labels={"zone": "a"}, cpu=2.0), view("x", cpu=8.0)]
    per_node, _ = one(ClassRequest(count=5, spread_by="zone", resources={"cpu": 1.0}), nodes)
    assert per_node == {"a0": 2, "x": 3}
    solution = solve_batch(
        [ClassRequest(count=5, spread_by="zone", resources={"cpu": 1.0})], NodeTable.build(nodes)
    )[0]
    assert "no zone label" in solution.why["x"]
    assert solution.why["a0"].startswith("spread by zone: 2 of this service in zone=a")


@pytest.mark.parametrize("seed", range(3))
def test_property_spread_by_skew_at_most_one_for_many_services(seed: int) -> None:
    rng = random.Random(seed)
    nodes = zoned(rng.randint(6, 40), zones="abcde"[: rng.randint(2, 5)])
    table = NodeTable.build(nodes)
    requests = [
        ClassRequest(count=rng.randint(1, 50), service=f"s{i}", spread_by="zone") for i in range(30)
    ]
    solutions = solve_batch(requests, table)
    zone_of = {n.id: n.labels["zone"] for n in nodes}
    zones = set(zone_of.values())
    for request, solution in zip(requests, solutions, strict=True):
        per_zone = Counter({z: 0 for z in zones})
        for node_id, count in solution.per_node.items():
            per_zone[zone_of[node_id]] += count
        assert solution.placed == request.count
        assert max(per_zone.values()) - min(per_zone.values()) <= 1
    # ties rotate by load: the zones end up evenly loaded overall
    totals: Counter[str] = Counter()
    for node, total in zip(nodes, table.totals, strict=True):
        totals[node.labels["zone"]] += int(total)
    assert max(totals.values()) - min(totals.values()) <= 1


def test_rotation_moves_the_remainder() -> None:
    nodes = zoned(3)
    zone_of = {n.id: n.labels["zone"] for n in nodes}
    got = []
    for rotation in range(3):
        per_node, _ = one(ClassRequest(count=1, spread_by="zone", rotation=rotation), nodes)
        got.append(zone_of[next(iter(per_node))])
    assert got == ["a", "b", "c"]


# --- prefer ---------------------------------------------------------------------------------
def test_prefer_fills_the_heaviest_tier_first() -> None:
    nodes = [
        view("plain", cpu=8.0),
        view("ssd", labels={"disk": "ssd"}, cpu=2.0),
        view("both", labels={"disk": "ssd", "net": "fast"}, cpu=2.0),
    ]
    prefer = (
        Preference(label="disk", value="ssd", weight=1),
        Preference(label="net", value="fast", weight=5),
    )
    request = ClassRequest(count=5, resources={"cpu": 1.0}, prefer=prefer)
    solution = solve_batch([request], NodeTable.build(nodes))[0]
    assert solution.per_node == {"both": 2, "ssd": 2, "plain": 1}
    assert solution.why["both"].endswith("preferred (disk=ssd, net=fast)")
    assert "preferred" not in solution.why["plain"]


def test_prefer_within_each_spread_zone() -> None:
    nodes = [
        view("a-ssd", labels={"zone": "a", "disk": "ssd"}),
        view("a-hdd", labels={"zone": "a"}),
        view("b-ssd", labels={"zone": "b", "disk": "ssd"}),
        view("b-hdd", labels={"zone": "b"}),
    ]
    request = ClassRequest(
        count=4, spread_by="zone", prefer=(Preference(label="disk", value="ssd"),)
    )
    per_node, _ = one(request, nodes)
    assert per_node == {"a-ssd": 2, "b-ssd": 2}


# --- binpack --------------------------------------------------------------------------------
def test_binpack_fills_the_fullest_node_first() -> None:
    nodes = [view("empty"), view("half", used_cpu=4.0), view("most", used_cpu=6.0)]
    request = ClassRequest(count=5, resources={"cpu": 1.0}, strategy="binpack")
    solution = solve_batch([request], NodeTable.build(nodes))[0]
    assert solution.per_node == {"most": 2, "half": 3}
    assert solution.why["most"] == "binpack: 2 of this service on most, 100% full, room for 2"


def test_binpack_prefers_large_empty_nodes() -> None:
    nodes = [view("small", cpu=2.0), view("big", cpu=16.0)]
    per_node, _ = one(ClassRequest(count=3, resources={"cpu": 1.0}, strategy="binpack"), nodes)
    assert per_node == {"big": 3}


def test_binpack_batch_orders_largest_first_and_uses_few_nodes() -> None:
    rng = random.Random(7)
    nodes = [view(f"n{i:02d}", cpu=16.0, memory=64 * GiB) for i in range(60)]
    requests = [
        ClassRequest(
            count=rng.randint(1, 12),
            service=f"s{i}",
            resources={"cpu": rng.choice([0.5, 1.0, 2.0, 4.0]), "memory": 2 * GiB},
            strategy="binpack",
        )
        for i in range(40)
    ]
    table = NodeTable.build(nodes)
    solutions = solve_batch(requests, table)
    assert all(s.unplaced == 0 for s in solutions)
    used = int((table.totals > 0).sum())
    cpu = sum(r.count * r.resources["cpu"] for r in requests)
    memory = sum(r.count * r.resources["memory"] for r in requests)
    bound = max(np.ceil(cpu / 16.0), np.ceil(memory / (64 * GiB)))
    assert used <= bound * 1.03 + 1


def test_priority_places_first_when_room_is_short() -> None:
    table = NodeTable.build([view("a", cpu=2.0)])
    low, high = solve_batch(
        [
            ClassRequest(count=2, service="low", resources={"cpu": 1.0}),
            ClassRequest(count=2, service="high", resources={"cpu": 1.0}, priority=10),
        ],
        table,
    )
    assert high.placed == 2
    assert low.placed == 0


# --- from the spec --------------------------------------------------------------------------
def test_class_from_spec_placement() -> None:
    spec = ServiceSpec.model_validate(
        {
            "name": "web",
            "command": ["x"],
            "resources": {"cpu": 1, "gpu": 1},
            "placement": {
                "node_affinity": [{"key": "zone", "operator": "In", "values": ["a"]}],
                "max_per_node": 2,
                "avoid": ["db"],
                "spread_by": "rack",
                "prefer": [{"label": "disk", "value": "ssd", "weight": 3}],
                "strategy": "binpack",
                "priority": 5,
            },
        }
    )
    request = ClassRequest.of("web", 3, spec.resources.as_dict(), spec.placement, spec.driver)
    assert request.max_per_node == 2
    assert request.avoid == ("db",)
    assert request.strategy == "binpack"
    assert request.priority == 5
    assert request.resources["gpu"] == 1.0


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ({"node_affinity": [{"key": "z", "operator": "In"}]}, "needs `values`"),
        ({"node_affinity": [{"key": "z", "operator": "Exists", "values": ["a"]}]}, "no `values`"),
        ({"node_affinity": [{"key": "z", "operator": "Near"}]}, "operator"),
        ({"max_per_node": 0}, "max_per_node"),
        ({"avoid": ["db", "db"]}, "twice"),
        ({"avoid": ["web"]}, "itself"),
        ({"strategy": "random"}, "strategy"),
        ({"prefer": [{"label": "a", "value": "b", "weight": 0}]}, "weight"),
        ({"priority": 5000}, "priority"),
    ],
)
def test_bad_placement_is_rejected(placement: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServiceSpec.model_validate({"name": "web", "command": ["x"], "placement": placement})


def test_placement_defaults() -> None:
    placement = Placement()
    assert placement.strategy == "spread"
    assert placement.priority == 0
    assert placement.max_per_node is None


def test_proportional_fill_follows_room() -> None:
    from corral.workers.scheduler.filling import proportional_fill

    slots = np.array([10, 20, 0, 10], dtype=np.int64)
    take = proportional_fill(slots, 20, np.arange(4))
    assert list(take) == [5, 10, 0, 5]
    take = proportional_fill(slots, 3, np.array([3.0, 2.0, 1.0, 0.0]))
    assert int(take.sum()) == 3
    assert take[2] == 0
    assert (take <= slots).all()
    assert list(proportional_fill(slots, 100, np.arange(4))) == [10, 20, 0, 10]


def test_room_for_marks_ruled_out_nodes() -> None:
    from corral.workers.scheduler.placement import room_for

    table = NodeTable.build(
        [view("a", cpu=4.0, labels={"pool": "x"}), view("b", cpu=4.0), view("c", cpu=0.5)]
    )
    request = ClassRequest(count=1, service="w", resources={"cpu": 1.0}, node_selector={})
    assert list(room_for(request, table, table.counts("w"))) == [4, 4, 0]
    picky = ClassRequest(count=1, service="w", resources={"cpu": 1.0}, node_selector={"pool": "x"})
    assert list(room_for(picky, table, table.counts("w"))) == [4, -1, -1]


@pytest.mark.parametrize("seed", range(40))
def test_water_fill_matches_one_replica_at_a_time(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 80)
    counts = np.array(
        [rng.choice([0, 0, 1, 3, rng.randint(0, 60)]) for _ in range(n)], dtype=np.int64
    )
    slots = np.array(
        [rng.choice([0, 1, 2, 5, rng.randint(0, 200)]) for _ in range(n)], dtype=np.int64
    )
    key = np.array([rng.random() for _ in range(n)])
    k = rng.randint(0, int(slots.sum()) + 5)
    take = water_fill(counts, slots, k, key)
    # the reference: one replica at a time to the lowest count with room, then the lowest key
    ref = np.zeros(n, dtype=np.int64)
    for _ in range(min(k, int(slots.sum()))):
        room = [i for i in range(n) if ref[i] < slots[i]]
        best = min(room, key=lambda i: (counts[i] + ref[i], key[i], i))
        ref[best] += 1
    assert int(take.sum()) == int(ref.sum())
    assert take.tolist() == ref.tolist()
    assert (take <= slots).all()
