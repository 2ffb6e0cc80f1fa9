"""Real processes through the agent: ports and environment, exits restarted with backoff,
a command that cannot start reported with its reason, and nothing left running."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import psutil
import pytest
from support import eventually, process_gone

from corral.bus.connection import Bus
from corral.bus.settings import Settings
from corral.schemas.state import ReplicaState

pytestmark = pytest.mark.timeout(90)
LOCAL = {"node_id": "local", "driver": "process"}


async def deploy(settings: Settings, bus: Bus, spec: dict) -> None:
    headers = {
        "ce-id": uuid.uuid4().hex,
        "ce-source": "test",
        "ce-type": "io.corral.service.deploy",
        "ce-specversion": "1.0",
    }
    await bus.js.publish(
        f"{settings.prefix}.cmd.service.{spec['name']}.deploy",
        json.dumps(spec).encode(),
        headers=headers,
    )


async def statuses(bus: Bus, service: str) -> list:
    return [v.value for v in (await bus.buckets.replicas.items(f"{service}.>")).values()]


async def test_ports_and_environment_reach_the_process(
    settings, bus, control_plane, tmp_path: Path
) -> None:
    out = tmp_path / "env.json"
    script = (
        "import json,os,sys; json.dump({k: os.environ[k] for k in "
        "('PORT','PORT_HTTP','PORT_ADMIN','GREETING','CORRAL_REPLICA_ID')}, "
        f"open({str(out)!r},'w')); import time; time.sleep(600)"
    )
    spec = {
        "name": "envy",
        "replicas": 1,
        "ports": ["http", "admin"],
        "command": [sys.executable, "-c", script, "${PORT_ADMIN}"],
        "env": {"GREETING": "hello on ${PORT}"},
    }
    async with control_plane(agents=[LOCAL]):
        await deploy(settings, bus, spec)
        found = await eventually(
            lambda: out.exists() and out.read_text() and json.loads(out.read_text()),
            what="the replica's env",
        )
        [status] = await statuses(bus, "envy")
        assert status.state == ReplicaState.RUNNING
        assert found["PORT"] == found["PORT_HTTP"] == str(status.ports["http"])
        assert found["PORT_ADMIN"] == str(status.ports["admin"])
        assert found["GREETING"] == f"hello on {status.ports['http']}"
        assert found["CORRAL_REPLICA_ID"] == status.replica
        assert psutil.Process(status.pid).cmdline()[-1] == str(status.ports["admin"])
        pid = status.pid
    # stopping the agent stops its replicas
    assert process_gone(pid)


async def test_exits_are_restarted_with_backoff(settings, bus, control_plane) -> None:
    spec = {"name": "crashy", "replicas": 1, "command": ["sh", "-c", "exit 3"]}
    async with control_plane(agents=[LOCAL]):
        await deploy(settings, bus, spec)

        async def restarted_twice():
            found = await statuses(bus, "crashy")
            return found and found[0].restarts >= 2 and found[0]

        status = await eventually(restarted_twice, within=30, what="two restarts")
        assert status.exit_code == 3
        assert status.state in (ReplicaState.FAILED, ReplicaState.RUNNING)
        info = await bus.js.stream_info(bus.names.evt_stream)
        assert info.state.messages > 0
        # the first restart is at once; then the delays grow from 1 s (with 10% jitter)
        events = []
        sub = await bus.js.subscribe(
            f"{settings.prefix}.evt.replica.crashy.failed", ordered_consumer=True
        )
        for _ in range(2):
            msg = await sub.next_msg(timeout=5)
            events.append(json.loads(msg.data)["message"])
        await sub.unsubscribe()
        assert "restarting now (restart 1)" in events[0]
        delay = float(events[1].split("restarting in ")[1].split("s")[0])
        assert 0.9 <= delay <= 1.1, events[1]


async def test_command_not_found_is_reported(settings, bus, control_plane) -> None:
    spec = {"name": "typo", "replicas": 1, "command": ["no-such-program-xyz"]}
    async with control_plane(agents=[LOCAL]):
        await deploy(settings, bus, spec)

        async def failed():
            found = await statuses(bus, "typo")
            return found and found[0].state == ReplicaState.FAILED and found[0]

        status = await eventually(failed, what="a failed replica")
        assert "command not found: no-such-program-xyz" in status.message
