"""Self-healing with real processes: kill -9 and liveness restarts, restart policies, crash
loops marked degraded, and a lost node's replicas placed elsewhere with no duplicates when it
comes back."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from support import collect, command, eventually, process_gone, replica_states

from corral.bus.store import Mirror
from corral.schemas.state import LIVE_STATES, ReplicaState

pytestmark = pytest.mark.timeout(90)
LOCAL = {"node_id": "local", "driver": "process"}
HEALER = ("api", "deployer", "scheduler", "healer")
HTTP = [sys.executable, "-m", "http.server", "${PORT}", "--bind", "127.0.0.1"]


async def one_replica(bus, service: str, predicate) -> Any:
    async def probe():
        states = await replica_states(bus, service)
        return next((s for s in states if predicate(s)), None)

    return await eventually(probe, what=f"a replica of {service}")


async def test_kill_9_of_a_process_replica_restarts_it_at_once(
    settings, bus, control_plane, kill_on_exit
) -> None:
    spec = {
        "replicas": 1,
        "ports": ["http"],
        "command": HTTP,
        "health": {"http": {"path": "/", "port": "http"}, "period": "200ms"},
    }
    async with control_plane(agents=[LOCAL]):
        await command(bus, "deploy", "web", spec)
        first = await one_replica(bus, "web", lambda s: s.state == ReplicaState.HEALTHY)
        kill_on_exit.append(first.pid)
        assert first.ready
        assert first.ready_at is not None
        os.kill(first.pid, signal.SIGKILL)
        second = await one_replica(
            bus, "web", lambda s: s.state == ReplicaState.HEALTHY and s.pid != first.pid
        )
        kill_on_exit.append(second.pid)
        assert second.restarts == 1
        assert second.replica == first.replica  # restarted in place, not rescheduled


async def test_an_unhealthy_replica_is_restarted_then_heals(
    settings, bus, control_plane, kill_on_exit, tmp_path: Path
) -> None:
    flag = tmp_path / "broken"
    spec = {
        "replicas": 1,
        "command": ["sleep", "600"],
        "health": {
            "exec": ["sh", "-c", f"test ! -e {flag}"],
            "period": "100ms",
            "failure_threshold": 2,
        },
        "restart": {"backoff": {"initial": "100ms", "max": "200ms"}},
    }
    seen = await collect(bus, bus.names.evt("replica", "sick", "*"))
    async with control_plane(agents=[LOCAL]):
        await command(bus, "deploy", "sick", spec)
        healthy = await one_replica(bus, "sick", lambda s: s.state == ReplicaState.HEALTHY)
        kill_on_exit.append(healthy.pid)
        flag.touch()
        restarted = await one_replica(bus, "sick", lambda s: s.restarts >= 1)
        assert restarted.pid != healthy.pid or restarted.pid is None
        await eventually(lambda: process_gone(healthy.pid), what="the unhealthy process gone")
        await eventually(
            lambda: any("health probe failed 2 times in a row" in text for _, text in seen),
            what="an event naming the failed probe as the cause",
        )
        flag.unlink()
        healed = await one_replica(
            bus, "sick", lambda s: s.state == ReplicaState.HEALTHY and s.restarts >= 1
        )
        kill_on_exit.append(healed.pid)
    await seen.close()


@pytest.mark.parametrize(
    ("policy", "code", "restarted"),
    [("never", 3, False), ("on-failure", 0, False), ("on-failure", 3, True), ("always", 0, True)],
)
async def test_restart_policy_decides(
    settings, bus, control_plane, policy: str, code: int, restarted: bool
) -> None:
    spec = {
        "replicas": 1,
        "command": ["sh", "-c", f"exit {code}"],
        "restart": {"policy": policy, "backoff": {"initial": "50ms", "max": "100ms"}},
    }
    async with control_plane(agents=[LOCAL]):
        await command(bus, "deploy", "once", spec)
        if restarted:
            status = await one_replica(bus, "once", lambda s: s.restarts >= 2)
            assert "restart" in status.message
        else:
            final = ReplicaState.EXITED if code == 0 else ReplicaState.FAILED
            status = await one_replica(
                bus, "once", lambda s: s.state == final and "not restarted" in s.message
            )
            assert status.restarts == 0
            assert status.exit_code == code


async def test_a_crash_loop_marks_the_service_degraded(settings, bus, control_plane) -> None:
    spec = {
        "replicas": 1,
        "command": ["sh", "-c", "exit 1"],
        "restart": {
            "backoff": {"initial": "50ms", "factor": 1, "max": "50ms"},
            "crash_loop": {"restarts": 3, "window": "30s"},
        },
    }
    degraded = await collect(bus, bus.names.evt("service", "loopy", "degraded"))
    async with control_plane(workers=HEALER, agents=[LOCAL]):
        await command(bus, "deploy", "loopy", spec)
        await eventually(lambda: degraded, what="a degraded event")
        verdict = await bus.buckets.health.get("loopy")
        assert verdict is not None
        assert verdict.value.degraded
        assert "crash loop" in verdict.value.reason
        assert "exited with code 1" in verdict.value.reason
        # backoff goes on: the replica keeps being restarted
        before = max(s.restarts for s in await replica_states(bus, "loopy"))
        await one_replica(bus, "loopy", lambda s: s.restarts > before)
    await degraded.close()


async def test_a_lost_node_is_replaced_and_its_return_brings_no_duplicates(
    settings, bus, control_plane, processes, kill_on_exit
) -> None:
    """The second node is a real agent process, frozen with SIGSTOP: it stops heartbeating
    while its replica keeps running, as on a partitioned machine."""
    spec = {
        "replicas": 2,
        "command": ["sleep", "600"],
        "placement": {"node_selector": {"pool": "p"}},
    }
    lost_events = await collect(bus, bus.names.evt("node", "n2", "lost"))
    agent = processes.start("agent", "--node-id", "n2", "--label", "pool=p", name="n2")
    replicas: Mirror = Mirror(bus.buckets.replicas)
    await replicas.start()
    try:
        async with control_plane(
            workers=HEALER, agents=[{**LOCAL, "node_id": "n1", "labels": {"pool": "p"}}]
        ):
            await eventually(
                lambda: bus.buckets.nodes.get("n2"), what="the second node's heartbeat"
            )
            await command(bus, "deploy", "spread", spec)

            def live_by_node() -> dict[str, list]:
                out: dict[str, list] = {}
                for s in replicas.values():
                    if s.service == "spread" and s.state in LIVE_STATES:
                        out.setdefault(s.node, []).append(s)
                return out

            placed = await eventually(
                lambda: (
                    lambda m: m if len(m.get("n1", [])) == 1 and len(m.get("n2", [])) == 1 else None
                )(live_by_node()),
                what="one replica on each node",
            )
            stale = placed["n2"][0]
            kill_on_exit.extend([placed["n1"][0].pid, stale.pid])
            os.kill(agent.pid, signal.SIGSTOP)
            try:
                await eventually(
                    lambda: len(live_by_node().get("n1", [])) == 2,
                    within=30,
                    what="the lost node's replica running on n1",
                )
                await eventually(lambda: lost_events, what="a node lost event")
                assert psutil.pid_exists(stale.pid)  # still running on the frozen node
            finally:
                os.kill(agent.pid, signal.SIGCONT)
            await eventually(
                lambda: process_gone(stale.pid),
                within=30,
                what="the returned node stopping its stale replica",
            )
            assignments = await bus.buckets.assignments.items()
            mine = [a.value for a in assignments.values() if a.value.service == "spread"]
            assert len(mine) == 2
            assert {a.node for a in mine} == {"n1"}
            for s in replicas.values():
                if s.service == "spread" and s.pid:
                    kill_on_exit.append(s.pid)
    finally:
        await replicas.stop()
        await lost_events.close()
