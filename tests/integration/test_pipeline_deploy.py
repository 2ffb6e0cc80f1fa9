"""A deploy job applies a service spec through the api worker like any caller, and succeeds
once the rollout has finished healthy; a rollout that fails and is rolled back fails it."""

from __future__ import annotations

import pytest
from pipeline_support import finished_run, pipeline_host, start_run

from corral.schemas.runs import JobState, RunState

pytestmark = pytest.mark.timeout(60)
CONTROL = ("pipeline", "api", "deployer", "scheduler")


def service(command: list[str]) -> dict:
    return {
        "name": "web",
        "replicas": 2,
        "command": command,
        "update": {"min_healthy": "200ms"},
        "restart": {"backoff": {"initial": "100ms"}},
    }


async def test_deploy_job_waits_for_the_rollout_and_fails_on_rollback(settings, bus) -> None:
    good = {
        "name": "cd",
        "jobs": {
            "test": {"command": ["true"]},
            "deploy": {"needs": ["test"], "deploy": service(["sleep", "3600"])},
        },
    }
    bad = {
        "name": "cd",
        "jobs": {"deploy": {"deploy": service(["sh", "-c", "sleep 0.3; exit 3"])}},
    }
    async with pipeline_host(settings, workers=CONTROL):
        run = await finished_run(bus, await start_run(bus, good), within=30)
        assert run.state == RunState.SUCCEEDED, run.jobs["deploy"]
        job = run.jobs["deploy"]
        assert job.deploy_generation >= 1
        assert "2/2 ready" in job.message
        record = await bus.buckets.services.get("web")
        assert record is not None
        assert record.value.spec.command == ["sleep", "3600"]
        run = await finished_run(bus, await start_run(bus, bad), within=40)
        job = run.jobs["deploy"]
        assert job.state == JobState.FAILED
        assert "rolled back" in job.message or "rollout failed" in job.message, job.message
