"""Containers through the whole system, on a real engine: a crashing container restarted
with growing delays, an HTTP health probe on a container, an agent killed with -9 whose
successor adopts its containers and removes orphans, and an image never placed on a node
without Docker."""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Iterator

import docker
import pytest
from docker_support import remove_node_containers
from support import collect, command, corral_env, eventually, replica_states

from corral.schemas.state import ReplicaState

pytestmark = [pytest.mark.docker, pytest.mark.timeout(90)]
BB = "/bin/busybox"
HTTPD = [
    BB,
    "sh",
    "-c",
    f"{BB} mkdir -p /www && echo ok > /www/index.html && "
    f"exec {BB} httpd -f -p 127.0.0.1:${{PORT}} -h /www",
]


@pytest.fixture
def node_id(docker_engine: docker.DockerClient) -> Iterator[str]:
    node = f"d{uuid.uuid4().hex[:8]}"
    yield node
    remove_node_containers(docker_engine, node)


def web(image: str, replicas: int = 1) -> dict:
    return {
        "replicas": replicas,
        "image": image,
        "ports": ["http"],
        "command": HTTPD,
        "resources": {"cpu": 0.1, "memory": "32Mi"},
        "health": {"http": {"path": "/", "port": "http"}, "period": "200ms"},
        "stop_grace_period": "1s",
    }


async def test_a_crashing_container_is_restarted_with_growing_delays(
    settings, bus, control_plane, busybox, node_id
) -> None:
    spec = {
        "replicas": 1,
        "image": busybox,
        "command": [BB, "sh", "-c", "exit 2"],
        "restart": {"backoff": {"initial": "200ms", "factor": 2, "max": "5s"}},
    }
    failed = await collect(bus, bus.names.evt("replica", "crashy", "failed"))
    async with control_plane(agents=[{"node_id": node_id, "docker": "on"}]):
        await command(bus, "deploy", "crashy", spec)
        await eventually(lambda: len(failed) >= 4, within=30, what="four failures")
    await failed.close()
    messages = [text for _, text in failed][:4]
    assert all("exited with code 2" in m for m in messages), messages
    assert "restarting now" in messages[0]
    delays = [float(re.findall(r"restarting in ([0-9.]+)s", m)[0]) for m in messages[1:]]
    assert delays == sorted(delays), delays
    assert delays[-1] > delays[0], delays
    assert 0.15 <= delays[0] <= 0.25, delays


async def test_a_container_passes_its_http_probe_and_carries_corral_labels(
    settings, bus, control_plane, busybox, node_id, docker_engine
) -> None:
    async with control_plane(agents=[{"node_id": node_id, "docker": "on"}]):
        await command(bus, "deploy", "web", web(busybox, replicas=2))

        async def healthy():
            states = await replica_states(bus, "web")
            ok = [s for s in states if s.state == ReplicaState.HEALTHY and s.ready]
            return len(ok) == 2 and ok

        found = await eventually(healthy, what="two healthy containers")
        containers = docker_engine.containers.list(filters={"label": f"corral.node={node_id}"})
        labels = {c.labels["corral.replica"]: c.labels for c in containers}
        assert set(labels) == {s.replica for s in found}
        for status in found:
            assert labels[status.replica]["corral.service"] == "web"
            assert labels[status.replica]["corral.generation"] == "1"
    # stopping the agent stops and removes its containers
    assert not docker_engine.containers.list(all=True, filters={"label": f"corral.node={node_id}"})


async def test_an_agent_killed_with_9_is_succeeded_by_one_that_adopts_its_containers(
    settings, bus, control_plane, processes, busybox, node_id, docker_engine
) -> None:
    env = corral_env(settings, CORRAL_DOCKER="on")
    async with control_plane(agents=[]):
        first = processes.start("agent", "--node-id", node_id, env=env, name="agent1")
        await command(bus, "deploy", "web", web(busybox, replicas=2))

        async def healthy():
            states = await replica_states(bus, "web")
            ok = [s for s in states if s.state == ReplicaState.HEALTHY]
            return len(ok) == 2 and ok

        await eventually(healthy, within=40, what="two healthy containers")
        before = {
            c.id for c in docker_engine.containers.list(filters={"label": f"corral.node={node_id}"})
        }
        assert len(before) == 2
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        # an orphan: labelled for this node, claimed by no assignment
        orphan = docker_engine.containers.run(
            busybox,
            [BB, "sleep", "600"],
            detach=True,
            network_mode="none",
            name=f"corral-{node_id}-orphan",
            labels={"corral.node": node_id, "corral.replica": "orphan", "corral.service": "x"},
        )
        processes.start("agent", "--node-id", node_id, env=env, name="agent2")

        def adopted() -> bool:
            now = docker_engine.containers.list(
                all=True, filters={"label": f"corral.node={node_id}"}, ignore_removed=True
            )
            return {c.id for c in now} == before

        await eventually(adopted, within=30, what="the same two containers and no orphan")
        assert orphan.id not in before
        states = await replica_states(bus, "web")
        assert all(s.restarts == 0 for s in states)


async def test_an_image_is_never_placed_on_a_node_without_docker(
    settings, bus, control_plane, busybox
) -> None:
    async with control_plane(agents=[{"node_id": "plain", "docker": "off"}]):
        await command(bus, "deploy", "boxed", web(busybox))

        async def pending():
            item = await bus.buckets.service_status.get("boxed")
            return item is not None and item.value.pending == 1 and item.value

        status = await eventually(pending, what="the replica pending")
        assert "docker" in status.reason, status.reason
        assert not await bus.buckets.assignments.items()
