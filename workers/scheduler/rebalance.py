"""Pure rebalance planning: moves, within a disruption budget, that each make the cluster
better. No I/O.

- **Spread** services: each move takes one replica from the node with the most of them in the
  most crowded domain (a `spread_by` value, or single nodes without spread_by) to the least
  loaded node with room in the emptiest domain, and is only made when it lowers that
  service's skew (max minus min over the domains its hard rules allow).
- **Binpack** services: the least used node whose every replica fits elsewhere, on nodes that
  are already in use, is emptied; the move count is how much it costs to free one node.

Every move respects the hard rules (selector, affinity, avoid, max_per_node, resources). The
moves are planned on a copy of the table, one after another, so later moves see the earlier
ones.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from corral.workers.scheduler.placement import ClassRequest, room_for
from corral.workers.scheduler.table import ABSENT, Index, NodeTable


@dataclass(frozen=True)
class Move:
    service: str
    source: str
    target: str
    reason: str
    skew: int = 0
    """spread: the service's skew this move lowers (what the search ranks moves by); 0 for
    a binpack move"""


def plan_moves(table: NodeTable, services: Sequence[ClassRequest], budget: int) -> list[Move]:
    """Up to `budget` moves. `services` carry each service's rules (their count is unused)."""
    work = copy.deepcopy(table)
    moves: list[Move] = []
    spread = [s for s in services if s.strategy != "binpack"]
    packs = [s for s in services if s.strategy == "binpack"]
    # spread first: the worst skew first, one move at a time, until nothing improves
    while len(moves) < budget:
        best: tuple[int, Move, int, int] | None = None
        for s in spread:
            found = _spread_move(work, s)
            if found is not None and (best is None or found[0] > best[0]):
                best = found
        if best is None:
            break
        _, move, source, target = best
        _shift(work, _class(services, move.service), source, target)
        moves.append(move)
    if packs and len(moves) < budget:
        moves += _free_nodes(work, packs, budget - len(moves))
    return moves


def _class(services: Sequence[ClassRequest], name: str) -> ClassRequest:
    return next(s for s in services if s.service == name)


def _spread_move(table: NodeTable, s: ClassRequest) -> tuple[int, Move, int, int] | None:
    counts = table.counts(s.service)
    if not counts.any():
        return None
    room = room_for(s, table, counts)
    eligible = room >= 0
    if s.spread_by is None:
        domain = np.arange(len(table), dtype=np.int32)
        size = len(table)
    else:
        domain = table.domains(s.spread_by)
        size = len(table.vocab.get(s.spread_by, {}))
    labelled = domain != ABSENT
    allowed = np.zeros(size, dtype=bool)
    allowed[domain[eligible & labelled]] = True
    per = np.bincount(domain[labelled], weights=counts[labelled], minlength=size).astype(int)
    if allowed.sum() < 2:
        return None
    values = np.where(allowed, per, -1)
    high = int(values.argmax())
    skew = int(per[high] - np.where(allowed, per, np.iinfo(np.int64).max).min())
    # the emptiest domain that still has room for one more
    with_room = np.zeros(size, dtype=bool)
    with_room[domain[(room > 0) & labelled]] = True
    lows = np.where(allowed & with_room, per, np.iinfo(np.int64).max)
    low = int(lows.argmin())
    if not with_room[low] or per[high] - per[low] <= 1:
        return None
    # from the node holding the most of the service in the crowded domain
    in_high = np.flatnonzero((domain == high) & (counts > 0))
    source = int(in_high[counts[in_high].argmax()])
    # to the least loaded node with room in the emptiest domain
    in_low = np.flatnonzero((domain == low) & (room > 0))
    if not len(in_low):
        return None
    target = int(in_low[np.lexsort((in_low, table.totals[in_low], counts[in_low]))[0]])
    if s.spread_by is None:
        why = f"spread: {per[high]} on {table.ids[source]}, {per[low]} on {table.ids[target]}"
    else:
        names = {code: value for value, code in table.vocab[s.spread_by].items()}
        why = (
            f"spread by {s.spread_by}: {per[high]} in {s.spread_by}={names[high]}, "
            f"{per[low]} in {s.spread_by}={names[low]}"
        )
    move = Move(s.service, table.ids[source], table.ids[target], why, skew)
    return skew, move, source, target


