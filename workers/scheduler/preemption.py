"""Pure preemption: which running replicas of lower priority to evict so that a class the
normal solve could not fully place gets room. No I/O.

The rules follow kube-scheduler's, for Corral's classes of identical replicas:
- only replicas of a strictly lower priority are victims: a service never evicts one of its
  own priority or above, so two services can never evict each other in turn;
- a node is a candidate only if it passes every hard rule of the class as it stands
  (readiness, driver, selector, affinity, avoid) and evicting its victims frees enough of every
  resource the class asks for (gpu included) for at least one replica, within max_per_node;
- on a node, the class takes as many of its unplaced replicas as the node can hold once all
  its victims are gone; then victims are reprieved one by one, the highest priority (and,
  among equals, the one that frees the least) first, as long as those replicas still fit. No
  victim left can be spared on its own: nothing is evicted that is not needed;
- nodes are chosen one at a time: the lowest highest-victim-priority first, then the fewest
  evictions per replica placed, then the lowest sum of victim priorities, then the most
  replicas placed, then table order.
Soft rules (spread_by, prefer, strategy) are not weighed: preemption is the last resort.
`preempt_batch` commits what it decides into the table, so the next class of the batch (by
priority) sees the room as it will be.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from corral.workers.scheduler.placement import ClassRequest, batch_order, room_for
from corral.workers.scheduler.table import NodeTable

EPSILON = 1e-9


@dataclass(frozen=True)
class Running:
    """A replica running (assigned, not draining) on a node, as preemption sees it."""

    replica: str
    service: str
    node: str
    priority: int
    resources: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class NodePlan:
    """On `node`: evict `victims`, then place `take` replicas of the class."""

    node: str
    take: int
    victims: tuple[Running, ...]

    @property
    def note(self) -> str:
        """The reason kept with each replica placed here."""
        by_service: dict[str, tuple[int, int]] = {}
        for v in self.victims:
            count, _ = by_service.get(v.service, (0, v.priority))
            by_service[v.service] = (count + 1, v.priority)
        evicted = ", ".join(
            f"{count} of {service} (priority {priority})"
            for service, (count, priority) in sorted(by_service.items())
        )
        return f"preemption: evicted {evicted} on {self.node} to make room for {self.take}"


@dataclass
class Preemption:
    """What one class gets by preemption."""

    service: str
    priority: int
    plans: list[NodePlan] = field(default_factory=list)

    @property
    def placed(self) -> int:
        return sum(p.take for p in self.plans)

    @property
    def victims(self) -> list[Running]:
        return [v for p in self.plans for v in p.victims]


Vector = tuple[float, ...]
"""an amount of each resource the class asks for (a handful: plain tuples beat NumPy here)"""


def _usage(running: Running, names: Sequence[str]) -> Vector:
    """What a replica holds of each resource in `names`."""
    return tuple(float(running.resources.get(name, 0.0)) for name in names)


def _plus(a: Vector, b: Vector) -> Vector:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _minus(a: Vector, b: Vector) -> Vector:
    return tuple(x - y for x, y in zip(a, b, strict=True))


@dataclass
class _Node:
    position: int
    free: Vector
    """room of each needed resource now (negative when the node is overbooked)"""
    limit: int
    """replicas the class may still add here by max_per_node (UNLIMITED-like when none)"""
    victims: list[tuple[Running, Vector]]
    """candidates, in reprieve order"""
    everything: Vector = ()
    """room once every candidate is gone"""


def _reprieve_order(item: tuple[Running, Vector], need: Vector) -> tuple[int, float, str]:
    """The most important first, then the one that frees the least of what the class needs."""
    running, usage = item
    frees = sum(u / n for u, n in zip(usage, need, strict=True))
    return (-running.priority, frees, running.replica)


def _fits(free: Vector, need: Vector, k: int) -> bool:
    return all(f + EPSILON >= n * k for f, n in zip(free, need, strict=True))


def _capacity(free: Vector, need: Vector) -> int:
    if not need:
        return 1 << 30
    return max(min(math.floor((f + EPSILON) / n) for f, n in zip(free, need, strict=True)), 0)


def _plan_node(node: _Node, need: Vector, k: int, ids: list[str]) -> NodePlan | None:
    """The fewest victims (lowest priority first) that make room for k replicas here."""
    freed = node.everything
    if k <= 0 or not _fits(freed, need, k):
        return None
    evicted: list[Running] = []
    for running, usage in node.victims:
        kept = _minus(freed, usage)
        if _fits(kept, need, k):
            freed = kept  # reprieved: it stays
        else:
            evicted.append(running)
    if not evicted:
        return None  # the room was there already: not a preemption
    return NodePlan(ids[node.position], k, tuple(evicted))


def _rank(plan: NodePlan, position: int) -> tuple[int, float, int, int, int]:
    top = max(v.priority for v in plan.victims)
    return (
        top,
        len(plan.victims) / plan.take,
        sum(v.priority for v in plan.victims),
        -plan.take,
        position,
    )


def preempt(
    request: ClassRequest, wanted: int, table: NodeTable, running: Iterable[Running]
) -> Preemption:
    """Room for up to `wanted` replicas of `request` by evicting lower-priority replicas.
    Commits the evictions and the placements into `table`."""
    result = Preemption(request.service, request.priority)
    if wanted <= 0 or len(table) == 0:
        return result
    needs = [(r, a) for r, a in request.resources.items() if a > 0]
    found = [table.column(r) for r, _ in needs]
    if any(c is None for c in found):
        return result  # no node advertises a resource it asks for
    cols = [c for c in found if c is not None]
    names = [r for r, _ in needs]
    need: Vector = tuple(a for _, a in needs)
    counts = table.counts(request.service)
    eligible = room_for(request, table, counts) >= 0
    position = {node_id: i for i, node_id in enumerate(table.ids)}
    per_node: dict[int, list[tuple[Running, Vector]]] = {}
    for r in running:
        i = position.get(r.node)
        if i is None or r.priority >= request.priority or not eligible[i]:
            continue
        per_node.setdefault(i, []).append((r, _usage(r, names)))
    nodes: dict[int, _Node] = {}
    for i, victims in per_node.items():
        victims.sort(key=lambda item: _reprieve_order(item, need))
        free = tuple(float(table.capacity[c, i] - table.allocated[c, i]) for c in cols)
        limit = 1 << 30
        if request.max_per_node is not None:
            limit = max(request.max_per_node - int(counts[i]), 0)
        everything = free
        for _, usage in victims:
            everything = _plus(everything, usage)
        nodes[i] = _Node(i, free, limit, victims, everything)
    # a heap of each node's best plan. Nodes are independent, so a node's plan only changes
    # when fewer replicas are left than it takes: those are planned again at that moment
    current: dict[int, NodePlan] = {}
    heap: list[tuple[tuple[int, float, int, int, int], int, NodePlan]] = []
    # (rank, sequence, plan): the sequence keeps two plans from ever being compared
    sequence = itertools.count()
    for i, node in nodes.items():
        plan = _plan_for(node, need, wanted, table.ids)
        if plan is not None:
            current[i] = plan
            heap.append((_rank(plan, i), next(sequence), plan))
    heapq.heapify(heap)
    left = wanted
    most = max((p.take for p in current.values()), default=0)
    while left > 0 and heap:
        key, _, plan = heapq.heappop(heap)
        i = key[-1]
        if current.get(i) is not plan:
            continue  # replaced, or the node is used
        del current[i]
        _commit(table, request, plan, i, cols, need)
        result.plans.append(plan)
        left -= plan.take
        if 0 < left < most:
            for j, old in list(current.items()):
                if old.take > left:
                    again = _plan_for(nodes[j], need, left, table.ids)
                    if again is None:
                        del current[j]
                    else:
                        current[j] = again
                        heapq.heappush(heap, (_rank(again, j), next(sequence), again))
            most = max((p.take for p in current.values()), default=0)
    return result


def _plan_for(node: _Node, need: Vector, left: int, ids: list[str]) -> NodePlan | None:
    """The node's plan for as many of `left` replicas as it can take with every victim gone."""
    k = min(left, node.limit, _capacity(node.everything, need))
    return _plan_node(node, need, k, ids)


