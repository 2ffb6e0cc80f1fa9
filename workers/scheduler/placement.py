"""Pure batch placement: every service is one class of identical replicas.

For each class, feasibility (hard rules) and free slots are computed once over all nodes with
NumPy; the replicas are then handed out by counts, never one at a time:
- `spread_by` first splits the class over the label's values (zones, racks) by water-filling,
  so that every domain ends up within one replica of the others where capacity allows;
- inside a domain, `prefer` ranks nodes into tiers (by the sum of the matched weights), and a
  higher tier is filled before a lower one is touched;
- inside a tier, `spread` water-fills the nodes (fewest of this service first, then the least
  loaded), `binpack` fills the fullest nodes to the brim first.
Classes of a batch are placed by priority, then (under binpack) the largest first, and each
commits into the table, so the next sees what is left. Each placement keeps a short reason,
and replicas that fit nowhere get one that counts why each node was ruled out.
"""

from __future__ import annotations

import gc
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from corral.schemas.spec import Affinity, Placement, Preference
from corral.workers.scheduler.filling import (
    lowest,
    ordered_fill,
    proportional_fill,
    rotation_key,
    water_fill,
)
from corral.workers.scheduler.table import ABSENT, Bools, Floats, Index, Ints, NodeTable, NodeView

UNLIMITED = 1 << 30
__all__ = [
    "UNLIMITED",
    "ClassRequest",
    "Group",
    "NodeTable",
    "NodeView",
    "Solution",
    "solve",
    "solve_batch",
    "solve_cut",
    "solve_units",
    "units_of",
]


@dataclass(frozen=True)
class ClassRequest:
    count: int
    resources: dict[str, float] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    driver: str = "process"
    service: str = ""
    node_affinity: tuple[Affinity, ...] = ()
    max_per_node: int | None = None
    avoid: tuple[str, ...] = ()
    spread_by: str | None = None
    prefer: tuple[Preference, ...] = ()
    strategy: str = "spread"
    priority: int = 0
    rotation: int | None = None
    """where the spread_by remainder starts among the domains (Ray shards set it, so that
    their remainders land in different domains); None: the least loaded domains first"""

    @classmethod
    def of(
        cls,
        service: str,
        count: int,
        resources: dict[str, float],
        rules: Placement,
        driver: str = "process",
    ) -> ClassRequest:
        return cls(
            count=count,
            resources=resources,
            node_selector=dict(rules.node_selector),
            driver=driver,
            service=service,
            node_affinity=tuple(rules.node_affinity),
            max_per_node=rules.max_per_node,
            avoid=tuple(rules.avoid),
            spread_by=rules.spread_by,
            prefer=tuple(rules.prefer),
            strategy=rules.strategy,
            priority=rules.priority,
        )


@dataclass(slots=True)
class Why:
    """What each placement's reason is made of, captured when the class is placed (the table
    moves on afterwards); the text is only written when someone reads it."""

    kind: str
    after: Ints
    """replicas of the service on each chosen node, after this placement"""
    room: Ints
    """slots the node had for this class before it"""
    spread_by: str | None = None
    codes: npt.NDArray[np.int32] | None = None
    """spread_by: each chosen node's label code"""
    values: dict[str, int] = field(default_factory=dict)
    """spread_by: label value -> code"""
    domain_after: dict[int, int] = field(default_factory=dict)
    """spread_by: replicas of the service in each domain it was placed in, afterwards"""
    share: Floats | None = None
    """binpack: the node's dominant share after this placement"""
    matched: Sequence[Sequence[str]] = ()
    """preferences each chosen node meets (immutable defaults here and in `Solution`: an
    empty list per object was two more objects per service for the cycle collector to walk)"""

    def render(self, ids: list[str], where: Index) -> list[str]:
        notes = []
        names = {code: value for value, code in self.values.items()}
        for j, i in enumerate(where):
            node = ids[i]
            after = int(self.after[j])
            code = int(self.codes[j]) if self.codes is not None else ABSENT
            if self.kind == "binpack" and self.share is not None:
                note = f"binpack: {after} of this service on {node}, {self.share[j]:.0%} full"
            elif self.spread_by is not None and code == ABSENT:
                note = (
                    f"spread: {after} of this service on {node} "
                    f"(no {self.spread_by} label; the labelled nodes were full)"
                )
            elif self.spread_by is not None:
                note = (
                    f"spread by {self.spread_by}: {self.domain_after.get(code, 0)} of this "
                    f"service in {self.spread_by}={names.get(code)}, {after} on {node}"
                )
            else:
                note = f"spread: {after} of this service on {node}"
            if self.room[j] < UNLIMITED:
                note += f", room for {int(self.room[j])}"
            if self.matched and self.matched[j]:
                note += f"; preferred ({', '.join(self.matched[j])})"
            notes.append(note)
        return notes


