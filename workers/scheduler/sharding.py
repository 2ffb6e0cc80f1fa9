"""Sharding a batch over node shards, and merging the shards' answers. Pure: no Ray, no I/O;
`executors.py` sends `solve_shard` to Ray tasks, one per shard.

- **Split.** Nodes are dealt round-robin into shards after sorting them by the labels the
  batch spreads by, so every shard holds the same mix of zones (or racks) and of sizes. The
  batch's groups of same-shape new services are found once, here. Each shard gets its share
  of the work: small units (a class alone, or a group) whole, to the shard with the least
  work so far; a large group's services dealt over the shards (each service whole); a large
  class split into near-equal shares, each with a `rotation` so that the shards' leftover
  replicas start in different domains: the remainders tile the domains and the class stays
  within one replica of even, as if one process had placed it.
- **Merge and repair.** The shards' answers are read as they arrive; their nodes'
  allocations are copied into the whole table (shards hold disjoint nodes); replicas a shard
  could not fit (its nodes were full, or its share of a selector's nodes was too small) are
  placed again by the one-process solver over every node.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from corral.workers.scheduler.placement import (
    ClassRequest,
    Dealt,
    Group,
    Solution,
    Unit,
    Why,
    collection_paused,
    solutions_of,
    solve_batch,
    solve_units,
    units_of,
)
from corral.workers.scheduler.table import Floats, Index, Ints, NodeTable

SPLIT_ABOVE = 0.05
"""a class larger than this share of one shard's replicas is split over every shard; smaller
ones go whole to the shard with the fewest replicas so far"""


@dataclass(frozen=True)
class Shard:
    rows: Index
    """positions of the shard's nodes in the whole table"""
    units: list[Unit]
    """the shard's share of the replicas: whole classes and groups, its part of each split
    class, and its members of each split group"""
    owners: list[list[int]]
    """for each of `units`, the positions of its services in the batch"""
    shared: frozenset[int] = frozenset()
    """positions of the classes split over every shard (the same set in each)"""


def deal(table: NodeTable, shards: int, keys: Sequence[str]) -> list[Index]:
    """Node positions for each shard: sorted by the spread labels (then shuffled with a fixed
    seed, so that no other label lines up with the dealing), then dealt round-robin."""
    order = np.random.default_rng(0).permutation(len(table))
    if keys:
        # lexsort's last key is the primary one: the first spread label, then the next...
        columns: list[npt.NDArray[np.int64]] = [np.arange(len(order), dtype=np.int64)]
        columns += [table.domains(k)[order].astype(np.int64) for k in reversed(keys)]
        order = order[np.lexsort(columns)]
    return [np.sort(order[s::shards]) for s in range(shards)]


def unit_cost(unit: Unit) -> float:
    """A rough price of placing a unit, in units of a plain class (about 0.2 ms on the
    benchmark's machine): the work per class is mostly fixed (a few dozen array passes),
    spread_by adds passes per domain and prefer per tier, and the rest grows with the
    replicas handed out; a group costs one placement of its whole, its replicas dealt out
    like any others. Fitted on measured placements (bench/README, "Seventh pass")."""
    c = _head(unit)
    spread = 1.5 if c.spread_by else 0.0
    return 1.0 + spread + 0.5 * len(c.prefer) + 0.15 * _size(unit) / 1000


def _size(unit: Unit) -> int:
    if isinstance(unit, ClassRequest):
        return unit.count
    return unit.template.count * len(unit.services)


def _head(unit: Unit) -> ClassRequest:
    return unit if isinstance(unit, ClassRequest) else unit.template


def split(
    table: NodeTable,
    classes: Sequence[ClassRequest],
    shards: int,
    cut: tuple[list[Unit], list[list[int]]] | None = None,
) -> list[Shard]:
    """Deal the nodes into shards and give each shard its share of the batch's units (groups
    of same-shape services, and classes alone: `cut`, or `units_of` the classes)."""
    shards = max(1, min(shards, len(table)))
    units, owners = cut if cut is not None else units_of(classes, table)
    # a group's members share its template: reading the units reads every class
    keys = sorted({k for k in (_head(u).spread_by for u in units) if k is not None})
    rows = deal(table, shards, keys)
    parts: list[list[Unit]] = [[] for _ in range(shards)]
    part_owners: list[list[list[int]]] = [[] for _ in range(shards)]
    load = [0.0] * shards
    big = SPLIT_ABOVE * sum(_size(u) for u in units) / shards
    base: dict[str, int] = {}
    shared: set[int] = set()

    def give(s: int, unit: Unit, own: list[int]) -> None:
        parts[s].append(unit)
        part_owners[s].append(own)
        load[s] += unit_cost(unit)

    for i, (unit, own) in enumerate(zip(units, owners, strict=True)):
        if _size(unit) <= big or shards == 1:
            give(min(range(shards), key=load.__getitem__), unit, own)
        elif isinstance(unit, Group):
            # its services go whole, a share of them to each shard
            for s in range(shards):
                if unit.services[s::shards]:
                    give(s, Group(unit.template, unit.services[s::shards]), own[s::shards])
        else:
            c = unit
            shared.update(own)
            whole, odd = divmod(c.count, shards)
            start = i % shards
            shares = [whole + (1 if (s - start) % shards < odd else 0) for s in range(shards)]
            domains = max(1, len(table.vocab.get(c.spread_by, {}))) if c.spread_by else 1
            offset = base.get(c.spread_by or "", 0)
            for s in range(shards):
                rotation = offset % domains if c.spread_by else None
                give(s, replace(c, count=shares[s], rotation=rotation), own)
                offset += shares[s] % domains
            if c.spread_by:
                # the next split class starts where this one stopped: domains fill evenly
                base[c.spread_by] = offset % domains
    return [Shard(rows[s], parts[s], part_owners[s], frozenset(shared)) for s in range(shards)]


