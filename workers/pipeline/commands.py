"""Pipeline and run commands: run, apply, approve, cancel, retry. Each is validated, applied
with compare-and-set, and answered with `…accepted` (or, through the bus edge, `…rejected`
and a dead letter). Deploy jobs are started here too: they send a service deploy command like
any other caller and record the generation it produced."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from corral.bus.codec import CORRELATION, decode
from corral.bus.edge import headers_of
from corral.bus.events import accepted_id
from corral.schemas.envelope import CloudEvent, utcnow
from corral.schemas.errors import (
    ConflictError,
    InvalidInput,
    NotFound,
    TemporaryError,
    UnknownCommand,
    field_errors_from_pydantic,
)
from corral.schemas.events import CommandAccepted
from corral.schemas.pipeline import PipelineSpec, run_id_for
from corral.schemas.runs import (
    RUN_COMMANDS,
    ApplyPipeline,
    ApproveJob,
    JobReport,
    RunEvent,
    RunPipeline,
    RunRecord,
    SteerRun,
    StoredPipeline,
)
from corral.schemas.spec import ServiceSpec
from corral.workers.pipeline import dag
from corral.workers.pipeline.planning import cancelled_work

if TYPE_CHECKING:
    from corral.workers.pipeline.worker import PipelineWorker

log = logging.getLogger(__name__)
CAS_ATTEMPTS = 8
DEPLOY_ANSWER_WITHIN = 30.0


def _validate(model: type[BaseModel], data: Any, what: str) -> Any:
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise InvalidInput(f"invalid {what}", field_errors_from_pydantic(exc)) from None


def parse_spec(data: dict[str, Any], name: str) -> PipelineSpec:
    spec: PipelineSpec = _validate(PipelineSpec, data, "pipeline spec")
    if spec.name != name:
        raise InvalidInput(f"the spec is named {spec.name!r}, but the command names {name!r}")
    for job_name, job in spec.jobs.items():
        if isinstance(job.deploy, str):
            raise InvalidInput(
                f"job {job_name!r} deploys the file {job.deploy!r}: send the service spec "
                "itself (the CLI reads the file for you)"
            )
    return spec


class Commands:
    def __init__(self, worker: PipelineWorker) -> None:
        self.worker = worker
        self.store = worker.store
        self.emitter = worker.emitter
        self.deploying: set[str] = set()

    async def handle(self, msg: Msg) -> None:
        parsed = self.worker.bus.names.parse_cmd(msg.subject)
        if parsed is None:
            raise UnknownCommand(f"subject {msg.subject!r} is not a command subject")
        resource, name, verb = parsed
        model = RUN_COMMANDS.get(resource, {}).get(verb)
        if model is None:
            known = ", ".join(RUN_COMMANDS.get(resource, {})) or "none"
            raise UnknownCommand(f"unknown {resource} command {verb!r}; known: {known}")
        event = decode(headers_of(msg), msg.data)
        data = _validate(model, event.data, f"{resource} {verb} command")
        who = (msg.headers or {}).get("corral-requested-by", "")
        if isinstance(data, RunPipeline):
            await self.run(name, data, event, who)
        elif isinstance(data, ApplyPipeline):
            await self.apply(name, data, event)
        elif isinstance(data, ApproveJob):
            await self.approve(name, data, event)
        elif isinstance(data, SteerRun) and verb == "cancel":
            await self.cancel(name, data, event, who)
        elif isinstance(data, SteerRun):
            await self.retry(name, data, event)

    async def accepted(
        self, resource: str, name: str, verb: str, event: CloudEvent, **extra: Any
    ) -> None:
        data = CommandAccepted(command=verb, command_id=event.id, name=name, generation=1, **extra)
        await self.emitter.emit(
            resource,
            name,
            "accepted",
            data,
            correlation=event.id,
            event_id=accepted_id(event.id),
        )

    # pipeline commands ---------------------------------------------------------------------
    async def _store_spec(self, spec: PipelineSpec, command_id: str) -> None:
        specs = self.store.specs
        for _ in range(CAS_ATTEMPTS):
            current = await specs.get(spec.name)
            record = StoredPipeline(
                spec=spec,
                updated_at=utcnow(),
                command_id=command_id,
                last_cron=current.value.last_cron if current else None,
            )
            try:
                if current is None:
                    await specs.create(spec.name, record)
                else:
                    await specs.update(spec.name, record, current.revision)
                return
            except ConflictError:
                continue
        raise TemporaryError(f"pipeline {spec.name} kept changing", delay=0.5)

    async def apply(self, name: str, data: ApplyPipeline, event: CloudEvent) -> None:
        spec = parse_spec(data.spec, name)
        await self._store_spec(spec, event.id)
        await self.accepted("pipeline", name, "apply", event)
        self.worker.cron_changed()

    async def run(self, name: str, data: RunPipeline, event: CloudEvent, who: str) -> None:
        if data.spec is not None:
            spec = parse_spec(data.spec, name)
            await self._store_spec(spec, event.id)
        else:
            stored = await self.store.specs.get(name)
            if stored is None:
                raise NotFound(f"no pipeline named {name!r} is stored; run it with a spec")
            spec = stored.value.spec
        suffix = hashlib.sha256(event.id.encode()).hexdigest()[:10]
        run_id = run_id_for(name, suffix)
        requested_by = data.requested_by or who or event.source
        await self.start_run(
            dag.new_run(
                run_id,
                spec,
                dict(data.variables),
                utcnow(),
                requested_by=requested_by,
                command_id=event.id,
            )
        )
        await self.accepted("pipeline", name, "run", event, run=run_id)

    async def start_run(self, run: RunRecord) -> bool:
        """Store a new run and start it; False if a run of that id exists (a duplicate)."""
        try:
            revision = await self.store.runs.create(run.id, run)
        except ConflictError:
            return False
        assert self.worker.runs is not None
        await self.worker.runs.written(run, revision, started=True)
        await self.emitter.emit(
            "run",
            run.id,
            "started",
            RunEvent(
                pipeline=run.pipeline,
                run=run.id,
                state=run.state.value,
                requested_by=run.requested_by,
                round=run.rounds,
            ),
            correlation=run.command_id or None,
            event_id=f"{run.id}.r{run.rounds}.started",
        )
        self.worker.mark(run.id)
        return True

    # run commands --------------------------------------------------------------------------
    async def change(self, run_id: str, change: Any) -> tuple[RunRecord, RunRecord]:
        """Apply `change(run) -> run` with compare-and-set, under the run's lock."""
        async with self.worker._run_locks[run_id]:
            for _ in range(CAS_ATTEMPTS):
                current = await self.store.runs.get(run_id)
                if current is None:
                    raise NotFound(f"no run {run_id!r}")
                after: RunRecord = change(current.value)
                try:
                    revision = await self.store.runs.update(run_id, after, current.revision)
                except ConflictError:
                    continue
                assert self.worker.runs is not None
                started = current.value.finished and not after.finished
                await self.worker.runs.written(after, revision, started=started)
                return current.value, after
        raise TemporaryError(f"run {run_id} kept changing", delay=0.5)

    async def approve(self, run_id: str, data: ApproveJob, event: CloudEvent) -> None:
        await self.change(
            run_id, lambda run: dag.approve(run, data.job, data.user, data.roles, utcnow())
        )
        await self.accepted("run", run_id, "approve", event, job=data.job, user=data.user)
        self.worker.mark(run_id)

    async def cancel(self, run_id: str, data: SteerRun, event: CloudEvent, who: str) -> None:
        by = data.requested_by or who
        before, after = await self.change(run_id, lambda run: dag.cancel(run, utcnow(), by))
        await self.worker.carry_out(cancelled_work(before, after))
        await self.accepted("run", run_id, "cancel", event)

    async def retry(self, run_id: str, data: SteerRun, event: CloudEvent) -> None:
        _, after = await self.change(run_id, lambda run: dag.retry(run, utcnow()))
        await self.emitter.emit(
            "run",
            run_id,
            "started",
            RunEvent(
                pipeline=after.pipeline,
                run=run_id,
                state=after.state.value,
                requested_by=data.requested_by or "",
                round=after.rounds,
            ),
            correlation=event.id,
            event_id=f"{run_id}.r{after.rounds}.started",
        )
        await self.accepted("run", run_id, "retry", event, round=after.rounds)
        self.worker.mark(run_id)

    # deploy jobs ---------------------------------------------------------------------------
    async def start_deploy(self, run: RunRecord, name: str) -> None:
        """Send the job's service spec as a deploy command, wait for the api worker's answer,
        and hand the outcome to the run as a job report."""
        job = run.jobs[name]
        spec = run.spec.jobs[job.job].deploy
        assert isinstance(spec, ServiceSpec)
        attempt = f"{run.id}.{name}.{job.attempt}"
        if attempt in self.deploying:
            return  # already under way in this worker
        self.deploying.add(attempt)
        try:
            await self._deploy(run, name, spec)
        finally:
            self.deploying.discard(attempt)

    async def _deploy(self, run: RunRecord, name: str, spec: ServiceSpec) -> None:
        job = run.jobs[name]
        bus = self.worker.bus
        command_id = f"{run.id}.{name}.{job.attempt}.deploy.{int(time.time() * 1000)}"
        sub = await bus.nc.subscribe(bus.names.evt("service", spec.name, "*"))
        report = JobReport(run=run.id, job=name, attempt=job.attempt, node="")
        try:
            await self.emitter.command(
                "service",
                spec.name,
                "deploy",
                spec,
                command_id=command_id,
                correlation=run.command_id or None,
            )
            answer = await self._answer(sub, command_id)
        finally:
            await sub.unsubscribe()
        if answer is None:
            report = report.model_copy(
                update={
                    "outcome": "failed",
                    "reason": "failure",
                    "message": "no answer from the api worker to the deploy command",
                }
            )
        elif answer.type.endswith(".rejected"):
            reason = dict(answer.data or {}).get("reason", "rejected")
            report = report.model_copy(
                update={
                    "outcome": "failed",
                    "reason": "failure",
                    "message": f"deploy rejected: {reason}",
                }
            )
        else:
            generation = int(dict(answer.data or {}).get("generation", 0))
            record = await bus.buckets.services.get(spec.name)
            revision = record.value.revision if record else 0
            await self.worker.deploy_accepted(
                run.id, name, job.attempt, command_id, generation, revision
            )
            return
        await self.worker.deploy_failed(report)

    async def _answer(self, sub: Any, command_id: str) -> CloudEvent | None:
        deadline = time.monotonic() + DEPLOY_ANSWER_WITHIN
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except TimeoutError:
                return None
            if (msg.headers or {}).get(CORRELATION) != command_id:
                continue
            if msg.subject.endswith((".accepted", ".rejected")):
                return decode(msg.headers, msg.data)
        return None
