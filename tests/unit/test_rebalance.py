"""Rebalance planning: each move lowers a spread service's skew or frees a node under
binpack, within the budget and the hard rules."""

from __future__ import annotations

from collections import Counter

from corral.workers.scheduler.placement import ClassRequest, NodeTable, NodeView
from corral.workers.scheduler.rebalance import plan_moves


def view(
    id_: str, zone: str, services: dict[str, int] | None = None, cpu: float = 8.0, pool: str = "p"
) -> NodeView:
    services = services or {}
    return NodeView(
        id=id_,
        labels={"zone": zone, "pool": pool},
        capacity={"cpu": cpu},
        allocated={"cpu": float(sum(services.values()))},
        services=services,
        total=sum(services.values()),
    )


def zones_after(nodes: list[NodeView], moves, service: str) -> Counter[str]:
    zone = {n.id: n.labels["zone"] for n in nodes}
    per: Counter[str] = Counter()
    for n in nodes:
        per[zone[n.id]] += n.services.get(service, 0)
    for m in moves:
        if m.service == service:
            per[zone[m.source]] -= 1
            per[zone[m.target]] += 1
    return per


WEB = ClassRequest(count=0, service="web", resources={"cpu": 1.0}, spread_by="zone")


def test_moves_level_a_crowded_zone() -> None:
    nodes = [
        view("a0", "a", {"web": 4}),
        view("a1", "a", {"web": 2}),
        view("b0", "b"),
        view("c0", "c"),
    ]
    moves = plan_moves(NodeTable.build(nodes), [WEB], budget=10)
    assert len(moves) == 4
    assert zones_after(nodes, moves, "web") == {"a": 2, "b": 2, "c": 2}
    assert moves[0].source == "a0"
    assert moves[0].reason.startswith("spread by zone: 6 in zone=a, 0 in zone=")


def test_budget_limits_moves() -> None:
    nodes = [view("a0", "a", {"web": 6}), view("b0", "b")]
    moves = plan_moves(NodeTable.build(nodes), [WEB], budget=1)
    assert len(moves) == 1
    assert (moves[0].source, moves[0].target) == ("a0", "b0")


def test_balanced_service_stays() -> None:
    nodes = [view("a0", "a", {"web": 2}), view("b0", "b", {"web": 1})]
    assert plan_moves(NodeTable.build(nodes), [WEB], budget=10) == []


def test_moves_respect_hard_rules_and_room() -> None:
    nodes = [
        view("a0", "a", {"web": 4}),
        view("b0", "b", pool="other"),  # fails the selector
        view("c0", "c", {"x": 8}),  # full
        view("d0", "d"),
    ]
    web = ClassRequest(
        count=0,
        service="web",
        resources={"cpu": 1.0},
        spread_by="zone",
        node_selector={"pool": "p"},
    )
    moves = plan_moves(NodeTable.build(nodes), [web], budget=10)
    assert {m.target for m in moves} == {"d0"}
    assert len(moves) == 2  # 4/0 -> 2/2 over the zones it may use (a, c is full: still a domain)


def test_plain_spread_levels_nodes() -> None:
    nodes = [view("a0", "a", {"web": 5}), view("a1", "a"), view("a2", "a")]
    web = ClassRequest(count=0, service="web", resources={"cpu": 1.0})
    moves = plan_moves(NodeTable.build(nodes), [web], budget=10)
    after = Counter({"a0": 5})
    for m in moves:
        after[m.source] -= 1
        after[m.target] += 1
    assert sorted(after.values()) == [1, 2, 2]


def test_binpack_frees_the_least_used_node() -> None:
    nodes = [
        view("n0", "a", {"batch": 6}),
        view("n1", "a", {"batch": 1}),
        view("n2", "a", {"batch": 1}),
        view("n3", "a"),
    ]
    batch = ClassRequest(count=0, service="batch", resources={"cpu": 1.0}, strategy="binpack")
    moves = plan_moves(NodeTable.build(nodes), [batch], budget=10)
    assert len(moves) == 2
    assert {m.source for m in moves} == {"n1", "n2"}
    assert all(m.target in {"n0", "n1", "n2"} for m in moves)
    assert moves[0].reason.startswith("binpack: frees n1")


def test_binpack_leaves_nodes_other_services_use() -> None:
    nodes = [view("n0", "a", {"batch": 6}), view("n1", "a", {"batch": 1, "web": 1})]
    batch = ClassRequest(count=0, service="batch", resources={"cpu": 1.0}, strategy="binpack")
    assert plan_moves(NodeTable.build(nodes), [batch], budget=10) == []
