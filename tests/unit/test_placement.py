"""The scheduler's pure solver: spread, filters, resource slots and its reasons."""

from __future__ import annotations

import math
import random

import pytest

from corral.workers.scheduler.placement import ClassRequest, NodeView, solve

GiB = float(2**30)


def node(
    id_: str,
    *,
    cpu: float = 8.0,
    memory: float = 16 * GiB,
    used_cpu: float = 0.0,
    used_memory: float = 0.0,
    labels: dict[str, str] | None = None,
    drivers: tuple[str, ...] = ("process",),
    ready: bool = True,
    count: int = 0,
    extra: dict[str, float] | None = None,
) -> NodeView:
    return NodeView(
        id=id_,
        labels=labels or {},
        capacity={"cpu": cpu, "memory": memory, **(extra or {})},
        allocated={"cpu": used_cpu, "memory": used_memory},
        drivers=drivers,
        ready=ready,
        count=count,
    )


def request(count: int, **kwargs: object) -> ClassRequest:
    return ClassRequest(count=count, **kwargs)  # type: ignore[arg-type]


def test_spreads_evenly_across_nodes() -> None:
    nodes = [node("a"), node("b"), node("c")]
    solution = solve(request(6), nodes)
    assert solution.per_node == {"a": 2, "b": 2, "c": 2}
    assert solution.unplaced == 0
    assert solution.reason == ""


def test_remainder_goes_to_the_first_nodes() -> None:
    solution = solve(request(4), [node("a"), node("b"), node("c")])
    assert solution.per_node == {"a": 2, "b": 1, "c": 1}


def test_nodes_that_get_nothing_are_left_out() -> None:
    solution = solve(request(1), [node("a"), node("b")])
    assert solution.per_node == {"a": 1}
    assert set(solution.why) == {"a"}


def test_fills_the_emptiest_nodes_first() -> None:
    nodes = [node("a", count=3), node("b", count=1), node("c", count=0)]
    solution = solve(request(2), nodes)
    assert solution.per_node == {"b": 1, "c": 1}


def test_existing_counts_are_levelled() -> None:
    nodes = [node("a", count=4), node("b", count=0), node("c", count=1)]
    solution = solve(request(6), nodes)
    totals = {n.id: n.count + solution.per_node.get(n.id, 0) for n in nodes}
    assert sum(solution.per_node.values()) == 6
    assert totals == {"a": 4, "b": 4, "c": 3}


def test_why_explains_the_spread_and_room() -> None:
    nodes = [node("a", count=1, cpu=2.0), node("b")]
    solution = solve(request(2, resources={"cpu": 1.0}), nodes)
    assert solution.per_node == {"a": 1, "b": 1}
    assert solution.why["a"] == "spread: 2 of this service on a, room for 2"
    assert solution.why["b"] == "spread: 1 of this service on b, room for 8"


def test_why_has_no_room_when_unconstrained() -> None:
    assert solve(request(1), [node("a")]).why == {"a": "spread: 1 of this service on a"}


def test_node_selector_filters_nodes() -> None:
    nodes = [
        node("a", labels={"zone": "x", "disk": "ssd"}),
        node("b", labels={"zone": "y", "disk": "ssd"}),
        node("c", labels={"zone": "x"}),
        node("d", labels={"zone": "x", "disk": "ssd"}),
    ]
    solution = solve(request(4, node_selector={"zone": "x", "disk": "ssd"}), nodes)
    assert solution.per_node == {"a": 2, "d": 2}


def test_node_selector_that_no_node_meets() -> None:
    nodes = [node("a", labels={"zone": "x"}), node("b")]
    solution = solve(request(2, node_selector={"zone": "y"}), nodes)
    assert solution.per_node == {}
    assert solution.unplaced == 2
    assert solution.reason == "2 of 2 replicas fit no node: 2 nodes fail node_selector"


def test_resource_limits_cap_each_node() -> None:
    nodes = [
        node("a", cpu=2.0),
        node("b", cpu=4.0, used_cpu=3.0),
        node("c", cpu=1.0, memory=GiB),
    ]
    solution = solve(request(10, resources={"cpu": 0.5, "memory": 0.25 * GiB}), nodes)
    # a: 4 by cpu; b: 2 by free cpu; c: 2 by cpu, 4 by memory
    assert solution.per_node == {"a": 4, "b": 2, "c": 2}
    assert solution.unplaced == 2
    assert solution.reason.startswith("2 of 10 replicas fit no node: ")
    assert "3 nodes ran out of cpu" in solution.reason


