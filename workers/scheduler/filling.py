"""Pure fill primitives: hand out k identical replicas over candidate nodes by counts.

Every function here works on whole arrays: the cost grows with the number of candidate nodes,
never with the number of replicas. `key` arrays rank candidates, lowest first; equal keys go
by position, so the result never depends on how NumPy breaks ties.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]


def lowest(load: npt.NDArray[np.generic], k: int) -> npt.NDArray[np.intp]:
    """Positions of the k lowest loads, ties by position, in that order. Loads are mostly
    equal (a balanced cluster): then the first k at the minimum answer without a sort."""
    if k <= 0:
        return np.zeros(0, dtype=np.intp)
    low = load.min()
    first = np.flatnonzero(load == low)
    if len(first) >= k:
        return first[:k]
    key = np.argsort(load, kind="stable")
    return key[:k]


def water_fill(counts: Ints, slots: Ints, k: int, key: npt.NDArray[np.generic]) -> Ints:
    """Add up to k replicas, raising the lowest counts first (spread), within `slots`.

    Finds the highest level L such that lifting every node to L needs at most k replicas,
    then gives the rest one each to nodes at level L that still have room, lowest key first.
    """
    take = np.zeros(len(counts), dtype=np.int64)
    if k <= 0 or len(counts) == 0:
        return take
    if not counts.any():
        # the common case, a new service: one each on the k lowest keys with room
        where = np.flatnonzero(slots > 0)
        if k <= len(where):
            take[where[lowest(key[where], k)]] = 1
            return take
    k = min(k, int(slots.sum()))
    if k <= 0:
        return take
    if len(counts) <= SMALL:
        return _water_fill_small(counts, slots, k, key)
    open_ = slots > 0
    low = int(counts[open_].min())
    at_low = open_ & (counts == low)
    if k <= int(at_low.sum()):
        # fewer replicas than nodes at the lowest level: one each
        where = np.flatnonzero(at_low)
        take[where[lowest(key[where], k)]] = 1
        return take
    c, s = counts[open_], slots[open_]
    lo, hi = low, int(min(int((c + s).max()), int(c.max()) + k))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(np.maximum(mid - c, 0), s).sum()) <= k:
            lo = mid
        else:
            hi = mid - 1
    take = np.minimum(np.maximum(lo - counts, 0), slots).astype(np.int64)
    rest = k - int(take.sum())
    if rest > 0:
        where = np.flatnonzero((counts + take == lo) & (take < slots))
        take[where[lowest(key[where], rest)]] += 1
    return take


SMALL = 32
"""arrays this short (domains: zones, racks) are water-filled with plain integers"""


def _water_fill_small(counts: Ints, slots: Ints, k: int, key: npt.NDArray[np.generic]) -> Ints:
    """The same water-fill for a few entries, on Python integers (NumPy's per-call cost
    dominates at this size)."""
    c = [int(x) for x in counts]
    s = [int(x) for x in slots]
    open_ = [i for i in range(len(c)) if s[i] > 0]

    def needed(level: int) -> int:
        return sum(min(max(level - c[i], 0), s[i]) for i in open_)

    lo = min(c[i] for i in open_)
    hi = min(max(c[i] + s[i] for i in open_), max(c[i] for i in open_) + k)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if needed(mid) <= k:
            lo = mid
        else:
            hi = mid - 1
    take = [min(max(lo - c[i], 0), s[i]) if s[i] > 0 else 0 for i in range(len(c))]
    rest = k - sum(take)
    if rest > 0:
        room = [i for i in open_ if c[i] + take[i] == lo and take[i] < s[i]]
        keys = [key[i] for i in room]
        for i in [room[j] for j in sorted(range(len(room)), key=lambda j: (keys[j], j))][:rest]:
            take[i] += 1
    return np.array(take, dtype=np.int64)


def ordered_fill(slots: Ints, k: int, key: npt.NDArray[np.generic]) -> Ints:
    """Fill nodes to the brim in key order (binpack): the first node takes all it can, then
    the next. At most k nodes are ever looked at, since each candidate has room for one."""
    take = np.zeros(len(slots), dtype=np.int64)
    k = min(k, int(slots.sum()))
    if k <= 0:
        return take
    where = np.flatnonzero(slots > 0)
    first = where[lowest(key[where], min(k, len(where)))]
    room = slots[first]
    before = np.cumsum(room) - room
    take[first] = np.clip(k - before, 0, room)
    return take


def rotation_key(size: int, offset: int) -> Ints:
    """A key that ranks positions 0..size-1 starting at `offset` and wrapping around."""
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    return (np.arange(size, dtype=np.int64) - offset) % size


def proportional_fill(slots: Ints, k: int, key: npt.NDArray[np.generic]) -> Ints:
    """Give each node a share of k in proportion to its room, so that every node ends up
    filled to the same fraction (binpack inside a chosen pool: the mix on each node follows
    the mix of the whole batch). Rounding leftovers go to the largest fractions, then by key."""
    take = np.zeros(len(slots), dtype=np.int64)
    room = np.minimum(slots, 1 << 40).astype(np.float64)
    total = float(room.sum())
    k = min(k, int(total))
    if k <= 0:
        return take
    share = room * (k / total)
    take = np.minimum(np.floor(share + 1e-9).astype(np.int64), slots)
    rest = k - int(take.sum())
    if rest > 0:
        where = np.flatnonzero(take < slots)
        frac = share[where] - take[where]
        # largest fraction first; the key breaks ties (it is unique and small next to 1)
        order = np.lexsort((key[where], -frac))
        take[where[order[:rest]]] += 1
    return take
