"""What agents report for the autoscaler: cpu cores and memory bytes per replica, from psutil
for processes and from the engine's stats for containers."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.schemas.state import Template
from corral.workers.agent.drivers.base import Launch
from corral.workers.agent.drivers.docker import container_usage
from corral.workers.agent.drivers.fake import FakeDriver
from corral.workers.agent.drivers.multi import MultiDriver
from corral.workers.agent.drivers.process import ProcessDriver

pytestmark = pytest.mark.timeout(30)
BUSY = "import time\nend = time.time() + 60\nwhile time.time() < end: pass\n"


def stats(total: int, system: int, *, cpus: int = 4, pre: tuple[int, int] | None = None) -> Any:
    raw: dict[str, Any] = {
        "cpu_stats": {
            "cpu_usage": {"total_usage": total},
            "system_cpu_usage": system,
            "online_cpus": cpus,
        },
        "memory_stats": {"usage": 100 * 2**20, "stats": {"inactive_file": 20 * 2**20}},
    }
    if pre is not None:
        raw["precpu_stats"] = {"cpu_usage": {"total_usage": pre[0]}, "system_cpu_usage": pre[1]}
    return raw


def test_docker_cpu_from_the_engines_two_samples() -> None:
    # half of the machine's cpu time on a 4-cpu machine: 2 cores
    usage, kept = container_usage(stats(1_500, 3_000, pre=(1_000, 2_000)), None)
    assert usage["cpu"] == pytest.approx(2.0)
    assert usage["memory"] == 80 * 2**20  # without the inactive page cache
    assert kept == (1_500, 3_000)


def test_docker_cpu_from_our_previous_one_shot_sample() -> None:
    usage, kept = container_usage(stats(1_000, 10_000), None)
    assert "cpu" not in usage  # one sample says nothing about a rate
    usage, _ = container_usage(stats(1_250, 11_000, cpus=2), kept)
    assert usage["cpu"] == pytest.approx(0.5)


def test_docker_usage_of_an_empty_answer_is_empty() -> None:
    assert container_usage({}, None) == ({}, None)


async def test_a_process_replica_reports_cpu_and_memory(tmp_path: Path) -> None:
    async def on_exit(replica: str, code: int, reason: str) -> None:
        return None

    driver = ProcessDriver(tmp_path, on_exit)
    template = Template(command=[sys.executable, "-c", BUSY])
    await driver.start(Launch("r1", "web", "n1", template))
    try:
        first = await driver.stats("r1")
        assert first is not None
        assert first["memory"] > 1_000_000
        await asyncio.sleep(0.5)  # let it burn some cpu between two samples
        second = await driver.stats("r1")
        assert second is not None
        assert 0.3 < second["cpu"] <= 1.2  # a busy loop keeps about one core busy
        assert await driver.stats("nobody") is None
    finally:
        await driver.stop("r1", 1.0)
    assert await driver.stats("r1") is None


async def test_a_process_replica_counts_its_children(tmp_path: Path) -> None:
    async def on_exit(replica: str, code: int, reason: str) -> None:
        return None

    driver = ProcessDriver(tmp_path, on_exit)
    script = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BUSY!r}])\n"
    await driver.start(Launch("r1", "web", "n1", Template(command=[sys.executable, "-c", script])))
    try:
        await driver.stats("r1")
        await asyncio.sleep(0.5)
        usage = await driver.stats("r1")
        assert usage is not None
        assert usage["cpu"] > 0.3  # the parent sleeps; its child does the work
    finally:
        await driver.stop("r1", 1.0)


async def test_fake_replicas_report_nothing_and_multi_routes() -> None:
    fake = FakeDriver()
    await fake.start(Launch("r1", "web", "n1", Template(command=["x"])))
    assert await fake.stats("r1") is None
    multi = MultiDriver([fake])
    assert await multi.stats("r1") is None
    assert await multi.stats("nobody") is None