def test_ran_out_names_the_binding_resource() -> None:
    nodes = [node("a", cpu=8.0, memory=GiB), node("b", cpu=1.0, memory=8 * GiB)]
    solution = solve(request(10, resources={"cpu": 0.5, "memory": 0.5 * GiB}), nodes)
    assert solution.per_node == {"a": 2, "b": 2}
    assert "1 node ran out of cpu" in solution.reason
    assert "1 node ran out of memory" in solution.reason


def test_fractional_free_capacity_is_not_lost_to_rounding() -> None:
    # 1.0 - 0.7 is 0.30000000000000004 and 0.9 - 0.6 is 0.30000000000000004; both fit 3 x 0.1
    nodes = [node("a", cpu=1.0, used_cpu=0.7), node("b", cpu=0.9, used_cpu=0.6)]
    solution = solve(request(10, resources={"cpu": 0.1}), nodes)
    assert solution.per_node == {"a": 3, "b": 3}


def test_overcommitted_node_gets_nothing() -> None:
    nodes = [node("a", cpu=1.0, used_cpu=2.0), node("b")]
    solution = solve(request(2, resources={"cpu": 1.0}), nodes)
    assert solution.per_node == {"b": 2}


def test_zero_resource_needs_do_not_limit() -> None:
    nodes = [node("a", cpu=0.0, memory=0.0)]
    solution = solve(request(5, resources={"cpu": 0.0, "memory": 0.0}), nodes)
    assert solution.per_node == {"a": 5}


def test_countable_extra_resource() -> None:
    nodes = [node("a", extra={"gpu": 2.0}), node("b"), node("c", extra={"gpu": 1.0})]
    solution = solve(request(4, resources={"gpu": 1.0}), nodes)
    assert solution.per_node == {"a": 2, "c": 1}
    assert solution.unplaced == 1
    assert "1 node lacks gpu" in solution.reason
    assert "2 nodes ran out of gpu" in solution.reason


def test_lack_memory_reason() -> None:
    nodes = [node("a", memory=GiB), node("b", memory=GiB, used_memory=0.5 * GiB)]
    solution = solve(request(3, resources={"memory": 2 * GiB}), nodes)
    assert solution.per_node == {}
    assert solution.reason == "3 of 3 replicas fit no node: 2 nodes lack memory"


def test_unready_nodes_are_skipped() -> None:
    nodes = [node("a", ready=False), node("b")]
    assert solve(request(2), nodes).per_node == {"b": 2}


def test_unready_reason() -> None:
    solution = solve(request(1), [node("a", ready=False)])
    assert solution.per_node == {}
    assert solution.reason == "1 of 1 replicas fit no node: 1 node not ready"


def test_missing_driver() -> None:
    nodes = [node("a", drivers=("fake",)), node("b", drivers=("process", "fake"))]
    assert solve(request(2, driver="fake"), nodes).per_node == {"a": 1, "b": 1}
    solution = solve(request(2, driver="docker"), nodes)
    assert solution.per_node == {}
    assert solution.reason == "2 of 2 replicas fit no node: 2 nodes lack the docker driver"


def test_reason_counts_each_node_once_by_its_first_failure() -> None:
    nodes = [
        node("down", ready=False, labels={"zone": "x"}),
        node("nodriver", drivers=(), labels={"zone": "x"}),
        node("elsewhere", labels={"zone": "y"}),
        node("small", labels={"zone": "x"}, memory=GiB),
        node("fits", labels={"zone": "x"}, memory=4 * GiB),
    ]
    solution = solve(request(5, resources={"memory": 2 * GiB}, node_selector={"zone": "x"}), nodes)
    assert solution.per_node == {"fits": 2}
    assert solution.unplaced == 3
    assert solution.reason == (
        "3 of 5 replicas fit no node: 1 node not ready, 1 node lacks the process driver, "
        "1 node fails node_selector, 1 node lacks memory, 1 node ran out of memory"
    )


def test_zero_count_places_nothing() -> None:
    assert solve(request(0), [node("a")]) == solve(request(0), [])
    solution = solve(request(0), [node("a")])
    assert (solution.per_node, solution.unplaced, solution.reason) == ({}, 0, "")


def test_no_nodes() -> None:
    solution = solve(request(3), [])
    assert solution.per_node == {}
    assert solution.unplaced == 3
    assert solution.reason == "no nodes are registered"


def test_large_counts_on_unlimited_nodes() -> None:
    solution = solve(request(10_000), [node(f"n{i}") for i in range(7)])
    assert sum(solution.per_node.values()) == 10_000
    assert max(solution.per_node.values()) - min(solution.per_node.values()) <= 1


# --- properties ---------------------------------------------------------------------------


