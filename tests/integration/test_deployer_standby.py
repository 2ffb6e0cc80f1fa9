"""Two deployers at once: one holds the lease and acts, the other stands by; when the leader
stops, the standby takes over. No replica is ever placed twice."""

from __future__ import annotations

import json
import uuid

import pytest
from support import eventually

from corral.bus.connection import Bus
from corral.bus.settings import Settings
from corral.services.runner import Host, make_agent, make_worker
from corral.workers.deployer.worker import DeployerWorker
from corral.workers.runtime import Context, Worker

pytestmark = pytest.mark.timeout(60)


async def command(bus: Bus, settings: Settings, verb: str, data: dict) -> None:
    headers = {
        "ce-id": uuid.uuid4().hex,
        "ce-source": "test",
        "ce-type": f"io.corral.service.{verb}",
        "ce-specversion": "1.0",
    }
    await bus.js.publish(
        f"{settings.prefix}.cmd.service.web.{verb}", json.dumps(data).encode(), headers=headers
    )


async def live_assignments(bus: Bus) -> int:
    return sum(1 for a in (await bus.buckets.assignments.items()).values() if not a.value.draining)


async def test_standby_deployer_takes_over(settings, bus) -> None:
    deployers: list[DeployerWorker] = []

    def build(ctx: Context) -> list[Worker]:
        for _ in range(2):
            deployer = make_worker("deployer", ctx)
            assert isinstance(deployer, DeployerWorker)
            deployers.append(deployer)
        return [
            make_worker("api", ctx),
            make_worker("scheduler", ctx),
            *deployers,
            make_agent(ctx, node_id="n1", driver="fake"),
        ]

    async with Host(settings, build):
        await eventually(
            lambda: sum(d.lease.held.is_set() for d in deployers) == 1, what="exactly one leader"
        )
        await command(bus, settings, "deploy", {"replicas": 20, "command": ["sleep", "1"]})
        await eventually(lambda: _count(bus, 20), what="20 replicas assigned")
        leader = next(d for d in deployers if d.lease.held.is_set())
        standby = next(d for d in deployers if d is not leader)
        assert not standby.lease.held.is_set()

        await leader.stop()  # hands the lease over
        await eventually(lambda: standby.lease.held.is_set(), within=10, what="a new leader")
        await command(bus, settings, "scale", {"replicas": 30})
        await eventually(lambda: _count(bus, 30), what="30 replicas assigned by the standby")
        replicas = await bus.buckets.replicas.items("web.>")
        await eventually(lambda: _running(bus, 30), what="30 running")
        assert len(replicas) <= 30


async def _count(bus: Bus, expected: int) -> bool:
    return await live_assignments(bus) == expected


async def _running(bus: Bus, expected: int) -> bool:
    found = await bus.buckets.replicas.items("web.>")
    return len(found) == expected and all(r.value.state == "running" for r in found.values())
