"""Pure: given a run, what its agents reported and what the worker sees (live nodes, resource
group locks, deploy progress), decide the run's next state and the intents that carry it
out: dispatch these jobs, stop those, take or free these locks, say this, wake me then.
No I/O; the worker's handler does what this returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import BaseModel

from corral.schemas.runs import (
    ACTIVE,
    FINISHED,
    Attempt,
    FailedJob,
    JobEvent,
    JobReport,
    JobRun,
    JobState,
    RunEvent,
    RunRecord,
    RunState,
)


@dataclass(frozen=True)
class DeployProgress:
    """A deploy job's rollout as the worker reads it from the service's records."""

    done: bool
    failed: bool = False
    message: str = ""


@dataclass
class View:
    now: datetime
    nodes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """live nodes that take new jobs -> the drivers they offer"""
    alive: set[str] | None = None
    """every node whose heartbeat is fresh, draining ones too (None: those of `nodes`)"""
    load: dict[str, int] = field(default_factory=dict)
    """node -> jobs running there now (all runs), for spreading"""
    locks: dict[str, str] = field(default_factory=dict)
    """resource group -> holder (`<run>.<job>`), for the groups this run uses"""
    deploys: dict[str, DeployProgress] = field(default_factory=dict)


@dataclass(frozen=True)
class Dispatch:
    job: str
    node: str
    attempt: int


@dataclass(frozen=True)
class Revoke:
    job: str
    node: str
    attempt: int


@dataclass
class Plan:
    run: RunRecord
    dispatch: list[Dispatch] = field(default_factory=list)
    deploy: list[str] = field(default_factory=list)
    """deploy jobs to start: the worker sends their service deploy command"""
    revoke: list[Revoke] = field(default_factory=list)
    want_locks: dict[str, str] = field(default_factory=dict)
    """resource group -> the holder (`<run>.<job>`) that wants it"""
    release: set[str] = field(default_factory=set)
    events: list[tuple[str, str, BaseModel]] = field(default_factory=list)
    """(resource, what, data): resource `job` or `run`, under the run's id"""
    wake_at: datetime | None = None

    @property
    def changed(self) -> bool:
        return bool(self.dispatch or self.deploy or self.revoke or self.release or self.events)


def holder(run: RunRecord, job: str) -> str:
    return f"{run.id}.{job}"