def _random_case(rng: random.Random) -> tuple[ClassRequest, list[NodeView]]:
    resources: dict[str, float] = {}
    if rng.random() < 0.7:
        resources["cpu"] = rng.choice([0.1, 0.25, 0.5, 1.0, 1.5])
    if rng.random() < 0.5:
        resources["memory"] = rng.choice([0.25, 0.5, 1.0]) * GiB
    if rng.random() < 0.2:
        resources["gpu"] = 1.0
    selector = {"zone": "x"} if rng.random() < 0.3 else {}
    nodes = []
    for i in range(rng.randint(1, 12)):
        cpu = rng.choice([0.0, 0.5, 1.0, 2.0, 4.0, 8.0])
        memory = rng.choice([0.0, 1.0, 2.0, 8.0]) * GiB
        nodes.append(
            node(
                f"n{i}",
                cpu=cpu,
                memory=memory,
                used_cpu=rng.uniform(0, cpu),
                used_memory=rng.uniform(0, memory),
                labels={"zone": rng.choice("xy")},
                drivers=("process",) if rng.random() < 0.9 else ("fake",),
                ready=rng.random() < 0.9,
                count=rng.randint(0, 4),
                extra={"gpu": float(rng.randint(0, 2))},
            )
        )
    return request(rng.randint(0, 40), resources=resources, node_selector=selector), nodes


def _slots(req: ClassRequest, n: NodeView) -> float:
    eligible = (
        n.ready
        and req.driver in n.drivers
        and all(n.labels.get(k) == v for k, v in req.node_selector.items())
    )
    if not eligible:
        return 0
    room = math.inf
    for resource, need in req.resources.items():
        if need > 0:
            free = max(n.capacity.get(resource, 0.0) - n.allocated.get(resource, 0.0), 0.0)
            room = min(room, math.floor(free / need + 1e-9))
    return room


def _greedy(req: ClassRequest, nodes: list[NodeView]) -> dict[str, int]:
    """One at a time onto the node with the fewest of this service that has room, first wins."""
    totals = [n.count for n in nodes]
    room = [_slots(req, n) for n in nodes]
    out: dict[str, int] = {}
    for _ in range(req.count):
        open_ = [i for i in range(len(nodes)) if room[i] > 0]
        if not open_:
            break
        best = min(open_, key=lambda i: (totals[i], i))
        totals[best] += 1
        room[best] -= 1
        out[nodes[best].id] = out.get(nodes[best].id, 0) + 1
    return out


@pytest.mark.parametrize("seed", range(4))
def test_property_never_exceeds_slots_and_places_all_that_fit(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        req, nodes = _random_case(rng)
        solution = solve(req, nodes)
        slots = {n.id: _slots(req, n) for n in nodes}
        for node_id, taken in solution.per_node.items():
            assert 0 < taken <= slots[node_id]
        placed = sum(solution.per_node.values())
        assert placed == min(req.count, sum(slots.values()))
        assert solution.unplaced == req.count - placed
        assert bool(solution.reason) == (solution.unplaced > 0)
        assert set(solution.why) == set(solution.per_node)
        assert solution.per_node == _greedy(req, nodes)


@pytest.mark.parametrize("seed", range(4))
def test_property_spread_is_even_from_equal_counts(seed: int) -> None:
    rng = random.Random(1000 + seed)
    for _ in range(100):
        start = rng.randint(0, 5)
        zone_x = {"zone": "x"}
        eligible = [node(f"e{i}", count=start, labels=zone_x) for i in range(rng.randint(1, 10))]
        others = [
            node("down", ready=False, count=start, labels=zone_x),
            node("elsewhere", labels={"zone": "y"}, count=start),
        ]
        nodes = eligible + others
        rng.shuffle(nodes)
        req = request(rng.randint(0, 60), node_selector=zone_x)
        solution = solve(req, nodes)
        assert "down" not in solution.per_node
        assert "elsewhere" not in solution.per_node
        totals = [start + solution.per_node.get(n.id, 0) for n in eligible]
        assert sum(totals) - start * len(eligible) == req.count
        assert max(totals) - min(totals) <= 1


def test_ties_go_to_nodes_other_services_left_empty() -> None:
    """Spreading two 2-replica services over 4 nodes uses all 4, not the same 2 twice."""
    nodes = [
        NodeView(id=f"n{i}", labels={}, capacity={"cpu": 8}, allocated={}, total=total)
        for i, total in enumerate([1, 0, 1, 0])
    ]
    result = solve(request(2), nodes)
    assert result.per_node == {"n1": 1, "n3": 1}


def test_many_services_cover_every_node() -> None:
    totals = dict.fromkeys((f"n{i:03d}" for i in range(20)), 0)
    for _ in range(10):
        nodes = [
            NodeView(id=node_id, labels={}, capacity={"cpu": 64}, allocated={}, total=total)
            for node_id, total in totals.items()
        ]
        for node_id, count in solve(request(10), nodes).per_node.items():
            totals[node_id] += count
    assert set(totals.values()) == {5}
