"""`corral` processes against a NATS that is not there: they give up after
CORRAL_CONNECT_TIMEOUT with a clear error, and Ctrl-C or SIGTERM stops them at once."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from nats_support import NatsServer
from support import CORRAL, eventually, process_gone

from corral.bus.embedded import free_port

pytestmark = pytest.mark.timeout(60)


def env_for(data_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update({"CORRAL_DATA_DIR": str(data_dir), "COLUMNS": "300", "NO_COLOR": "1"})
    env.update({f"CORRAL_{k.upper()}": v for k, v in settings.items()})
    return env


class Corral:
    """One `corral ...` process, its output (stdout and stderr together) in a file."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, *args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
        with self.log.open("wb") as handle:
            self.proc = await asyncio.create_subprocess_exec(
                CORRAL,
                *args,
                env=env,
                stdout=handle,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
            )
        return self.proc

    def output(self) -> str:
        return " ".join(self.log.read_text().split())  # rich wraps long lines

    async def exit_code(self, within: float) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), within)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def corral(tmp_path: Path) -> AsyncIterator[Corral]:
    process = Corral(tmp_path / "corral.log")
    yield process
    await process.kill()


@pytest.fixture
def closed_url() -> str:
    return f"nats://127.0.0.1:{free_port()}"


async def test_up_gives_up_after_the_connect_timeout(
    tmp_path: Path, corral: Corral, closed_url: str
) -> None:
    env = env_for(tmp_path / "data", nats_url=closed_url, connect_timeout="2")
    await corral.start("up", "--gateway-port", "0", env=env)
    # a generous bound (start-up imports included), only so that a hang fails the test
    assert await corral.exit_code(40) == 1, corral.output()
    text = corral.output()
    assert f"error: cannot reach NATS at {closed_url} within 2 s (" in text
    assert "Connect call failed" in text
    assert "CORRAL_CONNECT_TIMEOUT" in text
    assert f"cannot reach NATS at {closed_url} yet" in text  # the warning while it retried
    assert "Traceback" not in text


@pytest.mark.parametrize(
    ("args", "signum", "code"),
    [
        (("up", "--gateway-port", "0"), signal.SIGINT, 130),
        (("worker", "api"), signal.SIGTERM, 143),
    ],
    ids=["up-sigint", "worker-sigterm"],
)
async def test_a_signal_stops_a_process_waiting_for_nats(
    tmp_path: Path,
    corral: Corral,
    closed_url: str,
    args: tuple[str, ...],
    signum: signal.Signals,
    code: int,
) -> None:
    env = env_for(tmp_path / "data", nats_url=closed_url, connect_timeout="600")
    proc = await corral.start(*args, env=env)
    await eventually(
        lambda: (
            f"cannot reach NATS at {closed_url} yet" in corral.output()
            or proc.returncode is not None
        ),
        within=40,
        what="the first failed attempt",
    )
    assert proc.returncode is None, corral.output()
    proc.send_signal(signum)
    assert await corral.exit_code(10) == code, corral.output()
    text = corral.output()
    assert f"{signum.name} while connecting to NATS at {closed_url}: stopped" in text
    assert "Traceback" not in text


async def test_a_short_command_uses_the_setting(
    tmp_path: Path, corral: Corral, closed_url: str
) -> None:
    env = env_for(tmp_path / "data", nats_url=closed_url, connect_timeout="1")
    await corral.start("status", env=env)
    assert await corral.exit_code(40) == 1, corral.output()
    text = corral.output()
    assert f"error: cannot reach NATS at {closed_url} within 1 s (" in text
    assert "Traceback" not in text


async def test_a_worker_stops_promptly_while_nats_is_away(
    tmp_path: Path, corral: Corral, own_nats: NatsServer
) -> None:
    """Once connected, a worker waits NATS out; a SIGTERM meanwhile still stops it (the bus
    and FastStream's broker are closed, not drained, as nats-py refuses while reconnecting)."""
    await own_nats.start()
    env = env_for(tmp_path / "data", nats_url=own_nats.url, prefix=f"t{uuid.uuid4().hex[:10]}")
    proc = await corral.start("worker", "api", env=env)
    await eventually(
        lambda: "worker api ready" in corral.output() or proc.returncode is not None,
        within=40,
        what="the worker ready",
    )
    assert proc.returncode is None, corral.output()
    await own_nats.stop()
    await eventually(
        lambda: "Connect call failed" in corral.output(), within=20, what="reconnect attempts"
    )
    assert proc.returncode is None  # reconnecting, not given up
    proc.send_signal(signal.SIGTERM)
    assert await corral.exit_code(15) == 0, corral.output()
    assert "Traceback" not in corral.output()


async def test_an_unusable_url_is_invalid_input(tmp_path: Path, corral: Corral) -> None:
    env = env_for(tmp_path / "data", nats_url="nats://127.0.0.1:not-a-port")
    await corral.start("worker", "api", env=env)
    assert await corral.exit_code(40) == 2, corral.output()
    assert "error: cannot use NATS URL 'nats://127.0.0.1:not-a-port'" in corral.output()
    assert "Traceback" not in corral.output()


async def test_an_interrupted_start_leaves_no_embedded_nats(tmp_path: Path, corral: Corral) -> None:
    data = tmp_path / "data"
    proc = await corral.start(
        "up", "--port", "0", "--gateway-port", "0", "--no-agent", env=env_for(data)
    )
    # nats.url is written once the embedded server answers, before the first connection
    await eventually(
        lambda: (data / "nats.url").exists() or proc.returncode is not None,
        within=40,
        what="the embedded nats-server",
    )
    assert proc.returncode is None, corral.output()
    servers = [p for p in psutil.Process(proc.pid).children() if p.name() == "nats-server"]
    assert len(servers) == 1
    proc.send_signal(signal.SIGINT)
    # 130 while it was still starting, 0 when the workers had started and stopped gracefully
    assert await corral.exit_code(30) in (0, 130), corral.output()
    await eventually(lambda: process_gone(servers[0].pid), within=10, what="nats-server gone")
    assert not (data / "nats.url").exists()
    assert "Traceback" not in corral.output()
