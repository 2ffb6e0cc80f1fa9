"""Where a batch is solved: in this process, or sharded over Ray above a size (the seam that
tests fake; see `sharding.py` for the pure split and merge)."""

from __future__ import annotations

import asyncio
import os
import pickle
import time
from collections.abc import Iterator
from typing import Any, Protocol

from corral.workers.scheduler.placement import (
    ClassRequest,
    NodeTable,
    Solution,
    Unit,
    solve_batch,
    solve_cut,
    units_of,
)
from corral.workers.scheduler.sharding import (
    Answer,
    merge_arriving,
    solve_shard,
    split,
)

IN_THREAD_ABOVE = 2_000
"""replicas: a batch this large is solved off the event loop, so heartbeats keep flowing"""


class Executor(Protocol):
    async def solve(self, classes: list[ClassRequest], table: NodeTable) -> list[Solution]:
        """Place every class on the table; solutions in the order of `classes`."""

    async def close(self) -> None:
        """Release what the executor started."""


def solve_pickled(shard: bytes) -> Answer:
    """`solve_shard` on a shard pickled by the caller: the standard pickler takes about half
    the time of Ray's own (cloudpickle) for a shard's thousands of small classes."""
    table, units = pickle.loads(shard)
    return solve_shard(table, units)


class InProcess:
    async def solve(self, classes: list[ClassRequest], table: NodeTable) -> list[Solution]:
        if sum(c.count for c in classes) > IN_THREAD_ABOVE:
            return await asyncio.to_thread(solve_batch, classes, table)
        return solve_batch(classes, table)

    async def close(self) -> None:
        return None


CPUS_EVERY = 30.0
"""seconds between two readings of the Ray cluster's CPU count (it sets the shard count)"""

PLACEMENTS_ABOVE = 2_000
"""a batch goes to Ray only when it also needs more separate placements than this (groups
of same-shape services count once): with fewer, what two cores save is small next to Ray's
fixed costs (about 0.03 s on 2 cores: pickling the shards, dispatch, moving the answers
back, the merge; the benchmark's 161 placements of 1,000,000 replicas save about 0.02 s of
0.15 s); the scheduler's is `CORRAL_SCHED_SHARD_PLACEMENTS_ABOVE`"""


def placements(classes: list[ClassRequest], table: NodeTable) -> int:
    """The separate placements a batch needs: each group of same-shape services once."""
    units, _ = units_of(classes, table)
    return len(units)


class Sharded:
    """Batches above `above` replicas (and `placements_above` separate placements) go to Ray,
    one task per shard of nodes; smaller ones are solved in this process. Ray is imported and
    started on the first large batch, never before: joining the cluster in `RAY_ADDRESS` when
    it is set, else a local Ray on this machine's CPUs (without the dashboard)."""

    def __init__(
        self,
        above: int,
        shards: int = 0,
        *,
        num_cpus: int | None = None,
        placements_above: int = PLACEMENTS_ABOVE,
    ) -> None:
        self.above = above
        self.placements_above = placements_above
        self.shards = shards
        self.num_cpus = num_cpus
        self.local = InProcess()
        self._task: Any = None
        self._started = False
        self.used = 0
        """batches sent to Ray so far"""
        self._cpus_seen: tuple[float, int] | None = None

    def _ensure(self) -> Any:
        import ray  # only here: `corral up` must not pay for Ray before a large batch

        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS") or None
            if address is None:
                ray.init(
                    num_cpus=self.num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            self._started = True
        if self._task is None:
            self._task = ray.remote(solve_pickled)
        return ray

    def _shard_count(self, ray: Any) -> int:
        """How many shards a batch is split into: `shards` when set, else one per CPU of the
        cluster, asked again at most every CPUS_EVERY seconds (asking takes a round trip to
        Ray's control store, about 1 ms of a 0.12 s solve; a cluster that grew or shrank is
        seen within that time)."""
        if self.shards > 0:
            return self.shards
        now = time.monotonic()
        if self._cpus_seen is None or now - self._cpus_seen[0] > CPUS_EVERY:
            self._cpus_seen = (now, max(1, int(ray.cluster_resources().get("CPU", 1))))
        return self._cpus_seen[1]

    def ray(self) -> Any:
        """The Ray module, started as for a large batch (lazily; `RAY_ADDRESS` or a local
        Ray), so that other searches (rebalance) send their tasks through the same handle."""
        return self._ensure()

    async def solve(self, classes: list[ClassRequest], table: NodeTable) -> list[Solution]:
        if sum(c.count for c in classes) <= self.above:
            return await self.local.solve(classes, table)
        return await asyncio.to_thread(self._solve_large, classes, table)

    def _solve_large(self, classes: list[ClassRequest], table: NodeTable) -> list[Solution]:
        """A batch above `above` replicas, cut into units once: in this process when it
        needs few separate placements, else on Ray."""
        units, owners = units_of(classes, table)
        if len(units) <= self.placements_above:
            return solve_cut(units, owners, table)
        return self._on_ray(classes, table, (units, owners))

    def solve_now(self, classes: list[ClassRequest], table: NodeTable) -> list[Solution]:
        """Solve on Ray, blocking (for benchmarks and threads)."""
        return self._on_ray(classes, table, units_of(classes, table))

    def _on_ray(
        self,
        classes: list[ClassRequest],
        table: NodeTable,
        cut: tuple[list[Unit], list[list[int]]],
    ) -> list[Solution]:
        ray = self._ensure()
        shards = split(table, classes, self._shard_count(ray), cut)
        refs = [
            self._task.remote(pickle.dumps((table.shard(s.rows), s.units), protocol=5))
            for s in shards
        ]
        self.used += 1

        def arrivals() -> Iterator[tuple[int, Answer]]:
            # each shard's answer as it comes: the merge reads one while the others run
            shard_of = {ref: s for s, ref in enumerate(refs)}
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield shard_of[ref], ray.get(ref)

        return merge_arriving(table, classes, shards, arrivals())

    async def close(self) -> None:
        if self._started:
            import ray

            await asyncio.to_thread(ray.shutdown)
            self._started = False
