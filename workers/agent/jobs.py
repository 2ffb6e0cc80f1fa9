"""Pipeline jobs on this node. The agent watches its prefix of `<prefix>-jobs` (as it watches
its assignments), and for each job attempt: unpacks the artifacts of its needs into a fresh
workspace, runs it to completion (a process in its own session that dies with the agent, or
a container), streams its output line by line to `<prefix>.log.<run>.<job>`, enforces the
timeout (SIGTERM, a grace, then kill), uploads its declared artifacts and its complete log to
the object store, and reports `started` and `finished` on `<prefix>.evt.job.<run>.*`.

A job whose key disappears is stopped (cancelled). When the agent itself stops, its jobs are
stopped and reported lost with the node (reason `node_lost`), and an agent that starts finds
the workspaces of attempts a crashed predecessor began and reports those lost too."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from corral.bus.pipelines import PipelineStore, pipeline_store
from corral.bus.store import Mirror, Versioned
from corral.schemas.envelope import utcnow
from corral.schemas.runs import JobAssignment, JobReport
from corral.workers.agent.artifacts import pack, unpack
from corral.workers.agent.execution import (
    Execution,
    ExecutionError,
    remove_leftover_containers,
    start_execution,
)
from corral.workers.runtime import Context

log = logging.getLogger(__name__)
FLUSH_EVERY = 0.02
FLUSH_BYTES = 64 * 1024
MAX_LINE = 16 * 1024
LARGE_LOG = 1024 * 1024
"""a log this large (or with a line cut in the stream) is also kept whole in the object store"""
STOP_GRACE_CAP = 10.0


class LogSink:
    """Batches a job's output lines into messages on its log subject (stored by the log
    stream), and keeps the whole log in a file for the object store."""

    def __init__(self, runner: JobRunner, job: JobAssignment, path: Path) -> None:
        self.nc = runner.bus.nc
        self.subject = runner.store.names.log(job.run, job.job)
        self.headers = {"corral-job": job.job, "corral-attempt": str(job.attempt)}
        self.path = path
        self.file = open(path, "ab")  # noqa: SIM115 - closed in close()
        self.pending: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.size = 0
        self.total = 0
        self.cut = False
        self.flusher: asyncio.Task[None] | None = None

    async def line(self, stream: str, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\n")
        self.total += len(raw)
        if len(text) > MAX_LINE:
            text = text[:MAX_LINE] + " [line cut; the full log is in the object store]"
            self.cut = True
        self.file.write(raw if raw.endswith(b"\n") else raw + b"\n")
        self.pending[stream].append(text)
        self.size += len(text)
        if self.size >= FLUSH_BYTES:
            await self.flush()
        elif self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._later(), name=f"log {self.subject}")

    async def _later(self) -> None:
        await asyncio.sleep(FLUSH_EVERY)
        await self.flush()

    async def flush(self) -> None:
        for stream, lines in self.pending.items():
            if lines:
                self.pending[stream] = []
                await self.nc.publish(
                    self.subject,
                    "\n".join(lines).encode(),
                    headers={**self.headers, "corral-stream": stream},
                )
        self.size = 0

    async def close(self, outcome: str) -> None:
        if self.flusher is not None and not self.flusher.done():
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher
        await self.flush()
        await self.nc.publish(self.subject, b"", headers={**self.headers, "corral-eof": outcome})
        self.file.close()


@dataclass
class _Running:
    job: JobAssignment
    task: asyncio.Task[None] | None = None
    execution: Execution | None = None
    cancelled: str = ""
    """why we stop it: cancelled (its key went) or node_lost (the agent stops)"""
    started: datetime | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class JobRunner:
    name = "jobs"

    def __init__(
        self, ctx: Context, node_id: str, work_dir: Path, docker: Any | None = None
    ) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.node_id = node_id
        self.work_dir = work_dir
        self.docker = docker
        self.emitter = ctx.emitter(f"agent/{node_id}")
        self._store: PipelineStore | None = None
        self.mirror: Mirror[JobAssignment] | None = None
        self.running: dict[str, _Running] = {}
        self.seen: set[str] = set()
        self.stopping = False

    @property
    def store(self) -> PipelineStore:
        assert self._store is not None
        return self._store

    async def start(self) -> None:
        self._store = await pipeline_store(self.bus)
        if self.docker is not None:
            try:
                removed = await remove_leftover_containers(self.docker, self.node_id)
            except Exception as exc:
                log.warning("%s: cannot look for leftover job containers: %s", self.node_id, exc)
            else:
                if removed:
                    log.info(
                        "%s: removed %d job containers a previous agent left", self.node_id, removed
                    )
        self.mirror = Mirror(self.store.jobs, prefix=f"{self.node_id}.>")
        self.mirror.listen(self._changed)
        await self.mirror.start()
        for key, item in list(self.mirror.items.items()):
            self._changed(key, item)

    async def stop(self) -> None:
        self.stopping = True
        if self.mirror is not None:
            await self.mirror.stop()
        for running in list(self.running.values()):
            running.cancelled = running.cancelled or "node_lost"
            if running.execution is not None:
                running.execution.terminate(min(running.job.grace, STOP_GRACE_CAP))
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _changed(self, key: str, item: Versioned[JobAssignment] | None) -> None:
        if self.stopping:
            return
        if item is None:
            running = self.running.get(key)
            if running is None:
                self.seen.discard(key)  # done with: the worker has read its report
            elif not running.cancelled:
                running.cancelled = "cancelled"
                if running.execution is not None:
                    running.execution.terminate(running.job.grace)
            return
        if key in self.seen:
            return
        self.seen.add(key)
        running = _Running(item.value)
        self.running[key] = running
        running.task = asyncio.create_task(self._run(key, running), name=f"job {key}")

    def workspace(self, job: JobAssignment) -> Path:
        return self.work_dir / job.run / f"{job.job}-{job.attempt}"

    async def _run(self, key: str, running: _Running) -> None:
        job = running.job
        try:
            await self._attempt(running)
        except Exception as exc:
            log.exception("job %s failed in the agent", key)
            await self._finished(running, "failed", "error", None, f"agent error: {exc}")
        finally:
            self.running.pop(key, None)
            running.done.set()
            space = self.workspace(job)
            try:
                space.rmdir()  # one call for a job that left nothing behind
            except OSError:
                # not empty: a thread, as a big tree takes a while (it would hold the loop)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(shutil.rmtree, space, True)

    async def _attempt(self, running: _Running) -> None:
        job = running.job
        space = self.workspace(job)
        if space.exists():
            # a previous agent on this node began this attempt and died with it
            await self._finished(
                running, "failed", "node_lost", None, "the node's agent restarted during the job"
            )
            return
        space.mkdir(parents=True)
        for need, name in job.fetch.items():
            try:
                result = await self.store.artifacts.get(name)
            except Exception as exc:
                await self._finished(
                    running, "failed", "error", None, f"cannot fetch the artifacts of {need}: {exc}"
                )
                return
            await asyncio.to_thread(unpack, result.data or b"", space)
        if running.cancelled:
            await self._finished(running, "failed", running.cancelled, None, "stopped before start")
            return
        log_path = space.parent / f"{job.job}-{job.attempt}.log"
        sink = LogSink(self, job, log_path)
        outcome = "failed"
        try:
            try:
                execution = await start_execution(job, space, self.docker, sink.line)
            except ExecutionError as exc:
                await sink.line("stderr", str(exc).encode())
                await sink.close("failed")
                await self._finished(running, "failed", "error", None, str(exc))
                return
            running.execution = execution
            running.started = utcnow()
            await self._report(running, "started")
            if running.cancelled:
                execution.terminate(job.grace)
            code, timed_out = await execution.wait(job.timeout, job.grace)
            await execution.drained()
            if running.cancelled:
                reason, message = running.cancelled, f"stopped ({running.cancelled})"
            elif timed_out:
                reason = "timeout"
                message = f"timed out after {job.timeout:g}s; killed"
                await sink.line("stderr", f"corral: {message}".encode())
            elif code != 0:
                reason, message = "failure", f"exited with code {code}"
            else:
                reason, message = "", "exited with code 0"
            artifacts = ""
            if not reason and job.artifacts:
                try:
                    archive, count = await asyncio.to_thread(pack, space, job.artifacts)
                    name = self.store.names.artifact_object(job.run, job.job)
                    await self.store.artifacts.put(name, archive)
                    artifacts = name
                    await sink.line("stdout", f"corral: uploaded {count} artifact file(s)".encode())
                except Exception as exc:
                    reason, message = "error", f"cannot upload artifacts: {exc}"
            outcome = "succeeded" if not reason else "failed"
            await sink.close(outcome)
            await self._finished(running, outcome, reason, code, message, artifacts)
            if sink.cut or sink.total >= LARGE_LOG:
                await self._upload_log(job, log_path)
        finally:
            if not sink.file.closed:
                await sink.close(outcome)
            with contextlib.suppress(FileNotFoundError):
                log_path.unlink()

    async def _upload_log(self, job: JobAssignment, path: Path) -> None:
        with contextlib.suppress(Exception):
            data = await asyncio.to_thread(path.read_bytes)
            await self.store.artifacts.put(
                self.store.names.log_object(job.run, job.job, job.attempt), data
            )

    async def _report(self, running: _Running, what: str, **fields: Any) -> None:
        job = running.job
        data = JobReport(
            run=job.run,
            job=job.job,
            attempt=job.attempt,
            node=self.node_id,
            started_at=running.started,
            **fields,
        )
        await self.emitter.emit(
            "job", job.run, what, data, event_id=f"{job.run}.{job.job}.{job.attempt}.{what}"
        )

    async def _finished(
        self,
        running: _Running,
        outcome: str,
        reason: str,
        code: int | None,
        message: str,
        artifacts: str = "",
    ) -> None:
        await self._report(
            running,
            "finished",
            outcome=outcome,
            reason=reason,
            exit_code=code,
            message=message,
            finished_at=utcnow(),
            artifacts=artifacts,
        )
