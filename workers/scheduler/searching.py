"""Where the rebalance search runs: in this process, or sharded over Ray above a size (the
seam that tests fake with `InProcessShards`; see `rebalance_shards.py` for the pure split and
merge). Ray goes through the placement path's `Sharded` executor, so it starts the same way:
lazily, on the first search that needs it, joining `RAY_ADDRESS` when that is set."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from corral.workers.scheduler.executors import Sharded
from corral.workers.scheduler.placement import ClassRequest
from corral.workers.scheduler.rebalance import Move, plan_moves
from corral.workers.scheduler.rebalance_shards import merge_moves, search_shard, split_search
from corral.workers.scheduler.table import NodeTable


class ShardRunner(Protocol):
    def width(self) -> int:
        """How many shards to cut when the caller asked for 0 (one per CPU)."""

    def run(
        self, table: NodeTable, parts: list[list[ClassRequest]], budget: int
    ) -> list[list[Move]]:
        """Each part's moves (blocking: called in a thread)."""

    async def close(self) -> None:
        """Release what the runner started."""


class InProcessShards:
    """Each shard searched here, one after another, as a Ray task would search it."""

    def width(self) -> int:
        return 1

    def run(
        self, table: NodeTable, parts: list[list[ClassRequest]], budget: int
    ) -> list[list[Move]]:
        return [search_shard(table, part, budget) for part in parts]

    async def close(self) -> None:
        return None


class RayShards:
    """One Ray task per shard; the table goes into Ray's object store once, for all of them."""

    def __init__(self, executor: Sharded) -> None:
        self.executor = executor
        self._task: Any = None

    def width(self) -> int:
        ray = self.executor.ray()
        return int(ray.cluster_resources().get("CPU", 1))

    def run(
        self, table: NodeTable, parts: list[list[ClassRequest]], budget: int
    ) -> list[list[Move]]:
        ray = self.executor.ray()
        if self._task is None:
            self._task = ray.remote(search_shard)
        shared = ray.put(table)
        answers: list[list[Move]] = ray.get(
            [self._task.remote(shared, part, budget) for part in parts]
        )
        return answers

    async def close(self) -> None:
        await self.executor.close()


@dataclass(frozen=True)
class Searched:
    moves: list[Move]
    shards: int = 0
    """0: searched in one process"""
    repaired: int = 0
    dropped: int = 0
    fallback: str = ""
    """why a search that should have been sharded ran in one process (Ray failed to start)"""


class MoveSearch:
    """`plan_moves` for the services given, sharded by service when they hold more than
    `above` replicas (and there are at least two groups to share out)."""

    def __init__(self, above: int, shards: int = 0, runner: ShardRunner | None = None) -> None:
        self.above = above
        self.shards = shards
        self.runner = runner
        self.used = 0
        """searches sharded so far"""

    @staticmethod
    def size(table: NodeTable, services: Sequence[ClassRequest]) -> int:
        """Replicas of these services on the table: what the threshold counts."""
        total = 0
        for s in services:
            found = table.placed.get(s.service)
            if found is not None:
                total += int(found[1].sum())
        return total

    async def plan(
        self, table: NodeTable, services: Sequence[ClassRequest], budget: int
    ) -> Searched:
        return await asyncio.to_thread(self.plan_now, table, list(services), budget)

    def plan_now(self, table: NodeTable, services: list[ClassRequest], budget: int) -> Searched:
        """The search, blocking (for benchmarks and threads)."""
        if self.runner is None or self.size(table, services) <= self.above:
            return Searched(plan_moves(table, services, budget))
        try:
            wanted = self.shards if self.shards > 0 else self.runner.width()
            parts = split_search(services, table.avoids, wanted)
            if len(parts) < 2:
                return Searched(plan_moves(table, services, budget))
            answers = self.runner.run(table, parts, budget)
        except Exception as exc:  # Ray could not start or lost its workers: search here
            why = f"{exc.__class__.__name__}: {exc}".splitlines()[0][:200]
            return Searched(plan_moves(table, services, budget), fallback=why)
        self.used += 1
        merged = merge_moves(table, services, answers, budget)
        return Searched(merged.moves, len(parts), merged.repaired, merged.dropped)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.close()
