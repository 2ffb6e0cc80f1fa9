"""Helpers for the pipeline tests: send a pipeline or run command as any caller would, wait for
the worker's answer, read runs, and host the pipeline worker beside real agents."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from support import eventually

from corral.bus.codec import CORRELATION
from corral.bus.connection import Bus
from corral.bus.pipelines import pipeline_store
from corral.bus.settings import Settings
from corral.schemas.runs import JobRun, JobState, RunRecord
from corral.services.runner import Host, make_agent, make_worker
from corral.workers.runtime import Context, Worker


def pipeline_host(
    settings: Settings,
    *,
    nodes: tuple[str, ...] = ("local",),
    docker: str = "off",
    workers: tuple[str, ...] = ("pipeline",),
) -> Host:
    def build(ctx: Context) -> list[Worker]:
        built: list[Worker] = [make_worker(name, ctx) for name in workers]
        built.extend(
            make_agent(ctx, node_id=node, driver="process", docker=docker) for node in nodes
        )
        return built

    return Host(settings, build)


async def send(
    bus: Bus,
    resource: str,
    name: str,
    verb: str,
    data: dict[str, Any],
    *,
    within: float = 15,
    command_id: str | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Publish a command (with a fresh id unless given); return (accepted, the answer's data)."""
    command_id = command_id or uuid.uuid4().hex
    answers: list[tuple[str, dict[str, Any]]] = []

    async def on_msg(msg: Any) -> None:
        if (msg.headers or {}).get(CORRELATION) == command_id:
            what = msg.subject.rsplit(".", 1)[-1]
            if what in ("accepted", "rejected"):
                answers.append((what, json.loads(msg.data)))

    sub = await bus.nc.subscribe(bus.names.evt(resource, name, "*"), cb=on_msg)
    try:
        headers = {
            "ce-id": command_id,
            "ce-source": "test",
            "ce-type": f"io.corral.{resource}.{verb}",
            "ce-specversion": "1.0",
            "content-type": "application/json",
        }
        await bus.js.publish(
            bus.names.cmd(resource, name, verb), json.dumps(data).encode(), headers=headers
        )
        await eventually(lambda: answers, within=within, what=f"an answer to {verb} {name}")
    finally:
        await sub.unsubscribe()
    what, payload = answers[0]
    return what == "accepted", payload


async def start_run(bus: Bus, spec: dict[str, Any], **variables: str) -> str:
    ok, answer = await send(
        bus, "pipeline", spec["name"], "run", {"spec": spec, "variables": variables}
    )
    assert ok, answer
    return str(answer["run"])


async def get_run(bus: Bus, run_id: str) -> RunRecord:
    store = await pipeline_store(bus)
    found = await store.runs.get(run_id)
    assert found is not None
    return found.value


async def finished_run(bus: Bus, run_id: str, *, within: float = 20) -> RunRecord:
    store = await pipeline_store(bus)

    async def done() -> RunRecord | None:
        found = await store.runs.get(run_id)
        return found.value if found is not None and found.value.finished else None

    result: RunRecord = await eventually(done, within=within, what=f"run {run_id} to finish")
    return result


async def finished_run_round(
    bus: Bus, run_id: str, round_: int, *, within: float = 20
) -> RunRecord:
    store = await pipeline_store(bus)

    async def done() -> RunRecord | None:
        found = await store.runs.get(run_id)
        run = found.value if found is not None else None
        return run if run is not None and run.rounds == round_ and run.finished else None

    result: RunRecord = await eventually(done, within=within, what=f"round {round_} of {run_id}")
    return result


async def read_logs(bus: Bus, run_id: str, job: str) -> list[str]:
    """Every stdout/stderr line of a job's log stream so far, in order."""
    store = await pipeline_store(bus)
    sub = await bus.js.subscribe(store.names.log(run_id, job), ordered_consumer=True)
    lines: list[str] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=5)
            except TimeoutError:
                return lines
            if msg.data:
                lines.extend(msg.data.decode().split("\n"))
            if msg.metadata.num_pending == 0:
                return lines
    finally:
        await sub.unsubscribe()


def at(value: datetime | None) -> datetime:
    assert value is not None, "a time that should be set is not"
    return value


def span(job: JobRun) -> tuple[datetime, datetime]:
    """When a job started and finished."""
    return at(job.started_at), at(job.finished_at)


async def run_state(bus: Bus, run_id: str, job: str, state: JobState) -> bool:
    store = await pipeline_store(bus)
    found = await store.runs.get(run_id)
    return found is not None and found.value.jobs[job].state == state


async def collect_count(bus: Bus, prefix: str) -> int:
    """How many `job.*.dispatched` events the event stream holds."""
    info = await bus.js.stream_info(
        bus.names.evt_stream, subjects_filter=f"{prefix}.evt.job.*.dispatched"
    )
    return sum((info.state.subjects or {}).values())