@dataclass(eq=False, slots=True)
class Solution:
    """Where one class went. `where`/`take` are node positions in the table and counts."""

    ids: list[str]
    where: Index
    take: Ints
    unplaced: int
    reason: str
    """why some replicas fit nowhere (empty when all were placed)"""
    explained: Why | None = None
    pieces: Sequence[Solution] = ()
    """a merged solution (Ray shards, then repair) keeps its parts' reasons; `where` is then
    their positions, in order, in the whole table"""

    @property
    def notes(self) -> list[str]:
        """one short reason per entry of `where`"""
        if self.pieces:
            return [note for piece in self.pieces for note in piece.notes]
        return [] if self.explained is None else self.explained.render(self.ids, self.where)

    @property
    def per_node(self) -> dict[str, int]:
        """node id -> how many new replicas go there"""
        out: dict[str, int] = {}
        for i, t in zip(self.where, self.take, strict=True):
            out[self.ids[i]] = out.get(self.ids[i], 0) + int(t)
        return out

    @property
    def why(self) -> dict[str, str]:
        """node id -> a short reason for choosing it"""
        return {self.ids[i]: note for i, note in zip(self.where, self.notes, strict=True)}

    @property
    def placed(self) -> int:
        return int(self.take.sum())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Solution):
            return NotImplemented
        return (self.per_node, self.unplaced, self.reason, self.why) == (
            other.per_node,
            other.unplaced,
            other.reason,
            other.why,
        )

    __hash__ = None  # type: ignore[assignment]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _verb(count: int, singular: str, plural: str) -> str:
    return singular if count == 1 else plural


def solve(request: ClassRequest, nodes: list[NodeView]) -> Solution:
    """Place one class on nodes described by views (`count` is this class's replicas there)."""
    if request.count <= 0:
        return _empty(request, [id_ for id_ in (n.id for n in nodes)])
    if not nodes:
        return Solution([], _no_index(), _no_ints(), request.count, "no nodes are registered")
    table = NodeTable.build(nodes, service=request.service)
    return solve_batch([request], table)[0]


def batch_order(requests: Sequence[ClassRequest]) -> list[int]:
    """Higher priority first; among equals, binpack classes by size (largest first, as in
    first-fit-decreasing), then in the order given."""

    def size(r: ClassRequest) -> float:
        return sum(r.resources.values()) if r.strategy == "binpack" else 0.0

    return sorted(
        range(len(requests)), key=lambda i: (-requests[i].priority, -size(requests[i]), i)
    )


def solve_batch(requests: Sequence[ClassRequest], table: NodeTable) -> list[Solution]:
    """Place every class, committing each into `table`; solutions come in request order."""
    with collection_paused():
        units, owners = units_of(requests, table)
        return solve_cut(units, owners, table)


def solve_cut(units: Sequence[Unit], owners: list[list[int]], table: NodeTable) -> list[Solution]:
    """`solve_batch` on a batch already cut into units (`units_of`): solutions in the order
    of the batch the owners point into."""
    out: list[Solution | None] = [None] * sum(len(o) for o in owners)
    with collection_paused():
        for placed, positions in zip(solve_units(units, table), owners, strict=True):
            for i, solution in zip(positions, solutions_of(placed, table.ids), strict=True):
                out[i] = solution
    return [s for s in out if s is not None]


def note_avoids(requests: Iterable[Unit], table: NodeTable) -> None:
    """Tell the table what each class of a batch avoids (the rule is mutual: the avoided
    services keep off the avoider's nodes too)."""
    for r in requests:
        if isinstance(r, ClassRequest) and r.avoid:
            table.avoids[r.service] = r.avoid


