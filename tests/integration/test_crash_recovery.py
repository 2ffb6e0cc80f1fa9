"""kill -9 in the middle of a deploy: after a restart the system converges, with no duplicate
replicas and none lost."""

from __future__ import annotations

import json
import signal
import uuid
from collections import Counter

import nats
import pytest
from support import eventually

from corral.bus.store import Mirror
from corral.schemas.state import Assignment, ReplicaState, ReplicaStatus

pytestmark = pytest.mark.timeout(120)
SERVICES = 20
REPLICAS = 50
NODES = 10


async def test_kill_9_mid_deploy_converges_without_duplicates(
    settings, bus, control_plane, processes
) -> None:
    api = processes.start("worker", "api", name="api")
    processes.start("worker", "scheduler", name="scheduler")
    deployer = processes.start("worker", "deployer", name="deployer")
    agents = [
        {"node_id": f"n{i}", "driver": "fake", "capacity": {"cpu": 64, "memory": "64Gi"}}
        for i in range(NODES)
    ]
    assignments: Mirror[Assignment] = Mirror(bus.buckets.assignments)
    replicas: Mirror[ReplicaStatus] = Mirror(bus.buckets.replicas)
    await assignments.start()
    await replicas.start()
    nc = await nats.connect(settings.resolved_url())
    try:
        async with control_plane(workers=(), agents=agents):
            for index in range(SERVICES):
                name = f"svc{index}"
                spec = {
                    "replicas": REPLICAS,
                    "command": ["sleep", "1000"],
                    "resources": {"cpu": 0.01},
                }
                headers = {
                    "ce-id": uuid.uuid4().hex,
                    "ce-source": "test",
                    "ce-type": "io.corral.service.deploy",
                    "ce-specversion": "1.0",
                }
                await nc.publish(
                    f"{settings.prefix}.cmd.service.{name}.deploy",
                    json.dumps(spec).encode(),
                    headers=headers,
                )
            await nc.flush()

            total = SERVICES * REPLICAS
            await eventually(
                lambda: len(assignments.items) >= 50, every=0.005, what="the deploy to be under way"
            )
            deployer.send_signal(signal.SIGKILL)
            api.send_signal(signal.SIGKILL)
            deployer.wait(5)
            at_kill = len(assignments.items)
            assert at_kill < total, "the deploy finished before the kill; the test proves nothing"
            print(f"killed with {at_kill} of {total} assignments written")

            processes.start("worker", "deployer", name="deployer-2")
            processes.start("worker", "api", name="api-2")

            def converged() -> bool:
                live = [a for a in assignments.values() if not a.draining]
                running = [r for r in replicas.values() if r.state == ReplicaState.RUNNING]
                return len(live) == total and len(running) == total

            try:
                await eventually(converged, within=45, what=f"{total} replicas running")
            except AssertionError:
                states = Counter(r.state.value for r in replicas.values())
                draining = sum(1 for a in assignments.values() if a.draining)
                services = {
                    k: (v.value.spec.replicas, v.value.generation)
                    for k, v in (await bus.buckets.services.items()).items()
                }
                status = {
                    k: v.value.model_dump(include={"assigned", "pending", "reason"})
                    for k, v in (await bus.buckets.service_status.items()).items()
                }
                raise AssertionError(
                    f"not converged: {len(assignments.items)} assignments ({draining} draining),"
                    f" replica states {states}, services {services}, status {status}"
                ) from None
            live = [a for a in assignments.values()]
            assert len(live) == total  # nothing extra, nothing draining
            assert len({a.replica for a in live}) == total
            per_service = Counter(a.service for a in live)
            assert per_service == {f"svc{i}": REPLICAS for i in range(SERVICES)}
            statuses = replicas.values()
            assert len(statuses) == total
            assert {s.replica for s in statuses} == {a.replica for a in live}
    finally:
        await nc.close()
        await replicas.stop()
        await assignments.stop()
