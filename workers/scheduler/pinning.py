"""Pinned placements: a rebalance plan names the node each moved replica should land on, and the
scale-out that carries it out asks for exactly those nodes. Pure: no I/O.

A pin is a request, not an order. The scheduler checks it on the cluster as it is now, with
the same hard rules and room as any placement (ready, driver, selector, affinity, avoid,
resources, max_per_node), one pin after another so two pins on one node see each other; a
pin that still fits is booked there (with compare-and-set, like any booking), and one that
no longer fits goes to the usual placement with a note saying why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from corral.workers.scheduler.placement import ClassRequest, room_for, solve_batch
from corral.workers.scheduler.table import NodeTable


@dataclass(frozen=True)
class Pinned:
    kept: list[tuple[str, str, str]] = field(default_factory=list)
    """(replica, node, reason) for each pin that fits: committed into the table"""
    refused: dict[str, str] = field(default_factory=dict)
    """replica -> why its node no longer fits (it goes to the usual placement)"""


def place_pinned(
    table: NodeTable, request: ClassRequest, pins: Sequence[tuple[str, str]]
) -> Pinned:
    """Check each (replica, node) pin in turn and commit those that fit into `table`."""
    out = Pinned()
    if request.avoid:
        table.avoids[request.service] = request.avoid  # as solve_batch does
    position = {node: i for i, node in enumerate(table.ids)}
    needs = [(table.column(r), a) for r, a in request.resources.items() if a > 0]
    missing = sorted(r for r, a in request.resources.items() if a > 0 and table.column(r) is None)
    if missing:
        for replica, node in pins:
            out.refused[replica] = f"planned node {node} no longer fits (lacks {missing[0]})"
        return out
    cols = np.array([c for c, _ in needs if c is not None], dtype=np.intp)
    need = np.array([a for _, a in needs], dtype=np.float64)
    for replica, node in pins:
        i = position.get(node)
        if i is None:
            out.refused[replica] = f"planned node {node} is gone"
            continue
        counts = table.counts(request.service)
        room = int(room_for(request, table, counts)[i])
        if room <= 0:
            why = _why_not(table, request, i)
            out.refused[replica] = f"planned node {node} no longer fits ({why})"
            continue
        table.commit(request.service, np.array([i]), np.array([1]), need, cols)
        note = f"rebalance: on {node} as planned, {int(counts[i]) + 1} of this service there"
        out.kept.append((replica, node, note))
    return out


def _why_not(table: NodeTable, request: ClassRequest, i: int) -> str:
    """The first rule the node fails, in the words `corral explain` uses."""
    alone = solve_batch([replace(request, count=1, rotation=None)], table.shard(np.array([i])))
    _, _, tail = alone[0].reason.partition(" fit no node: ")
    return tail.removeprefix("1 node ") or "no room"