class _Step:
    def __init__(self, run: RunRecord, view: View) -> None:
        self.run = run
        self.view = view
        self.jobs = dict(run.jobs)
        self.plan = Plan(run)
        self.load = dict(view.load)
        self.dirty = False

    def set(self, name: str, **update: object) -> JobRun:
        job = self.jobs[name].model_copy(update=update)
        self.jobs[name] = job
        self.dirty = True
        return job

    def job_event(self, job: JobRun, what: str, **extra: object) -> None:
        data = JobEvent(
            pipeline=self.run.pipeline,
            run=self.run.id,
            job=job.name,
            attempt=job.attempt,
            node=job.node,
            reason=job.reason,
            message=job.message,
            exit_code=job.exit_code,
            at=self.view.now,
            **extra,
        )
        self.plan.events.append(("job", what, data))

    def wake(self, at: datetime) -> None:
        if self.plan.wake_at is None or at < self.plan.wake_at:
            self.plan.wake_at = at

    # outcomes -----------------------------------------------------------------------------
    def report(self, report: JobReport) -> None:
        job = self.jobs.get(report.job)
        if job is None or job.attempt != report.attempt or job.state not in ACTIVE:
            return  # an old attempt, a cancelled job, or a duplicate: nothing to do
        if not report.outcome:
            self.set(
                job.name,
                state=JobState.RUNNING,
                started_at=report.started_at or self.view.now,
                node=report.node,
            )
            return
        started = report.started_at or job.started_at
        if report.outcome == "succeeded":
            job = self.set(
                job.name,
                state=JobState.SUCCEEDED,
                started_at=started,
                finished_at=report.finished_at or self.view.now,
                exit_code=report.exit_code,
                reason="",
                message=report.message,
                artifacts=report.artifacts,
            )
            self.close_attempt(job)
            self.job_event(job, "succeeded")
            return
        self.fail(
            job.name,
            report.reason or "failure",
            report.message,
            exit_code=report.exit_code,
            started=started,
            finished=report.finished_at,
        )

    def fail(
        self,
        name: str,
        reason: str,
        message: str,
        *,
        exit_code: int | None = None,
        started: datetime | None = None,
        finished: datetime | None = None,
    ) -> None:
        job = self.jobs[name]
        spec = self.run.spec.jobs[job.job].retry
        matched = spec.matches("failure" if reason == "error" else reason, exit_code)
        finished_at = finished or self.view.now
        common = {
            "started_at": started or job.started_at,
            "finished_at": finished_at,
            "exit_code": exit_code,
            "reason": reason,
            "message": message,
        }
        if job.tries <= spec.max and matched:
            delay = spec.backoff.delay(job.tries)
            job = self.set(
                name,
                state=JobState.SCHEDULED,
                not_before=self.view.now + timedelta(seconds=delay),
                **common,
            )
            self.close_attempt(job, retry_in=delay)
            self.job_event(job, "retry_scheduled", retry_in=delay)
            self.wake(job.not_before or self.view.now)
            return
        job = self.set(name, state=JobState.FAILED, **common)
        self.close_attempt(job)
        self.job_event(job, "failed")

    def close_attempt(self, job: JobRun, retry_in: float | None = None) -> None:
        attempt = Attempt(
            attempt=job.attempt,
            node=job.node,
            dispatched_at=job.dispatched_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            exit_code=job.exit_code,
            reason=job.reason,
            message=job.message,
            retry_in=retry_in,
        )
        history = [a for a in job.history if a.attempt != job.attempt]
        self.set(job.name, history=[*history, attempt])
        if job.holds:
            self.plan.release.add(job.holds)
            self.set(job.name, holds="")
        if job.node and not self.run.spec.jobs[job.job].deploy:
            self.plan.revoke.append(Revoke(job.name, job.node, job.attempt))

    # the walk over the graph ---------------------------------------------------------------
    def walk(self) -> None:
        for name in list(self.jobs):
            if self.jobs[name].state in ACTIVE:
                self.watch(self.jobs[name])
            job = self.jobs[name]  # a lost node may have just failed it, for a retry
            if job.state == JobState.PENDING:
                self.pending(job)
            elif job.state == JobState.SCHEDULED:
                if job.not_before is None or job.not_before <= self.view.now:
                    self.start(self.set(name, state=JobState.PENDING, not_before=None))
                else:
                    self.wake(job.not_before)

    def watch(self, job: JobRun) -> None:
        spec = self.run.spec.jobs[job.job]
        if spec.deploy is not None:
            progress = self.view.deploys.get(job.name)
            if progress is not None and progress.done:
                if progress.failed:
                    self.fail(job.name, "failure", progress.message)
                else:
                    done = self.set(
                        job.name,
                        state=JobState.SUCCEEDED,
                        finished_at=self.view.now,
                        message=progress.message,
                    )
                    self.close_attempt(done)
                    self.job_event(done, "succeeded")
                return
            since = job.started_at or job.dispatched_at or self.view.now
            deadline = since + timedelta(seconds=spec.timeout)
            if deadline <= self.view.now:
                self.fail(job.name, "timeout", f"the rollout took longer than {spec.timeout:g}s")
            else:
                self.wake(deadline)
            return
        alive = self.view.alive if self.view.alive is not None else set(self.view.nodes)
        if job.node not in alive:
            self.fail(job.name, "node_lost", f"node {job.node} stopped heartbeating")

    def pending(self, job: JobRun) -> None:
        needs = [self.jobs[n] for n in job.needs]
        if any(n.state not in FINISHED for n in needs):
            return
        bad = [n for n in needs if _bad(n)]
        when = self.run.spec.jobs[job.job].when
        if when == "on_failure" and not bad:
            self.skip(job, "no need failed", upstream_failed=False)
            return
        if when in ("on_success", "manual") and bad:
            self.skip(job, f"{bad[0].name} {bad[0].state}", upstream_failed=True)
            return
        if when == "manual" and not job.approved_by:
            spec = self.run.spec.jobs[job.job]
            job = self.set(job.name, state=JobState.MANUAL, message="waiting for approval")
            self.plan.events.append(
                (
                    "run",
                    "approval_needed",
                    RunEvent(
                        pipeline=self.run.pipeline,
                        run=self.run.id,
                        state=self.run.state,
                        job=job.name,
                        approvers=spec.approvers,
                    ),
                )
            )
            return
        self.start(job)

    def skip(self, job: JobRun, why: str, *, upstream_failed: bool) -> None:
        job = self.set(
            job.name, state=JobState.SKIPPED, message=why, upstream_failed=upstream_failed
        )
        self.job_event(job, "skipped")

    def start(self, job: JobRun) -> None:
        spec = self.run.spec.jobs[job.job]
        group = spec.resource_group
        me = holder(self.run, job.name)
        if group is not None and self.view.locks.get(group) != me:
            other = self.view.locks.get(group)
            if other is None:
                self.plan.want_locks.setdefault(group, me)
            message = f"waiting for resource_group {group}"
            if other:
                message += f" (held by {other})"
            if job.message != message:
                self.set(job.name, message=message)
            return
        attempt = job.attempt + 1
        update: dict[str, object] = {
            "attempt": attempt,
            "tries": job.tries + 1,
            "dispatched_at": self.view.now,
            "started_at": None,
            "finished_at": None,
            "exit_code": None,
            "reason": "",
            "holds": group or "",
            "artifacts": "",
            "deploy_command": "",
            "deploy_generation": 0,
            "deploy_revision": 0,
        }
        if spec.deploy is not None:
            job = self.set(
                job.name, state=JobState.DISPATCHED, node="", message="deploying", **update
            )
            self.plan.deploy.append(job.name)
            self.job_event(job, "dispatched")
            return
        node = self.pick_node(spec.driver)
        if node is None:
            message = f"no live node offers the {spec.driver} driver"
            if job.message != message:
                self.set(job.name, message=message)
            return
        job = self.set(job.name, state=JobState.DISPATCHED, node=node, message="", **update)
        self.load[node] = self.load.get(node, 0) + 1
        self.plan.dispatch.append(Dispatch(job.name, node, attempt))
        self.job_event(job, "dispatched")

    def pick_node(self, driver: str) -> str | None:
        fits = [n for n, drivers in self.view.nodes.items() if driver in drivers]
        if not fits:
            return None
        return min(fits, key=lambda n: (self.load.get(n, 0), n))

    # the end --------------------------------------------------------------------------------
    def finish(self) -> None:
        if self.run.finished or any(j.state not in FINISHED for j in self.jobs.values()):
            return
        failed = [j for j in self.jobs.values() if j.state in (JobState.FAILED, JobState.CANCELLED)]
        state = RunState.FAILED if failed else RunState.SUCCEEDED
        self.run = self.run.model_copy(update={"state": state, "finished_at": self.view.now})
        self.dirty = True
        self.plan.events.append(
            (
                "run",
                state.value,
                RunEvent(
                    pipeline=self.run.pipeline,
                    run=self.run.id,
                    state=state.value,
                    requested_by=self.run.requested_by,
                    jobs=[
                        FailedJob(job=j.name, reason=j.reason, message=j.message) for j in failed
                    ],
                    round=self.run.rounds,
                ),
            )
        )

    def stale_locks(self) -> None:
        """Free a lock this run holds for a job that no longer runs (a crash between the
        lock and the record, say)."""
        for group, owner in self.view.locks.items():
            run_id, _, name = owner.rpartition(".")
            if run_id != self.run.id:
                continue
            job = self.jobs.get(name)
            if job is None or job.state not in ACTIVE:
                self.plan.release.add(group)


