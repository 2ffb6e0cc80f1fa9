"""Pure placement: spread one class of identical replicas over the nodes that fit them.

Feasibility and free slots are computed once for the class over all nodes, with NumPy; the
replicas are then handed out by counts (water-filling), never one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

UNLIMITED = 1 << 30


@dataclass(frozen=True)
class NodeView:
    id: str
    labels: dict[str, str]
    capacity: dict[str, float]
    allocated: dict[str, float]
    drivers: tuple[str, ...] = ("process",)
    ready: bool = True
    count: int = 0
    total: int = 0
    """replicas of every service on this node: spreads ties across services"""
    """replicas of the service being placed that already run here"""


@dataclass(frozen=True)
class ClassRequest:
    count: int
    resources: dict[str, float] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    driver: str = "process"


@dataclass(frozen=True)
class Solution:
    per_node: dict[str, int]
    """node id -> how many new replicas go there"""
    unplaced: int
    reason: str
    """why some replicas fit nowhere (empty when all were placed)"""
    why: dict[str, str]
    """node id -> a short reason for choosing it"""


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def solve(request: ClassRequest, nodes: list[NodeView]) -> Solution:
    if request.count <= 0:
        return Solution({}, 0, "", {})
    if not nodes:
        return Solution({}, request.count, "no nodes are registered", {})
    n = len(nodes)
    ready = np.fromiter((node.ready for node in nodes), bool, n)
    has_driver = np.fromiter((request.driver in node.drivers for node in nodes), bool, n)
    selector = np.fromiter(
        (all(node.labels.get(k) == v for k, v in request.node_selector.items()) for node in nodes),
        bool,
        n,
    )
    slots = np.full(n, UNLIMITED, dtype=np.int64)
    short: dict[str, npt.NDArray[np.bool_]] = {}
    fits: dict[str, npt.NDArray[np.int64]] = {}
    for resource, need in request.resources.items():
        if need <= 0:
            continue
        free = np.fromiter(
            (
                node.capacity.get(resource, 0.0) - node.allocated.get(resource, 0.0)
                for node in nodes
            ),
            float,
            n,
        )
        fit = np.floor(np.maximum(free, 0.0) / need + 1e-9).astype(np.int64)
        slots = np.minimum(slots, fit)
        short[resource] = fit < 1
        fits[resource] = fit
    eligible = ready & has_driver & selector
    slots = np.where(eligible, slots, 0)
    counts = np.fromiter((node.count for node in nodes), np.int64, n)
    totals = np.fromiter((node.total for node in nodes), np.int64, n)
    # ties go to the least loaded nodes first (stable: then by position, i.e. node id)
    order = np.lexsort((np.arange(n), totals))
    take = _water_fill(counts, slots, request.count, order)
    placed = int(take.sum())
    per_node = {nodes[i].id: int(take[i]) for i in np.flatnonzero(take)}
    why = {
        node_id: f"spread: {int(counts[i]) + int(take[i])} of this service on {node_id}"
        + (f", room for {int(slots[i])}" if slots[i] < UNLIMITED else "")
        for i, node_id in ((i, nodes[i].id) for i in np.flatnonzero(take))
    }
    unplaced = request.count - placed
    reason = ""
    if unplaced:
        parts: list[str] = []
        if (~ready).any():
            parts.append(f"{_plural(int((~ready).sum()), 'node')} not ready")
        mask = ready.copy()
        if (mask & ~has_driver).any():
            count = int((mask & ~has_driver).sum())
            verb = "lacks" if count == 1 else "lack"
            parts.append(f"{_plural(count, 'node')} {verb} the {request.driver} driver")
        mask &= has_driver
        if (mask & ~selector).any():
            count = int((mask & ~selector).sum())
            verb = "fails" if count == 1 else "fail"
            parts.append(f"{_plural(count, 'node')} {verb} node_selector")
        mask &= selector
        for resource, lacking in short.items():
            if (mask & lacking).any():
                count = int((mask & lacking).sum())
                verb = "lacks" if count == 1 else "lack"
                parts.append(f"{_plural(count, 'node')} {verb} {resource}")
        full = mask & (slots == take) & (take > 0)
        for resource, fit in fits.items():
            # nodes this placement filled, named by the resource that ran out
            ran_out = full & (fit == slots)
            if ran_out.any():
                parts.append(f"{_plural(int(ran_out.sum()), 'node')} ran out of {resource}")
                full &= ~ran_out
        reason = f"{unplaced} of {request.count} replicas fit no node: " + (
            ", ".join(parts) if parts else "no node is eligible"
        )
    return Solution(per_node, unplaced, reason, why)


def _water_fill(
    counts: npt.NDArray[np.int64],
    slots: npt.NDArray[np.int64],
    k: int,
    order: npt.NDArray[np.intp] | None = None,
) -> npt.NDArray[np.int64]:
    """Add up to k replicas, raising the lowest per-node counts first (spread), within slots.

    Finds the highest level L such that filling every node up to L needs at most k replicas,
    then hands the rest out one per node at level L, least loaded first (`order`).
    """
    capacity = int(np.minimum(slots, UNLIMITED).sum())
    k = min(k, capacity)
    if k <= 0:
        return np.zeros_like(counts)
    ceiling = counts + slots

    def needed(level: int) -> int:
        return int(np.clip(level - counts, 0, slots).sum())

    lo, hi = int(counts.min()), int(np.minimum(ceiling, counts.max() + k).max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if needed(mid) <= k:
            lo = mid
        else:
            hi = mid - 1
    take = np.clip(lo - counts, 0, slots)
    rest = k - int(take.sum())
    if rest > 0:
        room = (counts + take == lo) & (take < slots)
        ranked = np.arange(len(counts)) if order is None else order
        for index in ranked[room[ranked]][:rest]:
            take[index] += 1
    return take.astype(np.int64)