class _Pauses:
    """How many placements have the cycle collector paused, and whether it was on before."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.was_on = False


_pauses = _Pauses()


@contextmanager
def collection_paused() -> Iterator[None]:
    """Keep Python's cycle collector off while a batch is placed. Placing a large batch
    makes tens of thousands of small objects (solutions, reasons, array views) and no
    cycles; with the collector on, each generation-0 threshold crossed walked them again, a
    third of the time of a 1,000,000-replica batch. Nested and concurrent uses (threads) are
    counted: the collector comes back on when the last one ends, if it was on before."""
    with _pauses.lock:
        if _pauses.depth == 0:
            _pauses.was_on = gc.isenabled()
            gc.disable()
        _pauses.depth += 1
    try:
        yield
    finally:
        with _pauses.lock:
            _pauses.depth -= 1
            if _pauses.depth == 0 and _pauses.was_on:
                gc.enable()


@dataclass(frozen=True)
class Group:
    """New services of one shape, placed as one (see `identical_groups`): each member is
    `template` under another service name."""

    template: ClassRequest
    services: list[str]

    def whole(self) -> ClassRequest:
        """The group as one class of all its replicas."""
        t, size = self.template, len(self.services)
        most = None if t.max_per_node is None else t.max_per_node * size
        return replace(t, count=t.count * size, max_per_node=most)

    def member(self, service: str) -> ClassRequest:
        return replace(self.template, service=service)


Unit = ClassRequest | Group
"""what the solver places in one go: a class alone, or a group"""


def units_of(
    requests: Sequence[ClassRequest], table: NodeTable
) -> tuple[list[Unit], list[list[int]]]:
    """The batch as units: each group where its first member is, every other class alone;
    and, for each unit, the positions of its services in `requests`."""
    note_avoids(requests, table)
    same = identical_groups(requests, table)
    first_of: list[int | None] = [None] * len(requests)
    for head, members in same.items():
        for j in members:
            first_of[j] = head
    units: list[Unit] = []
    owners: list[list[int]] = []
    for i, r in enumerate(requests):
        first = first_of[i]
        if first is None:
            units.append(r)
            owners.append([i])
        elif first == i:
            units.append(Group(r, [requests[j].service for j in same[i]]))
            owners.append(same[i])
    return units, owners


def solve_units(units: Sequence[Unit], table: NodeTable) -> list[Placed]:
    """Place every unit in batch order (`batch_order`, a group as its whole), committing each
    into `table`; answers come in the order of `units`."""
    note_avoids(units, table)
    heads = [u if isinstance(u, ClassRequest) else u.whole() for u in units]
    out: list[Placed | None] = [None] * len(units)
    table.pool = binpack_pool(table, [h for h in heads if h.strategy == "binpack"])
    try:
        for k in batch_order(heads):
            unit = units[k]
            if isinstance(unit, ClassRequest):
                out[k] = _place(unit, table)
                continue
            dealt = _place_group(unit, table)
            if dealt is None:
                # it does not fit whole: each member alone, with its own reason
                out[k] = [_place(unit.member(name), table) for name in unit.services]
            else:
                out[k] = dealt
    finally:
        table.pool = None
    return [p for p in out if p is not None]


def solutions_of(placed: Placed, ids: list[str]) -> list[Solution]:
    """A unit's answer as one solution per service, in the unit's order."""
    if isinstance(placed, Solution):
        return [placed]
    if isinstance(placed, Dealt):
        return placed.solutions(ids)
    return placed


GROUP_AT_LEAST = 2
"""services with the same shape are placed as one group from this many on"""


def _shape(r: ClassRequest) -> tuple[object, ...]:
    """Everything placement reads of a class except its service's name."""
    return (
        r.count,
        frozenset(r.resources.items()),
        frozenset(r.node_selector.items()) if r.node_selector else None,
        r.driver,
        tuple((a.key, a.operator, tuple(a.values)) for a in r.node_affinity)
        if r.node_affinity
        else (),
        r.max_per_node,
        r.spread_by,
        r.strategy,
        r.priority,
    )


def identical_groups(requests: Sequence[ClassRequest], table: NodeTable) -> dict[int, list[int]]:
    """Classes that can be placed as one: new services (none of their replicas is on the
    table yet) with the same shape, no `avoid` either way, no `prefer` and no shard rotation.
    Keyed by the first member's position in the batch, which is where the group is placed;
    every group has at least GROUP_AT_LEAST members."""
    named = Counter(r.service for r in requests)
    # services that are never grouped, whatever their shape
    kept_out = {name for name, times in named.items() if times > 1}
    kept_out.update(named.keys() & table.placed.keys())
    kept_out.update(table.avoids)
    kept_out.update(name for names in table.avoids.values() for name in names)
    kept_out.add("")
    by_shape: dict[tuple[object, ...], list[int]] = {}
    for i, r in enumerate(requests):
        if r.count <= 0 or r.service in kept_out or r.prefer or r.rotation is not None:
            continue
        by_shape.setdefault(_shape(r), []).append(i)
    return {g[0]: g for g in by_shape.values() if len(g) >= GROUP_AT_LEAST}


Narrow = npt.NDArray[np.signedinteger[Any]]