@dataclass(frozen=True)
class Packed:
    """A shard's solutions as a few flat arrays: Ray moves thousands of small arrays slowly
    and a handful of large ones fast."""

    ids: list[str]
    bounds: Ints
    """solution i owns entries bounds[i]:bounds[i + 1] of the arrays below"""
    where: Index
    take: Ints
    after: Ints
    room: Ints
    codes: npt.NDArray[np.int32]
    share: Floats
    unplaced: list[int]
    reasons: list[str]
    whys: list[
        tuple[str, str | None, dict[str, int], dict[int, int], Sequence[Sequence[str]]] | None
    ]
    """each solution's reason parts without their arrays: kind, spread_by, the label's
    values, domain counts after, matched preferences"""

    def unpack(
        self, positions: Index | None = None, ids: list[str] | None = None
    ) -> list[Solution]:
        """The solutions; `positions` maps their node positions to a whole table's, whose
        node ids are `ids`."""
        out = []
        bounds = self.bounds.tolist()
        where = self.where if positions is None else positions[self.where]
        ids = self.ids if ids is None else ids
        for i, why in enumerate(self.whys):
            lo, hi = bounds[i], bounds[i + 1]
            explained = None
            if why is not None:
                kind, spread_by, values, domain_after, matched = why
                explained = Why(
                    kind,
                    self.after[lo:hi],
                    self.room[lo:hi],
                    spread_by,
                    self.codes[lo:hi] if spread_by is not None else None,
                    values,
                    domain_after,
                    self.share[lo:hi] if kind == "binpack" else None,
                    matched,
                )
            out.append(
                Solution(
                    ids,
                    where[lo:hi],
                    self.take[lo:hi],
                    self.unplaced[i],
                    self.reasons[i],
                    explained,
                )
            )
        return out


def pack(ids: list[str], solutions: Sequence[Solution]) -> Packed:
    sizes = [len(s.where) for s in solutions]
    bounds = np.zeros(len(solutions) + 1, dtype=np.int64)
    bounds[1:] = np.cumsum(sizes)

    def flat(parts: list[npt.NDArray[Any]], dtype: type) -> npt.NDArray[Any]:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    whys = [s.explained for s in solutions]

    def part(why: Why | None, n: int, name: str, fill: float) -> npt.NDArray[Any]:
        value = getattr(why, name, None) if why is not None else None
        return np.asarray(value) if value is not None else np.full(n, fill)

    def column(name: str, fill: float, dtype: type) -> npt.NDArray[Any]:
        return flat([part(w, n, name, fill) for w, n in zip(whys, sizes, strict=True)], dtype)

    return Packed(
        ids=ids,
        bounds=bounds,
        where=flat([s.where for s in solutions], np.intp),
        take=flat([s.take for s in solutions], np.int64),
        after=column("after", 0, np.int64),
        room=column("room", 0, np.int64),
        codes=column("codes", -1, np.int32),
        share=column("share", 0.0, np.float64),
        unplaced=[s.unplaced for s in solutions],
        reasons=[s.reason for s in solutions],
        whys=[
            None if w is None else (w.kind, w.spread_by, w.values, w.domain_after, w.matched)
            for w in whys
        ],
    )


@dataclass(frozen=True)
class Answer:
    """A shard's answer: the solutions of what it placed alone, packed, each with its unit
    (and member) in the shard's list; and each group it placed as one (its unit, and where
    each member went, as a few blocks)."""

    alone: list[tuple[int, int]]
    packed: Packed
    groups: list[tuple[int, Dealt]]
    allocated: Floats
    """the shard's nodes' allocations once it placed everything (resources, nodes)"""
    totals: Ints

    def singles(self, ids: list[str], positions: Index) -> list[tuple[int, int, Solution]]:
        """(unit, member, solution) for what the shard placed alone, with node positions
        mapped to the whole table whose ids are `ids`."""
        return [
            (k, m, solution)
            for (k, m), solution in zip(self.alone, self.packed.unpack(positions, ids), strict=True)
        ]


