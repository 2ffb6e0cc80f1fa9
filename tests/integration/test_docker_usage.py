"""What the docker driver reports for the autoscaler: a container's cpu in cores and its
memory in bytes, from the engine's stats, against a real engine."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import docker
import pytest
from docker_support import remove_node_containers

from corral.schemas.spec import Resources
from corral.schemas.state import Template
from corral.workers.agent.drivers.base import Launch
from corral.workers.agent.drivers.docker import DockerDriver

pytestmark = [pytest.mark.docker, pytest.mark.timeout(60)]
BB = "/bin/busybox"


@pytest.fixture
def node_id(docker_engine: docker.DockerClient) -> Iterator[str]:
    node = f"test-{uuid.uuid4().hex[:8]}"
    yield node
    left = remove_node_containers(docker_engine, node)
    assert not left, f"containers left behind: {left}"


async def test_a_busy_container_reports_its_cpu_and_memory(busybox, node_id) -> None:
    async def on_exit(replica: str, code: int, reason: str) -> None:
        return None

    driver = DockerDriver(node_id, on_exit)
    template = Template(
        image=busybox,
        command=[BB, "sh", "-c", "while true; do :; done"],
        resources=Resources(cpu=0.5),
    )
    await driver.start(Launch("busy", "svc", node_id, template))
    try:
        first = await driver.stats("busy")
        assert first is not None
        assert first["memory"] > 0
        cpus: list[float] = []
        for _ in range(4):
            await asyncio.sleep(0.5)  # a rate needs two samples some time apart
            usage = await driver.stats("busy")
            assert usage is not None
            cpus.append(usage.get("cpu", 0.0))
        # limited to half a core, and busy all the time
        assert 0.2 < max(cpus) < 0.8, cpus
        assert await driver.stats("nobody") is None
    finally:
        await driver.stop("busy", 1.0)
        await driver.close()
