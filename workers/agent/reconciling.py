"""One process's replica reconciles: a fixed set of worker tasks that take dirty replicas from
one queue, shared by every agent the process hosts.

100,000 replicas assigned at once used to cost a task each, all but a couple of thousand of
them parked on a semaphore: creating, parking and waking them was a tenth of the agents'
process. Here a dirty replica costs a queue entry, and a worker that finishes one takes the
next without suspending. At most `size` reconciles are under way at once in the process: more
would queue hundreds of thousands of writes on one connection, their acks would come back after
the request timeout, and the retries would make it worse.

    pool = ReconcilePool.joined(agent)   # the running loop's pool
    pool.put(agent, "web-abc")           # the agent reconciles it on one of them
    await pool.leave(agent)              # the last to leave stops the workers

A replica is queued once however often it is marked before a worker takes it (the owner keeps
that set); marked again while it is being reconciled, it is queued again, and the owner's
per-replica lock keeps the two in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Protocol

log = logging.getLogger(__name__)
RECONCILES_IN_FLIGHT = 2048
"""replica reconciles under way at once in one process (shared by the agents it hosts)"""


class Owner(Protocol):
    async def reconcile_queued(self, replica: str) -> None:
        """Reconcile one replica taken from the queue. It must not raise: a failure is the
        owner's to log and to queue again later."""


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ReconcilePool] = (
    weakref.WeakKeyDictionary()
)


class ReconcilePool:
    def __init__(self, size: int | None = None) -> None:
        size = RECONCILES_IN_FLIGHT if size is None else size
        if size < 1:
            raise ValueError(f"a reconcile pool needs at least one worker, not {size}")
        self.size = size
        self._queue: asyncio.Queue[tuple[Owner, str]] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._owners: set[Owner] = set()
        self._waiting = 0
        """workers blocked on the queue"""
        self.busy = 0
        """reconciles under way now (for tests: never above `size`)"""

    @classmethod
    def joined(cls, owner: Owner) -> ReconcilePool:
        """The running event loop's pool (made on first use), with `owner` among its users."""
        loop = asyncio.get_running_loop()
        pool = _POOLS.get(loop)
        if pool is None:
            pool = _POOLS[loop] = cls()
        pool.join(owner)
        return pool

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def workers(self) -> int:
        return len(self._workers)

    def join(self, owner: Owner) -> None:
        self._owners.add(owner)

    async def leave(self, owner: Owner) -> None:
        """`owner` queues no more (what it queued is skipped). The last owner to leave
        stops the workers, cancelling any reconcile still under way."""
        self._owners.discard(owner)
        if self._owners:
            return
        loop = asyncio.get_running_loop()
        if _POOLS.get(loop) is self:
            del _POOLS[loop]  # the next agent of this loop gets a pool of its own
        workers, self._workers = self._workers, []
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        with contextlib.suppress(asyncio.QueueEmpty):
            while True:
                self._queue.get_nowait()

    def put(self, owner: Owner, replica: str) -> None:
        self._queue.put_nowait((owner, replica))
        # workers are started as work comes, up to `size`: a node with a few replicas keeps
        # a few tasks, not thousands
        if self._queue.qsize() > self._waiting and len(self._workers) < self.size:
            name = f"reconcile-{len(self._workers)}"
            self._workers.append(asyncio.create_task(self._work(), name=name))

    async def _work(self) -> None:
        queue = self._queue
        while True:
            if queue.empty():
                self._waiting += 1
                try:
                    owner, replica = await queue.get()
                finally:
                    self._waiting -= 1
            else:
                owner, replica = queue.get_nowait()
            if owner not in self._owners:
                continue  # it left: its replicas are none of ours any more
            self.busy += 1
            try:
                await owner.reconcile_queued(replica)
            except Exception:  # the owner's bug must not cost the process a worker
                log.exception("reconcile of %s failed", replica)
            finally:
                self.busy -= 1