def _bad(job: JobRun) -> bool:
    return job.state in (JobState.FAILED, JobState.CANCELLED) or (
        job.state == JobState.SKIPPED and job.upstream_failed
    )


def decide(run: RunRecord, view: View, reports: list[JobReport] | None = None) -> Plan:
    """The next state of `run`. A finished run only takes late reports into its history."""
    step = _Step(run, view)
    if not run.finished:
        for report in reports or []:
            step.report(report)
        step.walk()
    step.stale_locks()
    step.run = step.run.model_copy(update={"jobs": step.jobs})
    step.finish()
    if step.dirty:
        step.run = step.run.model_copy(update={"updated_at": view.now})
    step.plan.run = step.run
    return step.plan


def cancelled_work(before: RunRecord, after: RunRecord) -> Plan:
    """What a cancel leaves to do: stop the jobs that were running, free their locks."""
    plan = Plan(after)
    for name, job in before.jobs.items():
        if job.state in ACTIVE and job.node:
            plan.revoke.append(Revoke(name, job.node, job.attempt))
        if job.holds:
            plan.release.add(job.holds)
    plan.events.append(
        (
            "run",
            "cancelled",
            RunEvent(
                pipeline=after.pipeline,
                run=after.id,
                state=after.state.value,
                requested_by=after.requested_by,
                round=after.rounds,
            ),
        )
    )
    return plan
