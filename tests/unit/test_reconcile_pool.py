"""The agents' process-wide reconcile pool: a bounded number in flight, nothing queued lost,
a failing owner never costs a worker, and an owner that leaves has its queue skipped."""

from __future__ import annotations

import asyncio

import pytest
from support import eventually

from corral.workers.agent.reconciling import ReconcilePool

pytestmark = pytest.mark.timeout(20)


class Owner:
    """Records what it was asked to reconcile; each reconcile waits for `gate`."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.done: list[str] = []
        self.started: list[str] = []
        self.running = 0
        self.most = 0
        self.fail = fail or set()

    async def reconcile_queued(self, replica: str) -> None:
        self.started.append(replica)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.gate.wait()
            if replica in self.fail:
                raise RuntimeError(f"cannot reconcile {replica}")
            self.done.append(replica)
        finally:
            self.running -= 1


async def test_at_most_size_run_at_once_and_every_queued_replica_runs() -> None:
    pool = ReconcilePool(size=3)
    owner = Owner()
    owner.gate.clear()
    pool.join(owner)
    for i in range(50):
        pool.put(owner, f"r{i}")
    await eventually(lambda: owner.running == 3, what="three reconciles under way")
    assert pool.busy == 3
    assert pool.workers == 3
    assert pool.queued == 47
    owner.gate.set()
    await eventually(lambda: len(owner.done) == 50, what="all 50 reconciled")
    assert owner.most == 3
    assert sorted(owner.done) == sorted(f"r{i}" for i in range(50))
    assert owner.started == [f"r{i}" for i in range(50)]  # first come, first served
    await pool.leave(owner)
    assert pool.workers == 0


async def test_workers_start_only_as_work_comes() -> None:
    pool = ReconcilePool(size=100)
    owner = Owner()
    pool.join(owner)
    assert pool.workers == 0
    pool.put(owner, "a")
    await eventually(lambda: owner.done == ["a"], what="a reconciled")
    pool.put(owner, "b")  # the first worker is idle again: no second one
    await eventually(lambda: owner.done == ["a", "b"], what="b reconciled")
    assert pool.workers == 1
    await pool.leave(owner)


async def test_a_failing_reconcile_does_not_cost_a_worker(caplog) -> None:
    pool = ReconcilePool(size=1)
    owner = Owner(fail={"bad"})
    pool.join(owner)
    pool.put(owner, "bad")
    pool.put(owner, "good")
    await eventually(lambda: owner.done == ["good"], what="the next one reconciled")
    assert "reconcile of bad failed" in caplog.text
    await pool.leave(owner)


async def test_an_owner_that_left_has_its_queue_skipped_and_the_last_stops_the_workers() -> None:
    pool = ReconcilePool(size=1)
    staying, leaving = Owner(), Owner()
    staying.gate.clear()
    pool.join(staying)
    pool.join(leaving)
    pool.put(staying, "s1")
    pool.put(leaving, "l1")
    pool.put(staying, "s2")
    await eventually(lambda: staying.running == 1, what="s1 under way")
    await pool.leave(leaving)
    assert pool.workers == 1  # another owner still uses them
    staying.gate.set()
    await eventually(lambda: staying.done == ["s1", "s2"], what="s1 and s2 reconciled")
    assert leaving.done == []
    staying.gate.clear()
    pool.put(staying, "s3")
    await eventually(lambda: staying.running == 1, what="s3 under way")
    await pool.leave(staying)  # cancels s3: the process is shutting its agents down
    assert pool.workers == 0
    assert staying.running == 0
    assert pool.busy == 0
    # and it can be joined again
    pool.join(staying)
    staying.gate.set()
    pool.put(staying, "s4")
    await eventually(lambda: staying.done[-1] == "s4", what="s4 reconciled")
    await pool.leave(staying)


async def test_one_pool_per_event_loop_while_it_has_owners() -> None:
    a, b = Owner(), Owner()
    first = ReconcilePool.joined(a)
    assert ReconcilePool.joined(b) is first
    await first.leave(a)
    await first.leave(b)
    # once every owner has left, the next one gets a pool of its own
    second = ReconcilePool.joined(a)
    assert second is not first
    await second.leave(a)


def test_a_pool_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        ReconcilePool(size=0)
