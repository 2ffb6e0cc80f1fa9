"""The cluster as the solver sees it: one row per node, one column per resource, labels coded
as integers, and which services already hold replicas where. Pure: no I/O.

A table is built once per batch; placing a class commits its replicas into the table, so the
next class sees the capacity that is left. `shard` slices a table into node shards for Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from corral.schemas.spec import Affinity

Bools = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Index = npt.NDArray[np.intp]
ABSENT = -1
"""the label code of a node that does not carry the label"""


@dataclass(frozen=True)
class NodeView:
    """One node, as a worker reads it from KV; `NodeTable.build` turns a list into a table."""

    id: str
    labels: dict[str, str]
    capacity: dict[str, float]
    allocated: dict[str, float]
    drivers: tuple[str, ...] = ("process",)
    ready: bool = True
    count: int = 0
    """replicas of the service being placed that already run here (for `solve`)"""
    total: int = 0
    """replicas of every service on this node: spreads ties across services"""
    services: dict[str, int] = field(default_factory=dict)
    """replicas of each service on this node (for avoid, max_per_node and spread)"""


@dataclass
class NodeTable:
    ids: list[str]
    resources: list[str]
    capacity: Floats
    """(resources, nodes): one contiguous row per resource"""
    allocated: Floats
    """(resources, nodes)"""
    ready: Bools
    drivers: dict[str, Bools]
    codes: dict[str, npt.NDArray[np.int32]]
    """label key -> the code of each node's value (ABSENT when unlabelled)"""
    vocab: dict[str, dict[str, int]]
    """label key -> value -> code; shared by every shard of a table"""
    totals: Ints
    placed: dict[str, tuple[Index, Ints]] = field(default_factory=dict)
    """service -> (node positions, replica counts), sparse"""
    avoids: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """service -> the services it avoids, for the services the caller knows of"""
    pool: Bools | None = None
    """while a batch is placed: the nodes its binpack classes fill first"""
    _masks: dict[tuple[str, ...], Bools] = field(default_factory=dict, repr=False)
    _members: dict[str, dict[int, Index]] = field(default_factory=dict, repr=False)
    _domain_totals: dict[str, Ints] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(
        cls,
        nodes: Sequence[NodeView],
        *,
        service: str = "",
        avoids: Mapping[str, Iterable[str]] | None = None,
    ) -> NodeTable:
        """A table from node views; `service` names the class whose `count` the views carry."""
        n = len(nodes)
        resources = sorted({r for node in nodes for r in (*node.capacity, *node.allocated)})
        column = {r: i for i, r in enumerate(resources)}
        capacity = np.zeros((len(resources), n))
        allocated = np.zeros((len(resources), n))
        drivers: dict[str, Bools] = {}
        codes: dict[str, npt.NDArray[np.int32]] = {}
        vocab: dict[str, dict[str, int]] = {}
        per_service: dict[str, tuple[list[int], list[int]]] = {}
        for i, node in enumerate(nodes):
            for r, amount in node.capacity.items():
                capacity[column[r], i] = amount
            for r, amount in node.allocated.items():
                allocated[column[r], i] = amount
            for d in node.drivers:
                if d not in drivers:
                    drivers[d] = np.zeros(n, dtype=bool)
                drivers[d][i] = True
            for key, value in node.labels.items():
                values = vocab.setdefault(key, {})
                code = values.setdefault(value, len(values))
                if key not in codes:
                    codes[key] = np.full(n, ABSENT, dtype=np.int32)
                codes[key][i] = code
            counts = dict(node.services)
            if node.count:
                counts[service] = node.count
            for name, count in counts.items():
                if count > 0:
                    where, how_many = per_service.setdefault(name, ([], []))
                    where.append(i)
                    how_many.append(count)
        return cls(
            ids=[node.id for node in nodes],
            resources=resources,
            capacity=capacity,
            allocated=allocated,
            ready=np.fromiter((node.ready for node in nodes), bool, n),
            drivers=drivers,
            codes=codes,
            vocab=vocab,
            totals=np.fromiter((node.total for node in nodes), np.int64, n),
            placed={
                name: (np.array(w, dtype=np.intp), np.array(c, dtype=np.int64))
                for name, (w, c) in per_service.items()
            },
            avoids={k: tuple(v) for k, v in (avoids or {}).items()},
        )

    # --- masks -------------------------------------------------------------------------
    def driver(self, name: str) -> Bools:
        found = self.drivers.get(name)
        return found if found is not None else np.zeros(len(self), dtype=bool)

    def label(self, key: str, value: str) -> Bools:
        cache_key = ("=", key, value)
        mask = self._masks.get(cache_key)
        if mask is None:
            codes = self.codes.get(key)
            code = self.vocab.get(key, {}).get(value)
            if codes is None or code is None:
                mask = np.zeros(len(self), dtype=bool)
            else:
                mask = codes == code
            self._masks[cache_key] = mask
        return mask

    def has_label(self, key: str) -> Bools:
        codes = self.codes.get(key)
        if codes is None:
            return np.zeros(len(self), dtype=bool)
        present: Bools = codes != ABSENT
        return present

    def affinity(self, expr: Affinity) -> Bools:
        if expr.operator == "Exists":
            return self.has_label(expr.key)
        if expr.operator == "DoesNotExist":
            return ~self.has_label(expr.key)
        inside = np.zeros(len(self), dtype=bool)
        for value in expr.values:
            inside |= self.label(expr.key, value)
        return inside if expr.operator == "In" else ~inside

    def domains(self, key: str) -> npt.NDArray[np.int32]:
        codes = self.codes.get(key)
        return codes if codes is not None else np.full(len(self), ABSENT, dtype=np.int32)

    def domain_totals(self, key: str) -> Ints:
        """Replicas of every service in each value of label `key` (kept up to date by
        `commit`)."""
        found = self._domain_totals.get(key)
        if found is None:
            codes = self.domains(key)
            size = len(self.vocab.get(key, {}))
            found = np.bincount(codes + 1, weights=self.totals, minlength=size + 1)[1:]
            found = found.astype(np.int64)
            self._domain_totals[key] = found
        return found

    def forget_sums(self) -> None:
        """Drop cached sums after `totals` changed behind `commit`'s back."""
        self._domain_totals.clear()

    def members(self, key: str) -> dict[int, Index]:
        """label code -> the positions of the nodes carrying it (ABSENT: the unlabelled)."""
        found = self._members.get(key)
        if found is None:
            codes = self.domains(key)
            order = np.argsort(codes, kind="stable")
            bounds = np.searchsorted(codes[order], np.arange(-1, len(self.vocab.get(key, {})) + 1))
            found = {
                code: order[bounds[code + 1] : bounds[code + 2]]
                for code in range(-1, len(self.vocab.get(key, {})))
            }
            self._members[key] = found
        return found

    # --- what is placed ----------------------------------------------------------------
    def counts(self, service: str) -> Ints:
        dense = np.zeros(len(self), dtype=np.int64)
        found = self.placed.get(service)
        if found is not None:
            np.add.at(dense, found[0], found[1])
        return dense

    def presence(self, service: str) -> Bools:
        mask = np.zeros(len(self), dtype=bool)
        found = self.placed.get(service)
        if found is not None:
            mask[found[0][found[1] > 0]] = True
        return mask

    def avoided_by(self, service: str) -> list[str]:
        """Services that must not share a node with `service`: its own list and, since the
        rule is mutual, every known service that lists it."""
        mine = list(self.avoids.get(service, ()))
        return mine + [other for other, theirs in self.avoids.items() if service in theirs]

    def used(self, resource: str) -> Floats:
        col = self.column(resource)
        return self.allocated[col] if col is not None else np.zeros(len(self))

    def column(self, resource: str) -> int | None:
        try:
            return self.resources.index(resource)
        except ValueError:
            return None

    def commit(self, service: str, where: Index, take: Ints, need: Floats, cols: Index) -> None:
        """Book `take[i]` replicas of `service` on node `where[i]`, each needing `need`."""
        if len(where) == 0:
            return
        self.book(where, take, need, cols)
        found = self.placed.get(service)
        if found is None:
            self.placed[service] = (where.copy(), take.copy())
        else:
            self.placed[service] = (
                np.concatenate([found[0], where]),
                np.concatenate([found[1], take]),
            )

    def book(self, where: Index, take: Ints, need: Floats, cols: Index) -> None:
        """Book the resources and totals of `take[i]` replicas on node `where[i]` (`commit`
        without saying whose they are: the caller records that in `placed`)."""
        for col, amount in zip(cols, need, strict=True):
            self.allocated[col, where] += take * amount
        self.totals[where] += take
        for key, totals in self._domain_totals.items():
            codes = self.codes[key][where]
            labelled = codes != ABSENT
            np.add.at(totals, codes[labelled], take[labelled])

    def fresh(
        self,
        *,
        allocated: Floats,
        totals: Ints,
        ready: Bools,
        placed: dict[str, tuple[Index, Ints]],
        avoids: dict[str, tuple[str, ...]],
    ) -> NodeTable:
        """This table's nodes (ids, capacity, labels, drivers, and their caches) with new
        allocations: a scheduler keeps one template while its nodes stay the same."""
        return NodeTable(
            ids=self.ids,
            resources=self.resources,
            capacity=self.capacity,
            allocated=allocated,
            ready=ready,
            drivers=self.drivers,
            codes=self.codes,
            vocab=self.vocab,
            totals=totals,
            placed=placed,
            avoids=avoids,
            _masks=self._masks,
            _members=self._members,
        )

    # --- shards ------------------------------------------------------------------------
    def shard(self, rows: Index) -> NodeTable:
        """The nodes at `rows` as a table of their own (labels keep their global codes)."""
        position = np.full(len(self), -1, dtype=np.intp)
        position[rows] = np.arange(len(rows))
        placed: dict[str, tuple[Index, Ints]] = {}
        for name, (where, count) in self.placed.items():
            local = position[where]
            keep = local >= 0
            if keep.any():
                placed[name] = (local[keep], count[keep])
        return NodeTable(
            ids=[self.ids[i] for i in rows],
            resources=list(self.resources),
            capacity=self.capacity[:, rows],
            allocated=self.allocated[:, rows],
            ready=self.ready[rows],
            drivers={d: mask[rows] for d, mask in self.drivers.items()},
            codes={k: codes[rows] for k, codes in self.codes.items()},
            vocab=self.vocab,
            totals=self.totals[rows],
            placed=placed,
            avoids=dict(self.avoids),
        )