def narrow(values: npt.NDArray[np.signedinteger[Any]]) -> Narrow:
    """The same integers in the fewest bytes that hold them (8, 16 or 32 bits; 64 if need
    be): what a Ray shard sends back is mostly these blocks."""
    if values.size == 0:
        return values.astype(np.int8)
    low, high = int(values.min()), int(values.max())
    for kind in (np.int8, np.int16, np.int32):
        info = np.iinfo(kind)
        if info.min <= low and high <= info.max:
            return values.astype(kind)
    return values.astype(np.int64)


@dataclass(eq=False)
class Dealt:
    """Where a group of same-shape new services went: row s of each block is service s's
    replicas, one per column, in the order they were dealt (a service's replicas on one
    node are adjacent)."""

    kind: str
    nodes: Narrow
    """(services, count): node positions"""
    rooms: Narrow
    """(services, count): what the node had room for when the replica came to it"""
    spread_by: str | None = None
    codes: Narrow | None = None
    """spread_by: (services, count), each node's label code"""
    values: dict[str, int] = field(default_factory=dict)
    per_domain: Ints | None = None
    """spread_by: (services, domains), each service's replicas in each labelled domain"""
    share: Floats | None = None
    """binpack: (services, count), the node's dominant share once the group was booked"""

    def solutions(self, ids: list[str], positions: Index | None = None) -> list[Solution]:
        """One solution per service, in row order; `positions` maps the rows' node
        positions to the table of `ids` (a Ray shard's to the whole table)."""
        nodes = self.nodes.astype(np.intp) if positions is None else positions[self.nodes]
        rooms = self.rooms.astype(np.int64)
        coded = None if self.codes is None else self.codes.astype(np.int32)
        size, count = nodes.shape
        ones = np.ones(count, dtype=np.int64)
        repeated = np.zeros(size, dtype=bool)
        if count > 1:
            repeated = (nodes[:, 1:] == nodes[:, :-1]).any(axis=1)
        domains: list[dict[int, int]] = [{} for _ in range(size)]
        if self.per_domain is not None:
            domains = [{c: n for c, n in enumerate(row) if n} for row in self.per_domain.tolist()]
        nothing: list[None] = [None] * size
        codes = nothing if coded is None else list(coded)
        share = nothing if self.share is None else list(self.share)
        kind, spread_by, values = self.kind, self.spread_by, self.values
        out = []
        for where, room, code, full, domain, twice in zip(
            list(nodes), list(rooms), codes, share, domains, repeated.tolist(), strict=True
        ):
            why = Why(kind, ones, room, spread_by, code, values, domain, full)
            if twice:
                where, take, why = _merge_repeats(where, why)
                out.append(Solution(ids, where, take, 0, "", why))
            else:
                out.append(Solution(ids, where, ones, 0, "", why))
        return out


Placed = Solution | Dealt | list[Solution]
"""a unit's answer: a class's solution; a group's; or its members' (one by one, in order)
when the group did not fit whole"""


def _merge_repeats(row: Index, why: Why) -> tuple[Index, Ints, Why]:
    """A dealt service's replicas once those on one node (adjacent) are merged: the count on
    the node after, and the room when the first came."""
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    take = np.diff(np.r_[starts, len(row)]).astype(np.int64)
    merged = replace(
        why,
        after=take,
        room=why.room[starts],
        codes=None if why.codes is None else why.codes[starts],
        share=None if why.share is None else why.share[starts],
    )
    return row[starts], take, merged


