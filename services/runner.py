"""Hosting workers: one FastStream app per process, holding one or many workers, with the
embedded nats-server when no NATS is configured."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import psutil
from docker import DockerClient
from faststream import FastStream
from faststream.nats import NatsBroker
from nats.errors import Error as NatsError

from corral.bus.connection import Bus
from corral.bus.embedded import EmbeddedNats, EmbeddedNatsError
from corral.bus.settings import Settings
from corral.bus.unreachable import NatsUnreachableError, redact_url
from corral.schemas.spec import Resources
from corral.services.interrupts import interruptible
from corral.workers import NAMES as WORKERS
from corral.workers.agent.drivers.base import Driver
from corral.workers.agent.drivers.docker import DockerDriver, docker_client_or_none
from corral.workers.agent.drivers.fake import FakeDriver
from corral.workers.agent.drivers.multi import MultiDriver
from corral.workers.agent.drivers.process import ProcessDriver
from corral.workers.agent.jobs import JobRunner
from corral.workers.agent.worker import AgentWorker
from corral.workers.api.worker import ApiWorker
from corral.workers.autoscaler.worker import AutoscalerWorker
from corral.workers.deployer.worker import DeployerWorker
from corral.workers.healer.worker import HealerWorker
from corral.workers.notifier.worker import NotifierConfig, NotifierWorker
from corral.workers.pipeline.worker import PipelineWorker
from corral.workers.rules.worker import RulesWorker
from corral.workers.runtime import Context, Worker
from corral.workers.scheduler.worker import SchedulerWorker

log = logging.getLogger(__name__)
GC_THRESHOLDS = (100_000, 50, 100)
"""generation 0 is collected every 100,000 net allocations instead of 700 (CPython's default)"""


def tune_gc() -> None:
    """Collect cycles less often in a worker process, and never scan what start-up left.

    A worker holds its mirrors' records (hundreds of thousands of small objects at scale) for
    its whole life. With CPython's default thresholds the collector walked them again and
    again: in a 10,000-replica deploy it took a third of the deployer's CPU, and decoding one
    assignment cost 70-115 us instead of 12-18 us. Nothing here relies on prompt collection of
    cycles (the records are trees), so a larger first threshold only delays collecting the few
    cycles asyncio leaves behind. Call it once the workers have started: what is alive then
    (modules, the first snapshot of each mirror) is frozen out of every later collection."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()


def local_capacity() -> Resources:
    return Resources(cpu=float(os.cpu_count() or 1), memory=int(psutil.virtual_memory().total))


def make_agent(
    ctx: Context,
    *,
    node_id: str,
    driver: str = "process",
    capacity: Resources | None = None,
    labels: dict[str, str] | None = None,
    docker: str | None = None,
    fake_provides: tuple[str, ...] = ("process", "docker"),
) -> AgentWorker:
    """`driver` process is a real node: processes always, containers too when a Docker engine
    answers (`docker` auto), or must answer (on), or never (off). `docker` defaults to the
    CORRAL_DOCKER setting. fake simulates a node that runs what `fake_provides` says."""
    docker = docker or ctx.settings.docker
    holder: list[AgentWorker] = []

    async def on_exit(replica: str, code: int, reason: str) -> None:
        await holder[0].on_exit(replica, code, reason)

    runtime: Driver
    job_docker: DockerClient | None = None
    if driver == "process":
        drivers: list[Driver] = [ProcessDriver(ctx.settings.data_dir / "logs" / node_id, on_exit)]
        if docker != "off":
            client = docker_client_or_none()
            if client is not None:
                drivers.append(DockerDriver(node_id, on_exit, client))
                job_docker = client
            elif docker == "on":
                raise ValueError("no Docker engine answers, and CORRAL_DOCKER=on requires one")
            else:
                log.info("%s: no Docker engine answers; this node runs processes only", node_id)
        runtime = drivers[0] if len(drivers) == 1 else MultiDriver(drivers)
    elif driver == "fake":
        runtime = FakeDriver(on_exit, provides=fake_provides)
    else:
        raise ValueError(f"unknown driver {driver!r}; use process or fake")
    agent = AgentWorker(
        ctx, runtime, node_id=node_id, capacity=capacity or local_capacity(), labels=labels
    )
    holder.append(agent)
    if driver == "process":
        agent.jobs = JobRunner(
            ctx, node_id, ctx.settings.data_dir / "jobs" / node_id, docker=job_docker
        )
    return agent


def make_worker(name: str, ctx: Context) -> Worker:
    if name == "api":
        return ApiWorker(ctx)
    if name == "deployer":
        return DeployerWorker(ctx)
    if name == "scheduler":
        return SchedulerWorker(ctx)
    if name == "healer":
        return HealerWorker(ctx)
    if name == "autoscaler":
        return AutoscalerWorker(ctx)
    if name == "rules":
        return RulesWorker(ctx)
    if name == "pipeline":
        return PipelineWorker(ctx)
    if name == "notifier":
        return NotifierWorker(ctx, NotifierConfig.from_env())
    raise ValueError(f"unknown worker {name!r}; choose from {', '.join(WORKERS)}")


async def serve(
    settings: Settings,
    build: Callable[[Context], list[Worker]],
    *,
    embedded: bool = False,
    on_ready: Callable[[str], Awaitable[None] | None] | None = None,
) -> None:
    """Run workers until SIGINT or SIGTERM, then stop them all, then NATS if we started it."""
    nats_server: EmbeddedNats | None = None
    lock: int | None = None
    if embedded and not settings.nats_url:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock_data_dir(settings.data_dir)
        nats_server = EmbeddedNats(
            settings.data_dir / "jetstream",
            port=settings.nats_port,
            binary=settings.nats_server_bin,
            log_file=settings.data_dir / "nats-server.log",
        )
        url = await asyncio.to_thread(nats_server.start)
        settings = settings.model_copy(update={"nats_url": url})
        (settings.data_dir / "nats.url").write_text(url + "\n")
    url = settings.resolved_url()
    bus: Bus | None = None
    workers: list[Worker] = []
    try:
        # until FastStream's handlers take over, Ctrl-C or SIGTERM stops the start at once
        async with interruptible(f"connecting to NATS at {redact_url(url)}"):
            bus = await Bus.connect(settings, name="corral-workers")
            ctx = Context(settings=settings, bus=bus)
            workers = build(ctx)
            broker = NatsBroker(
                url,
                logger=logging.getLogger("corral.broker"),
                log_level=logging.DEBUG,
                max_reconnect_attempts=-1,
            )
            for worker in workers:
                worker.register(broker)
            await connect_broker(broker, settings)
        started: list[Worker] = []

        async def start_workers() -> None:
            for worker in workers:
                await worker.start()
                started.append(worker)
            tune_gc()
            if on_ready is not None:
                result = on_ready(url)
                if result is not None:
                    await result

        async def stop_workers() -> None:
            for worker in reversed(started):
                try:
                    await worker.stop()
                except Exception:
                    log.exception("stopping %s failed", worker.name)

        app = FastStream(
            broker, logger=None, after_startup=[start_workers], on_shutdown=[stop_workers]
        )
        try:
            await app.run()
        except NatsError as exc:
            log.warning("connection trouble while stopping: %s", exc)
    finally:
        if bus is not None:
            with contextlib.suppress(Exception):
                await bus.close()
        if nats_server is not None:
            url_file = settings.data_dir / "nats.url"
            with contextlib.suppress(FileNotFoundError):
                if url_file.read_text().strip() == nats_server.url:
                    url_file.unlink()
            await asyncio.to_thread(nats_server.stop)
        if lock is not None:
            os.close(lock)


async def connect_broker(broker: NatsBroker, settings: Settings) -> None:
    """FastStream's own connection, made before the broker starts so that it is bounded like
    the bus's: NATS answered the bus a moment ago, but may have gone since. FastStream keeps
    it, and its reconnects stay unlimited."""
    try:
        await asyncio.wait_for(broker.connect(), settings.connect_timeout)
    except TimeoutError:
        url = redact_url(settings.resolved_url())
        raise NatsUnreachableError(
            url,
            f"NATS at {url} took the bus's connection but not the broker's within "
            f"{settings.connect_timeout:g} s; is it restarting? CORRAL_CONNECT_TIMEOUT sets "
            "how long to wait.",
        ) from None


def _lock_data_dir(data_dir: Path) -> int:
    """One `corral up` per data directory: two would share a JetStream store."""
    path = data_dir / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise EmbeddedNatsError(
            f"another `corral up` (pid {holder or '?'}) is using {data_dir}; stop it first "
            "or pass another --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


class Host:
    """Workers hosted inside a running event loop, without signal handling: for tests,
    benchmarks and embedding. `async with Host(settings, build) as host: ...`"""

    def __init__(
        self,
        settings: Settings,
        build: Callable[[Context], list[Worker]],
        *,
        name: str = "corral-host",
    ) -> None:
        self.settings = settings
        self.build = build
        self.name = name
        self.workers: list[Worker] = []
        self.bus: Bus | None = None
        self.broker: NatsBroker | None = None
        self._started: list[Worker] = []
        self._added: list[Worker] = []

    @property
    def ctx(self) -> Context:
        assert self.bus is not None, "the host has not started"
        return Context(settings=self.settings, bus=self.bus)

    @property
    def started(self) -> list[Worker]:
        return [*self._started, *self._added]

    async def __aenter__(self) -> Host:
        self.bus = await Bus.connect(self.settings, name=self.name)
        self.workers = self.build(self.ctx)
        self.broker = NatsBroker(self.settings.resolved_url(), logger=None)
        for worker in self.workers:
            worker.register(self.broker)
        await connect_broker(self.broker, self.settings)
        await self.broker.start()
        for worker in self.workers:
            await worker.start()
            self._started.append(worker)
        tune_gc()
        return self

    async def add(self, workers: Sequence[Worker], *, concurrency: int = 25) -> None:
        """More workers without subscribers (agents, say), started a few at a time; they are
        stopped together, before the ones the host was built with."""
        for i in range(0, len(workers), concurrency):
            chunk = workers[i : i + concurrency]
            await asyncio.gather(*(worker.start() for worker in chunk))
            self._added.extend(chunk)

    async def __aexit__(self, *exc: object) -> None:
        added, self._added = self._added, []
        for worker, result in zip(
            added,
            await asyncio.gather(*(w.stop() for w in added), return_exceptions=True),
            strict=True,
        ):
            if isinstance(result, Exception):
                log.error("stopping %s failed: %r", worker.name, result)
        for worker in reversed(self._started):
            try:
                await worker.stop()
            except Exception:
                log.exception("stopping %s failed", worker.name)
        self._started.clear()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.stop()
        if self.bus is not None:
            await self.bus.close()
