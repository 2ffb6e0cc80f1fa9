"""Sharding the rebalance search over services, and merging the shards' moves. Pure: no Ray,
no I/O; `searching.py` sends `search_shard` to Ray tasks, one per shard.

- **Split.** A spread service's moves depend on its own replicas and on the room the nodes
  have, so spread services are searched apart: each shard holds whole services, and sees
  every node (a spread service must see all its domains). Services that must not share a
  node (`avoid`, either way) stay in one shard. Groups go to the shard with the least work so
  far, largest first; each shard keeps the services in the caller's order, so ties break as
  in one process.
- **Search.** Each shard runs the one-process search (`plan_moves`) on its services, with the
  whole budget: any one shard may deserve every move. This is the expensive part: every
  step looks at every service's best move.
- **Merge.** The shards' moves are taken best first (the skew each lowers, then the caller's
  order of services, as the one-process search picks them) until the budget is spent. The
  shards chose which service moves next; where it moves from and to is decided again on the
  whole cluster, with the moves taken before it, since two shards may have planned the last
  room on one node (or one shard's move freed room another could use). A service whose move
  went elsewhere than planned (repaired) may now have other skews ahead than its shard saw,
  so its later moves are looked up on the merged cluster and ranked by what they lower now;
  a service with no move left is dropped. This costs one scan of the nodes per move, not one
  per service and move. When the shards' moves run out before the budget, the one-process
  search looks over the merged cluster once more (one scan per service), for a move that
  room freed by another shard's moves allows. On every generated cluster tested this gives
  exactly one process's moves.
- **Binpack** runs after the merge, on the merged cluster, with the budget left, as in one
  process: which node can be emptied depends on where every spread move landed (a node a
  spread replica moved to is in use by another service), so it is not sharded.
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from corral.workers.scheduler.placement import ClassRequest
from corral.workers.scheduler.rebalance import Move, best_move, make_move, plan_moves
from corral.workers.scheduler.table import NodeTable


@dataclass(frozen=True)
class Merged:
    moves: list[Move]
    repaired: int = 0
    """moves the merge put on other nodes than the shard had planned"""
    dropped: int = 0
    """services whose next move no longer had anywhere to go on the merged cluster"""


def groups(services: Sequence[ClassRequest], avoids: dict[str, tuple[str, ...]]) -> list[list[int]]:
    """Positions of the services that must be searched together (linked by `avoid`), each
    group in order."""
    parent = list(range(len(services)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    where = {s.service: i for i, s in enumerate(services)}
    for i, s in enumerate(services):
        for other in (*s.avoid, *avoids.get(s.service, ())):
            j = where.get(other)
            if j is not None:
                parent[root(i)] = root(j)
    found: dict[int, list[int]] = {}
    for i in range(len(services)):
        found.setdefault(root(i), []).append(i)
    return list(found.values())


def split_search(
    services: Sequence[ClassRequest], avoids: dict[str, tuple[str, ...]], shards: int
) -> list[list[ClassRequest]]:
    """The spread services of each shard (no empty shards; binpack runs after the merge)."""
    spread = [s for s in services if s.strategy != "binpack"]
    shards = max(1, shards)
    parts: list[list[int]] = [[] for _ in range(shards)]
    load = [(0, s) for s in range(shards)]
    # a group's work: one scan of the nodes per service and step
    for g in sorted(groups(spread, avoids), key=lambda g: (-len(g), g[0])):
        work, s = heapq.heappop(load)
        parts[s].extend(g)
        heapq.heappush(load, (work + len(g), s))
    return [[spread[i] for i in sorted(part)] for part in parts if part]


def search_shard(table: NodeTable, services: list[ClassRequest], budget: int) -> list[Move]:
    """What each Ray task runs: the one-process search on its services (`plan_moves` works
    on a copy, so Ray's read-only arrays are never written)."""
    return plan_moves(table, services, budget)


def merge_moves(
    table: NodeTable,
    services: Sequence[ClassRequest],
    answers: Sequence[Sequence[Move]],
    budget: int,
) -> Merged:
    """The shards' spread moves under one budget, each decided again on the whole cluster,
    then binpack's moves with the budget left."""
    by_name = {s.service: s for s in services if s.strategy != "binpack"}
    order = {s.service: i for i, s in enumerate(services)}
    work = copy.deepcopy(table)
    position = {node: i for i, node in enumerate(work.ids)}
    streams = [iter([m for m in answer if m.service in by_name]) for answer in answers]
    live = -1
    """the stream number of a move found on the merged cluster, not planned by a shard"""
    diverged: set[str] = set()
    """services whose moves went elsewhere than planned: their later planned moves (and the
    skews they were ranked by) are stale, so their next move is looked up live instead"""
    done: set[str] = set()
    heap: list[tuple[int, int, int, Move]] = []

    def advance(k: int) -> None:
        for m in streams[k]:
            if m.service not in diverged and m.service not in done:
                heapq.heappush(heap, (-m.skew, order[m.service], k, m))
                return

    def look_up(s: ClassRequest) -> None:
        found = best_move(work, s)
        if found is None:
            done.add(s.service)
        else:
            heapq.heappush(heap, (-found.skew, order[s.service], live, found))

    for k in range(len(streams)):
        advance(k)
    moves: list[Move] = []
    repaired = dropped = 0
    while heap and len(moves) < budget:
        key, _, k, planned = heapq.heappop(heap)
        if k != live:
            advance(k)
        name = planned.service
        if name in done or (k != live and name in diverged):
            continue
        s = by_name[name]
        again = best_move(work, s)
        if again is None:
            dropped += k != live
            done.add(name)
            continue
        if -again.skew > key:  # ranked too high: put it back at its place
            diverged.add(name)
            heapq.heappush(heap, (-again.skew, order[name], live, again))
            continue
        if not make_move(work, s, again, position):
            done.add(name)
            continue
        moves.append(again)
        if k == live or (again.source, again.target) != (planned.source, planned.target):
            repaired += k != live
            diverged.add(name)
            look_up(s)
    spread = list(by_name.values())
    if not heap and spread and len(moves) < budget:
        # the shards ran out of moves: room one shard's moves freed may let another's service
        # move after all, as one process would find
        moves += plan_moves(work, spread, budget - len(moves))
    packs = [s for s in services if s.strategy == "binpack"]
    if packs and len(moves) < budget:
        moves += plan_moves(work, packs, budget - len(moves))
    return Merged(moves, repaired, dropped)