def _place_group(group: Group, table: NodeTable) -> Dealt | None:
    """Place a group (new services of one shape, `count` replicas each) as one class of
    their replicas together, then deal those out round-robin: node by node (domain by domain
    under spread_by), each service takes the next replica in turn. So each service gets
    exactly `count`, none gets more than its share of a node (max_per_node holds for each),
    and under spread_by each service's domains stay within one replica of each other
    wherever the group's do. None when the group does not fit whole (nothing is booked):
    then its members are placed one by one, and each gets its own reason."""
    first, size = group.template, len(group.services)
    whole = group.whole()
    plan = _plan(whole, table, group=size)
    if int(plan.take.sum()) < whole.count:
        return None
    where, taken, need, cols = plan.booking()
    if first.spread_by is not None:
        # each domain's nodes in one run, so every service takes its even share of it
        where = where[np.argsort(table.domains(first.spread_by)[where], kind="stable")]
        taken = plan.take[where]
    table.book(where, taken, need, cols)
    # replica r (in node order) goes to service r % size: row s of a (count, size) view
    nodes = np.repeat(where, taken)
    on_node = np.arange(len(nodes)) - np.repeat(np.cumsum(taken) - taken, taken)
    room = np.full(len(nodes), UNLIMITED, dtype=np.int64)
    if plan.fits:
        resources = np.minimum.reduce([fit[nodes] for fit in plan.fits]).astype(np.int64)
        room = np.minimum(room, resources - on_node)
    if first.max_per_node is not None:
        room = np.minimum(room, first.max_per_node)
    rows = np.ascontiguousarray(nodes.reshape(first.count, size).T)
    dealt = Dealt(
        first.strategy if first.strategy == "binpack" else "spread",
        narrow(rows),
        narrow(np.ascontiguousarray(room.reshape(first.count, size).T)),
    )
    if first.strategy == "binpack":
        share = np.zeros(rows.shape)
        for col in cols:
            cap = np.maximum(table.capacity[col][rows], 1e-12)
            share = np.maximum(share, table.allocated[col][rows] / cap)
        dealt.share = share
    elif first.spread_by is not None:
        key = first.spread_by
        codes = table.domains(key)[rows]
        width = len(table.vocab.get(key, {})) + 1  # column 0 counts the unlabelled
        flat = ((codes + 1) + width * np.arange(size)[:, None]).ravel()
        per_domain = np.bincount(flat, minlength=size * width).reshape(size, width)
        dealt.spread_by, dealt.codes, dealt.values = key, narrow(codes), table.vocab.get(key, {})
        dealt.per_domain = per_domain[:, 1:]
    ones = np.ones(first.count, dtype=np.int64)
    for s, name in enumerate(group.services):
        table.placed[name] = (rows[s], ones)  # repeats summed by `counts`
    return dealt


POOL_SLACK = 0.0
"""the binpack pool covers the batch's demand plus this much; what does not fit in the pool
after rounding goes to the fullest nodes outside it"""


def binpack_pool(table: NodeTable, requests: Sequence[ClassRequest]) -> Bools | None:
    """The fewest nodes that hold a batch's binpack demand in every resource: the nodes
    already in use first (fullest first), then the largest empty ones. Scarce resources (the
    least total capacity, such as gpu) choose first, so that their nodes also count towards
    cpu and memory."""
    if not requests:
        return None
    demand: dict[int, float] = {}
    for r in requests:
        for resource, amount in r.resources.items():
            col = table.column(resource)
            if col is not None and amount > 0:
                demand[col] = demand.get(col, 0.0) + amount * r.count
    if not demand:
        return None
    usable = table.ready.copy()
    pool = np.zeros(len(table), dtype=bool)
    used = ((table.totals > 0) | (table.allocated > 0).any(axis=0)) & usable
    for col in sorted(demand, key=lambda c: float(table.capacity[c].sum())):
        free = np.maximum(table.capacity[col] - table.allocated[col], 0.0)
        need = demand[col] * (1 + POOL_SLACK) - float(free[pool].sum())
        if need <= 0:
            continue
        candidates = np.flatnonzero(usable & ~pool & (free > 0))
        # in use first, then by free room, largest first
        order = np.lexsort((-free[candidates], ~used[candidates]))
        ranked = candidates[order]
        covered = np.cumsum(free[ranked])
        count = int(np.searchsorted(covered, need)) + 1
        pool[ranked[:count]] = True
    return pool


def _no_index() -> Index:
    return np.zeros(0, dtype=np.intp)


def _no_ints() -> Ints:
    return np.zeros(0, dtype=np.int64)


def _empty(request: ClassRequest, ids: list[str]) -> Solution:
    return Solution(ids, _no_index(), _no_ints(), 0, "")


@dataclass
class _Filters:
    """The hard rules, applied in this order; a node is counted under the first it fails."""

    steps: list[tuple[str, Bools]]
    eligible: Bools


def _filters(request: ClassRequest, table: NodeTable) -> _Filters:
    n = len(table)
    steps: list[tuple[str, Bools]] = [("ready", table.ready)]
    steps.append(("driver", table.driver(request.driver)))
    if request.node_selector:
        selector = np.ones(n, dtype=bool)
        for key, value in request.node_selector.items():
            selector &= table.label(key, value)
        steps.append(("node_selector", selector))
    if request.node_affinity:
        affinity = np.ones(n, dtype=bool)
        for expr in request.node_affinity:
            affinity &= table.affinity(expr)
        steps.append(("node_affinity", affinity))
    avoided = table.avoided_by(request.service) if request.service else list(request.avoid)
    if avoided:
        clash = np.zeros(n, dtype=bool)
        for other in avoided:
            clash |= table.presence(other)
        steps.append(("avoid", ~clash))
    eligible = np.ones(n, dtype=bool)
    for _, mask in steps:
        eligible &= mask
    return _Filters(steps, eligible)