def best_move(table: NodeTable, s: ClassRequest) -> Move | None:
    """The move the search would make next for a spread service, on the table as it is."""
    found = _spread_move(table, s)
    return None if found is None else found[1]


def make_move(
    table: NodeTable, s: ClassRequest, move: Move, position: Mapping[str, int] | None = None
) -> bool:
    """Carry `move` out on the table if it still keeps the hard rules and fits (the source
    holds a replica, the target has room for one more); False, and nothing changed, if not.
    `position`: node id -> row, when the caller has it already."""
    position = position if position is not None else {n: i for i, n in enumerate(table.ids)}
    source, target = position.get(move.source), position.get(move.target)
    if source is None or target is None or source == target:
        return False
    counts = table.counts(s.service)
    if counts[source] <= 0 or room_for(s, table, counts)[target] <= 0:
        return False
    _shift(table, s, source, target)
    return True


def _shift(table: NodeTable, s: ClassRequest, source: int, target: int) -> None:
    need = [(table.column(r), a) for r, a in s.resources.items() if a > 0]
    cols = np.array([c for c, _ in need if c is not None], dtype=np.intp)
    amounts = np.array([a for c, a in need if c is not None])
    table.commit(s.service, np.array([source]), np.array([-1]), amounts, cols)
    table.commit(s.service, np.array([target]), np.array([1]), amounts, cols)


def _free_nodes(table: NodeTable, packs: Sequence[ClassRequest], budget: int) -> list[Move]:
    """Empty the least used nodes whose replicas all fit on other nodes already in use."""
    moves: list[Move] = []
    names = {s.service for s in packs}
    tried: set[int] = set()
    while len(moves) < budget:
        used = np.flatnonzero(table.totals > 0)
        candidates = [i for i in used if int(i) not in tried]
        if len(candidates) < 2:
            break
        node = min(candidates, key=lambda i: (int(table.totals[i]), int(i)))
        tried.add(int(node))
        on_node = [
            (s, int(table.counts(s.service)[node])) for s in packs if table.counts(s.service)[node]
        ]
        others = [(name, where) for name, where in table.placed.items() if name not in names]
        if any(int(c[where == node].sum()) for name, (where, c) in others):
            continue  # a service that is not being packed runs here: the node stays in use
        trial = copy.deepcopy(table)
        planned: list[Move] = []
        for s, count in on_node:
            for _ in range(count):
                counts = trial.counts(s.service)
                room = room_for(s, trial, counts)
                room[node] = 0
                room[trial.totals == 0] = 0  # only onto nodes already in use
                open_ = np.flatnonzero(room > 0)
                if not len(open_):
                    planned = []
                    break
                share = _fullness(trial, s, open_)
                target = int(open_[np.lexsort((open_, -share))[0]])
                _shift(trial, s, int(node), target)
                planned.append(
                    Move(
                        s.service,
                        table.ids[node],
                        table.ids[target],
                        f"binpack: frees {table.ids[node]} ({int(table.totals[node])} "
                        f"replicas); {table.ids[target]} is in use",
                    )
                )
            if not planned:
                break
        if planned and len(moves) + len(planned) <= budget:
            moves += planned
            table.allocated[:] = trial.allocated
            table.totals[:] = trial.totals
            table.placed = trial.placed
            table.forget_sums()
    return moves


def _fullness(table: NodeTable, s: ClassRequest, where: Index) -> np.ndarray:
    share = np.zeros(len(where))
    for r, a in s.resources.items():
        col = table.column(r)
        if col is not None and a > 0:
            cap = np.maximum(table.capacity[col, where], 1e-12)
            share = np.maximum(share, table.allocated[col, where] / cap)
    return share
