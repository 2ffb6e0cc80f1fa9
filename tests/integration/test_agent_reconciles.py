"""The agents' reconciles on a real bus: at most RECONCILES_IN_FLIGHT under way in a process
(shared by its agents), a reconcile that fails is tried again, and nothing assigned is lost
when an agent stops in the middle of its work and a new one takes the node."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from support import command, eventually

from corral.schemas.spec import Resources
from corral.schemas.state import ReplicaState
from corral.services.runner import Host, make_worker
from corral.workers.agent import reconciling
from corral.workers.agent.drivers.base import Launch, Recovered, Started
from corral.workers.agent.drivers.fake import FakeDriver
from corral.workers.agent.worker import AgentWorker
from corral.workers.runtime import Context, Worker

pytestmark = pytest.mark.timeout(60)
SPEC = {"command": ["sleep", "1"], "resources": {"cpu": 0.1, "memory": "16Mi"}}


class GatedDriver(FakeDriver):
    """A fake node whose starts wait for `gate`, and whose first start of each replica in
    `flaky` raises an error no driver should (a bug, not a DriverError)."""

    def __init__(self, gate: asyncio.Event, flaky: bool = False) -> None:
        super().__init__()
        self.gate = gate
        self.flaky = flaky
        self.attempts: Counter[str] = Counter()
        self.starting = 0
        self.most = 0

    async def start(self, launch: Launch) -> Started:
        self.attempts[launch.replica] += 1
        self.starting += 1
        self.most = max(self.most, self.starting)
        try:
            await self.gate.wait()
        finally:
            self.starting -= 1
        if self.flaky and self.attempts[launch.replica] == 1:
            raise RuntimeError("the runtime hiccuped")
        return await super().start(launch)


def agent(ctx: Context, node: str, driver: GatedDriver) -> AgentWorker:
    return AgentWorker(ctx, driver, node_id=node, capacity=Resources(cpu=16, memory=64 << 30))


async def running(bus, service: str, count: int) -> bool:
    items = await bus.buckets.replicas.items(f"{service}.>")
    return sum(1 for v in items.values() if v.value.state == ReplicaState.RUNNING) == count


async def test_at_most_the_limit_runs_at_once_across_the_agents_of_a_process(
    settings, bus, monkeypatch
) -> None:
    monkeypatch.setattr(reconciling, "RECONCILES_IN_FLIGHT", 3)
    gate = asyncio.Event()
    drivers = [GatedDriver(gate), GatedDriver(gate)]

    def build(ctx: Context) -> list[Worker]:
        control: list[Worker] = [make_worker(n, ctx) for n in ("api", "deployer", "scheduler")]
        return [*control, *(agent(ctx, f"n{i}", d) for i, d in enumerate(drivers))]

    async with Host(settings, build):
        await command(bus, "deploy", "web", {**SPEC, "replicas": 20})
        await eventually(
            lambda: sum(d.starting for d in drivers) == 3, what="three starts under way"
        )
        await asyncio.sleep(0)  # let anything that would exceed the limit show itself
        assert sum(d.starting for d in drivers) == 3
        gate.set()
        await eventually(lambda: running(bus, "web", 20), what="20 replicas running")
        assert all(d.most <= 3 for d in drivers)
        assert sum(sum(d.attempts.values()) for d in drivers) == 20


async def test_a_reconcile_that_fails_is_tried_again(settings, bus) -> None:
    gate = asyncio.Event()
    gate.set()
    driver = GatedDriver(gate, flaky=True)

    def build(ctx: Context) -> list[Worker]:
        control: list[Worker] = [make_worker(n, ctx) for n in ("api", "deployer", "scheduler")]
        return [*control, agent(ctx, "n0", driver)]

    async with Host(settings, build):
        await command(bus, "deploy", "web", {**SPEC, "replicas": 4})
        await eventually(lambda: running(bus, "web", 4), what="4 replicas running")
        assert sorted(driver.attempts.values()) == [2, 2, 2, 2]


async def test_nothing_assigned_is_lost_when_an_agent_stops_mid_work(settings, bus) -> None:
    gate = asyncio.Event()
    first = GatedDriver(gate)

    def build(ctx: Context) -> list[Worker]:
        return [make_worker(n, ctx) for n in ("api", "deployer", "scheduler")]

    async with Host(settings, build) as host:
        old = agent(host.ctx, "n0", first)
        await old.start()
        await command(bus, "deploy", "web", {**SPEC, "replicas": 30})
        await eventually(lambda: first.starting == 30, what="30 starts under way")
        stopping = asyncio.create_task(old.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()  # it lets the starts under way finish first
        gate.set()
        await asyncio.wait_for(stopping, 15)
        assert not first.running(), (first.running(), first.attempts, first.starting)
        fresh = GatedDriver(gate)
        new = agent(host.ctx, "n0", fresh)
        await new.start()
        try:
            await eventually(lambda: running(bus, "web", 30), what="30 replicas running again")
            assert len(fresh.running()) == 30
        finally:
            await new.stop()


class RecoveringDriver(FakeDriver):
    """A node whose recovery of a predecessor's replicas waits for `proceed`, and which counts
    the starts asked of it before that recovery was done."""

    def __init__(self) -> None:
        super().__init__()
        self.recovering = asyncio.Event()
        self.proceed = asyncio.Event()
        self.recovered = False
        self.early = 0

    async def recover(self, claimed: dict[str, int | None]) -> Recovered:
        self.recovering.set()
        await self.proceed.wait()
        self.recovered = True
        return await super().recover(claimed)

    async def start(self, launch: Launch) -> Started:
        if not self.recovered:
            self.early += 1
        return await super().start(launch)


async def test_no_replica_starts_before_the_driver_recovered_the_predecessors(
    settings, bus
) -> None:
    """A container the previous agent left is adopted by recovery; a reconcile that ran
    first would start a second one beside it."""

    def build(ctx: Context) -> list[Worker]:
        return [make_worker(n, ctx) for n in ("api", "deployer", "scheduler")]

    async with Host(settings, build) as host:
        gate = asyncio.Event()
        gate.set()
        old = agent(host.ctx, "n0", GatedDriver(gate))
        await old.start()
        await command(bus, "deploy", "web", {**SPEC, "replicas": 5})
        await eventually(lambda: running(bus, "web", 5), what="5 replicas running")
        await old.stop()
        driver = RecoveringDriver()
        new = AgentWorker(
            host.ctx, driver, node_id="n0", capacity=Resources(cpu=16, memory=64 << 30)
        )
        starting = asyncio.create_task(new.start())
        try:
            await asyncio.wait_for(driver.recovering.wait(), 10)
            for _ in range(50):  # give anything queued every chance to run
                await asyncio.sleep(0)
            assert driver.early == 0
            driver.proceed.set()
            await asyncio.wait_for(starting, 10)
            await eventually(lambda: len(driver.running()) == 5, what="5 replicas started")
            assert driver.early == 0
        finally:
            driver.proceed.set()
            await asyncio.gather(starting, return_exceptions=True)
            await new.stop()