@dataclass
class _Plan:
    """Where a class would go, before anything is booked."""

    filters: _Filters
    needs: list[tuple[str, float]]
    columns: list[int | None]
    fits: list[Floats]
    """each asked resource: how many replicas it leaves room for on each node"""
    per_node_room: Ints | None
    slots: Ints
    """replicas each node can take (resources, max_per_node, hard rules)"""
    counts: Ints
    take: Ints
    domain_after: dict[int, int]

    def booking(self) -> tuple[Index, Ints, Floats, Index]:
        """The chosen nodes, how many on each, and what each replica needs of which column."""
        where = np.flatnonzero(self.take)
        cols = np.array([c for c in self.columns if c is not None], dtype=np.intp)
        need = np.array(
            [a for c, (_, a) in zip(self.columns, self.needs, strict=True) if c is not None]
        )
        return where, self.take[where], need, cols


def _plan(request: ClassRequest, table: NodeTable, group: int = 1) -> _Plan:
    """Feasibility, room and the fill for one class (`group` > 1: a group of that many
    identical services placed as one, see `_place_group`)."""
    n = len(table)
    filters = _filters(request, table)
    needs = [(r, need) for r, need in request.resources.items() if need > 0]
    columns = [table.column(r) for r, _ in needs]
    fits: list[Floats] = []
    for col, (_, amount) in zip(columns, needs, strict=True):
        if col is None:
            fits.append(np.zeros(n))
        else:
            fits.append(np.floor((table.capacity[col] - table.allocated[col]) / amount + 1e-9))
    if fits:
        lowest = fits[0] if len(fits) == 1 else np.minimum.reduce(fits)
        slots = np.maximum(lowest, 0).astype(np.int64)
    else:
        slots = np.full(n, UNLIMITED, dtype=np.int64)
    counts = table.counts(request.service)
    per_node_room: Ints | None = None
    if request.max_per_node is not None:
        per_node_room = np.maximum(request.max_per_node - counts, 0)
        slots = np.minimum(slots, per_node_room)
    slots[~filters.eligible] = 0
    take, domain_after = _distribute(request, table, counts, slots, group)
    return _Plan(filters, needs, columns, fits, per_node_room, slots, counts, take, domain_after)


def _place(request: ClassRequest, table: NodeTable) -> Solution:
    if request.count <= 0:
        return _empty(request, table.ids)
    if len(table) == 0:
        return Solution(
            table.ids, _no_index(), _no_ints(), request.count, "no nodes are registered"
        )
    plan = _plan(request, table)
    where, taken, need, cols = plan.booking()
    unplaced = request.count - int(taken.sum())
    reason = ""
    if unplaced:
        reason = _unplaced_reason(
            request, plan.filters, plan.needs, plan.fits, plan.per_node_room, plan.slots, plan.take
        )
    table.commit(request.service, where, taken, need, cols)
    why = _why(request, table, plan.counts, plan.slots, where, taken, cols, plan.domain_after)
    return Solution(table.ids, where, taken, unplaced, reason, why)


def room_for(request: ClassRequest, table: NodeTable, counts: Ints) -> Ints:
    """Replicas of the class each node could take now: by resources and max_per_node, and -1
    where a hard rule (readiness, driver, selector, affinity, avoid) rules the node out."""
    filters = _filters(request, table)
    slots = np.full(len(table), UNLIMITED, dtype=np.int64)
    for r, amount in request.resources.items():
        if amount <= 0:
            continue
        col = table.column(r)
        if col is None:
            return np.where(filters.eligible, 0, -1).astype(np.int64)
        fit = np.floor((table.capacity[col] - table.allocated[col]) / amount + 1e-9)
        slots = np.minimum(slots, np.maximum(fit, 0).astype(np.int64))
    if request.max_per_node is not None:
        slots = np.minimum(slots, np.maximum(request.max_per_node - counts, 0))
    return np.where(filters.eligible, slots, -1).astype(np.int64)


def _spread_key(table: NodeTable, where: Index) -> Ints:
    """Least loaded (all services) first; the fill breaks ties by position."""
    return table.totals[where]


