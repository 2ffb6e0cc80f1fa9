"""Pipeline jobs with an `image:` run as containers on the node's Docker engine: output
streamed, artifacts handed to a process job, a timeout stops the container."""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest
from docker_support import remove_node_containers
from pipeline_support import finished_run, pipeline_host, read_logs, start_run

from corral.schemas.runs import RunState

pytestmark = [pytest.mark.docker, pytest.mark.timeout(60)]


@pytest.fixture
def node(docker_engine: docker.DockerClient) -> Iterator[str]:
    name = "pipe-docker"
    yield name
    remove_node_containers(docker_engine, name)


async def test_image_job_passes_artifacts_to_a_process_job(
    settings, bus, busybox, node, docker_engine
) -> None:
    spec = {
        "name": "boxed",
        "jobs": {
            "build": {
                "image": busybox,
                "script": ["mkdir -p out", "echo made-in-$CORRAL_JOB > out/thing", "echo done"],
                "artifacts": {"paths": ["out"]},
            },
            "use": {"needs": ["build"], "command": ["cat", "out/thing"]},
            "slow": {"image": busybox, "command": ["/bin/busybox", "sleep", "60"], "timeout": "1s"},
        },
    }
    async with pipeline_host(settings, nodes=(node,), docker="on"):
        run_id = await start_run(bus, spec)
        run = await finished_run(bus, run_id, within=40)
        build_logs = await read_logs(bus, run_id, "build")
        use_logs = await read_logs(bus, run_id, "use")
    assert run.jobs["build"].state == "succeeded", run.jobs["build"]
    assert run.jobs["use"].state == "succeeded", run.jobs["use"]
    assert "done" in build_logs
    assert use_logs[0] == "made-in-build"
    assert run.jobs["slow"].reason == "timeout", run.jobs["slow"]
    assert run.state == RunState.FAILED
    left = docker_engine.containers.list(all=True, filters={"label": f"corral.node={node}"})
    assert left == [], "job containers are removed once they end"