def solve_shard(table: NodeTable, units: list[Unit]) -> Answer:
    """What each Ray task runs: the one-process solver on its own nodes, packed. Ray hands
    arrays over read-only (zero copy): the ones placing writes to are copied first."""
    table.allocated = table.allocated.copy()
    table.totals = table.totals.copy()
    alone: list[tuple[int, int]] = []
    singles: list[Solution] = []
    groups: list[tuple[int, Dealt]] = []
    with collection_paused():
        for k, placed in enumerate(solve_units(units, table)):
            if isinstance(placed, Dealt):
                groups.append((k, placed))
                continue
            for m, solution in enumerate(solutions_of(placed, table.ids)):
                alone.append((k, m))
                singles.append(solution)
        packed = pack(table.ids, singles)
    return Answer(alone, packed, groups, table.allocated, table.totals)


def merge(
    table: NodeTable,
    classes: Sequence[ClassRequest],
    shards: Sequence[Shard],
    answers: Sequence[Answer],
) -> list[Solution]:
    """Commit the shards' placements into `table`, then place what they left over on every
    node. Solutions come in the order of `classes`."""
    return merge_arriving(table, classes, shards, enumerate(answers))


@collection_paused()
def merge_arriving(
    table: NodeTable,
    classes: Sequence[ClassRequest],
    shards: Sequence[Shard],
    arrivals: Iterable[tuple[int, Answer]],
) -> list[Solution]:
    """`merge`, reading (shard, answer) pairs in the order the shards finish: each answer's
    solutions are written out while the other shards are still being solved."""
    ids = table.ids
    merged: list[Solution | None] = [None] * len(classes)
    pieces: dict[int, list[tuple[int, Solution]]] = {}
    """the classes split over shards: each piece, with the shard it came from"""
    short: list[int] = []
    """classes a shard could not place whole"""
    for s, answer in arrivals:
        shard = shards[s]
        for k, m, piece in answer.singles(ids, shard.rows):
            i = shard.owners[k][m]
            if i in shard.shared:
                pieces.setdefault(i, []).append((s, piece))
                continue
            # a whole class: its positions are the whole table's already
            if piece.unplaced:  # the repair pass below gives the reason
                piece = Solution(ids, piece.where, piece.take, piece.unplaced, "", piece.explained)
                short.append(i)
            merged[i] = piece
            _record(table, classes[i].service, piece)
        for k, dealt in answer.groups:
            # a group's members are whole and placed in full
            group = shard.units[k]
            assert isinstance(group, Group)
            solved = dealt.solutions(ids, shard.rows)
            for i, piece in zip(shard.owners[k], solved, strict=True):
                merged[i] = piece
            booked = [(piece.where, piece.take) for piece in solved]
            table.placed.update(zip(group.services, booked, strict=True))
        # shards hold disjoint nodes: each one's allocations are the whole table's there
        table.allocated[:, shard.rows] = answer.allocated
        table.totals[shard.rows] = answer.totals
    table.forget_sums()
    for i, found in pieces.items():
        # in shard order, whatever order they came in
        parts = [p for _, p in sorted(found, key=_by_shard)]
        where = np.concatenate([p.where for p in parts])
        take = np.concatenate([p.take for p in parts])
        whole = Solution(ids, where, take, classes[i].count - int(take.sum()), "", pieces=parts)
        merged[i] = whole
        _record(table, classes[i].service, whole)
        if whole.unplaced:
            short.append(i)
    out: list[Solution] = []
    for i, solution in enumerate(merged):
        if solution is None:
            raise ValueError(f"no shard answered for class {i} ({classes[i].service})")
        out.append(solution)
    short.sort()
    leftovers = [replace(classes[i], count=out[i].unplaced, rotation=None) for i in short]
    for i, fixed in zip(short, solve_batch(leftovers, table), strict=True):
        was = out[i]
        out[i] = Solution(
            ids,
            np.concatenate([was.where, fixed.where]),
            np.concatenate([was.take, fixed.take]),
            fixed.unplaced,
            _whole(fixed.reason, classes[i].count, fixed.unplaced),
            pieces=[*(was.pieces or [_alone(was)]), fixed],
        )
    return out


def _by_shard(item: tuple[int, Solution]) -> int:
    return item[0]


def _record(table: NodeTable, service: str, placed: Solution) -> None:
    """Say in `table` whose replicas a shard booked."""
    if not len(placed.where):
        return
    found = table.placed.get(service)
    table.placed[service] = (
        (placed.where, placed.take)
        if found is None
        else (np.concatenate([found[0], placed.where]), np.concatenate([found[1], placed.take]))
    )


def _alone(solution: Solution) -> Solution:
    return Solution(
        solution.ids, solution.where, solution.take, 0, "", explained=solution.explained
    )


def _whole(reason: str, count: int, unplaced: int) -> str:
    """The repair pass counts only the leftovers; say it of the whole class."""
    if not reason:
        return ""
    _, _, tail = reason.partition(" replicas fit no node: ")
    return f"{unplaced} of {count} replicas fit no node: {tail}" if tail else reason