def _binpack_key(table: NodeTable, where: Index, cols: Index) -> Floats:
    """Fullest first (the dominant share of the resources the class asks for), then the
    largest, then by position."""
    share = np.zeros(len(where))
    size = np.zeros(len(where))
    for col in cols:
        cap = table.capacity[col, where]
        share = np.maximum(share, table.allocated[col, where] / np.maximum(cap, 1e-12))
        size += cap / max(float(table.capacity[col].max()), 1e-12)
    return -share - 1e-4 * size + where * 1e-12


def _fill(
    request: ClassRequest,
    table: NodeTable,
    counts: Ints,
    slots: Ints,
    where: Index,
    k: int,
    group: int = 1,
) -> Ints:
    """k replicas over the nodes at `where` (one domain, all with room): preferred tiers
    first."""
    take = np.zeros(len(where), dtype=np.int64)
    if k <= 0 or len(where) == 0:
        return take
    if request.prefer:
        score = np.zeros(len(where), dtype=np.int64)
        for p in request.prefer:
            score += p.weight * table.label(p.label, p.value)[where]
        tiers = [np.flatnonzero(score == s) for s in np.unique(score)[::-1]]
    else:
        tiers = [np.arange(len(where))]
    cols = _resource_cols(request, table)
    left = k
    for inner in tiers:
        if left <= 0:
            break
        nodes = where[inner]
        if request.strategy == "binpack":
            got = _binpack(table, slots, nodes, left, cols)
        elif group > 1:
            got = _group_spread(table, slots, nodes, left, group)
        else:
            got = water_fill(counts[nodes], slots[nodes], left, _spread_key(table, nodes))
        take[inner] = got
        left -= int(got.sum())
    return take