def _commit(
    table: NodeTable, request: ClassRequest, plan: NodePlan, i: int, cols: list[int], need: Vector
) -> None:
    """Take the victims off node i and put the class's replicas on it."""
    for victim in plan.victims:
        for resource, amount in victim.resources.items():
            col = table.column(resource)
            if col is not None:
                table.allocated[col, i] -= amount
        table.totals[i] -= 1
        dense = table.counts(victim.service)
        dense[i] = max(int(dense[i]) - 1, 0)
        where = np.flatnonzero(dense)
        table.placed[victim.service] = (where, dense[where])
    table.forget_sums()
    table.commit(
        request.service,
        np.array([i], dtype=np.intp),
        np.array([plan.take], dtype=np.int64),
        np.array(need, dtype=np.float64),
        np.array(cols, dtype=np.intp),
    )


def preempt_batch(
    requests: Sequence[tuple[ClassRequest, int]], table: NodeTable, running: Sequence[Running]
) -> list[Preemption]:
    """Preemption for several classes (each with the replicas it still wants), the highest
    priority first; a replica is evicted at most once. Results come in request order."""
    out: list[Preemption | None] = [None] * len(requests)
    gone: set[str] = set()
    for index in batch_order([r for r, _ in requests]):
        request, wanted = requests[index]
        left = [r for r in running if r.replica not in gone]
        done = preempt(request, wanted, table, left)
        gone.update(v.replica for v in done.victims)
        out[index] = done
    return [p for p in out if p is not None]