def _group_spread(table: NodeTable, slots: Ints, nodes: Index, k: int, group: int) -> Ints:
    """Spread for a group of `group` new services sharing k replicas: no node takes more than
    the group's share of what one service alone would put on it (its k / group replicas
    over these nodes, rounded up, for each service), and within that the least loaded nodes
    are raised first."""
    per_service = -(-k // group)
    cap = group * -(-per_service // len(nodes))
    return water_fill(table.totals[nodes], np.minimum(slots[nodes], cap), k, nodes)


def _binpack(table: NodeTable, slots: Ints, nodes: Index, k: int, cols: Index) -> Ints:
    """Binpack: in proportion over the batch's pool first, then the fullest nodes first."""
    got = np.zeros(len(nodes), dtype=np.int64)
    if table.pool is not None:
        inside = np.flatnonzero(table.pool[nodes])
        if len(inside):
            members = nodes[inside]
            # rounding leftovers go to the emptiest pool nodes: the mix stays even
            emptiest = -_binpack_key(table, members, cols)
            got[inside] = proportional_fill(slots[members], k, emptiest)
    left = k - int(got.sum())
    if left > 0:
        room = slots[nodes] - got
        got += ordered_fill(room, left, _binpack_key(table, nodes, cols))
    return got


def _resource_cols(request: ClassRequest, table: NodeTable) -> Index:
    found = [table.column(r) for r, need in request.resources.items() if need > 0]
    return np.array([c for c in found if c is not None], dtype=np.intp)


def _distribute(
    request: ClassRequest, table: NodeTable, counts: Ints, slots: Ints, group: int = 1
) -> tuple[Ints, dict[int, int]]:
    """How many go on each node, and (with spread_by) each domain's count afterwards."""
    take = np.zeros(len(table), dtype=np.int64)
    # a new service spread without preferences: one replica on each of the least loaded
    # nodes with room (what the water-fill would do), without its set-up
    plain = (
        group == 1
        and request.strategy == "spread"
        and not request.prefer
        and request.service not in table.placed
    )
    if request.spread_by is None:
        open_ = np.flatnonzero(slots > 0)
        if plain and request.count <= len(open_):
            take[open_[lowest(table.totals[open_], request.count)]] = 1
        else:
            take[open_] = _fill(request, table, counts, slots, open_, request.count, group)
        return take, {}
    key_name = request.spread_by
    size = len(table.vocab.get(key_name, {}))
    domain = table.domains(key_name)
    shifted = domain + 1  # ABSENT (-1) becomes bucket 0
    d_slots = np.bincount(shifted, weights=slots, minlength=size + 1)[1:].astype(np.int64)
    d_counts = np.zeros(size, dtype=np.int64)
    found = table.placed.get(request.service)
    if found is not None:
        d_counts = np.bincount(shifted[found[0]], weights=found[1], minlength=size + 1)[1:]
        d_counts = d_counts.astype(np.int64)
    if request.rotation is not None:
        key: npt.NDArray[np.generic] = rotation_key(size, request.rotation)
    else:
        key = table.domain_totals(key_name)
    quota = water_fill(d_counts, d_slots, request.count, key)
    members = table.members(key_name)
    for code in np.flatnonzero(quota):
        nodes = members[int(code)]
        nodes = nodes[slots[nodes] > 0]
        q = int(quota[code])
        if plain and q <= len(nodes):
            take[nodes[lowest(table.totals[nodes], q)]] = 1
        else:
            take[nodes] = _fill(request, table, counts, slots, nodes, q, group)
    left = request.count - int(quota.sum())
    if left > 0:
        # nodes without the label take what the domains could not
        nodes = members.get(ABSENT, _no_index())
        nodes = nodes[slots[nodes] > 0]
        take[nodes] = _fill(request, table, counts, slots, nodes, left, group)
    after = d_counts + quota
    return take, {int(code): int(after[code]) for code in np.flatnonzero(quota)}


def _why(
    request: ClassRequest,
    table: NodeTable,
    counts: Ints,
    slots: Ints,
    where: Index,
    taken: Ints,
    cols: Index,
    domain_after: dict[int, int],
) -> Why:
    after = counts[where] + taken
    room = slots[where]
    matched: list[list[str]] = []
    if request.prefer:
        hits = [
            (f"{p.label}={p.value}", table.label(p.label, p.value)[where]) for p in request.prefer
        ]
        matched = [[name for name, hit in hits if hit[j]] for j in range(len(where))]
    if request.strategy == "binpack":
        share = np.zeros(len(where))
        for col in cols:
            cap = np.maximum(table.capacity[col, where], 1e-12)
            share = np.maximum(share, table.allocated[col, where] / cap)  # committed already
        return Why("binpack", after, room, share=share, matched=matched)
    if request.spread_by is None:
        return Why("spread", after, room, matched=matched)
    return Why(
        "spread",
        after,
        room,
        spread_by=request.spread_by,
        codes=table.domains(request.spread_by)[where],
        values=table.vocab.get(request.spread_by, {}),
        domain_after=domain_after,
        matched=matched,
    )


def _unplaced_reason(
    request: ClassRequest,
    filters: _Filters,
    needs: list[tuple[str, float]],
    fits: list[Floats],
    per_node_room: Ints | None,
    slots: Ints,
    take: Ints,
) -> str:
    unplaced = request.count - int(take.sum())
    parts: list[str] = []
    mask = np.ones(len(slots), dtype=bool)
    for name, passes in filters.steps:
        failing = int((mask & ~passes).sum())
        if failing:
            if name == "ready":
                parts.append(f"{_plural(failing, 'node')} not ready")
            elif name == "driver":
                verb = _verb(failing, "lacks", "lack")
                parts.append(f"{_plural(failing, 'node')} {verb} the {request.driver} driver")
            elif name == "avoid":
                verb = _verb(failing, "runs", "run")
                parts.append(f"{_plural(failing, 'node')} {verb} a service it avoids")
            else:
                verb = _verb(failing, "fails", "fail")
                parts.append(f"{_plural(failing, 'node')} {verb} {name}")
        mask &= passes
    for j, (resource, _) in enumerate(needs):
        lacking = mask & (fits[j] < 1)
        failing = int(lacking.sum())
        if failing:
            parts.append(f"{_plural(failing, 'node')} {_verb(failing, 'lacks', 'lack')} {resource}")
        mask &= ~lacking
    if per_node_room is not None:
        at_max = mask & (per_node_room < 1)
        if at_max.any():
            count = int(at_max.sum())
            parts.append(
                f"{_plural(count, 'node')} already {_verb(count, 'holds', 'hold')} "
                f"max_per_node={request.max_per_node}"
            )
        mask &= ~at_max
    full = mask & (slots == take) & (take > 0)
    limits: list[tuple[str, npt.NDArray[np.generic]]] = [
        (resource, fits[j]) for j, (resource, _) in enumerate(needs)
    ]
    if per_node_room is not None:
        limits.append((f"max_per_node={request.max_per_node}", per_node_room))
    for resource, fit in limits:
        # nodes this placement filled, named by the limit that ran out
        ran_out = full & (fit == slots)
        if ran_out.any():
            if resource.startswith("max_per_node"):
                parts.append(f"{_plural(int(ran_out.sum()), 'node')} reached {resource}")
            else:
                parts.append(f"{_plural(int(ran_out.sum()), 'node')} ran out of {resource}")
            full &= ~ran_out
    return f"{unplaced} of {request.count} replicas fit no node: " + (
        ", ".join(parts) if parts else "no node is eligible"
    )
