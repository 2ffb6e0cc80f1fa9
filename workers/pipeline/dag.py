"""Pure: a spec becomes a run's jobs (matrix expanded, stages turned into needs), and a run's
commands (approve, cancel, retry) become a new run record. No I/O."""

from __future__ import annotations

from datetime import datetime

from corral.schemas.errors import InvalidInput, NotFound, RejectedError
from corral.schemas.pipeline import PipelineSpec, instance_name, job_graph
from corral.schemas.runs import FINISHED, JobRun, JobState, RunRecord, RunState


def expand(spec: PipelineSpec) -> dict[str, JobRun]:
    """Every job instance in a topological order, with its needs as instance names."""
    graph = job_graph(spec)
    instances: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for name in graph:
        job = spec.jobs[name]
        combos = job.parallel.combinations() if job.parallel else [{}]
        instances[name] = [
            (instance_name(name, i, len(combos)), combo) for i, combo in enumerate(combos)
        ]
    taken: dict[str, str] = {}
    for name, group in instances.items():
        for instance, _ in group:
            if instance in taken and taken[instance] != name:
                raise InvalidInput(
                    f"matrix job {name!r} expands to {instance!r}, which is another job's name"
                )
            taken[instance] = name
    out: dict[str, JobRun] = {}
    for name, needs in graph.items():
        expanded = [inst for need in needs for inst, _ in instances[need]]
        for instance, combo in instances[name]:
            out[instance] = JobRun(name=instance, job=name, matrix=combo, needs=expanded)
    return out


def new_run(
    run_id: str,
    spec: PipelineSpec,
    variables: dict[str, str],
    now: datetime,
    *,
    requested_by: str = "",
    command_id: str = "",
    trigger: str = "command",
) -> RunRecord:
    return RunRecord(
        id=run_id,
        pipeline=spec.name,
        spec=spec,
        variables={**spec.variables, **variables},
        requested_by=requested_by,
        command_id=command_id,
        trigger=trigger,
        created_at=now,
        updated_at=now,
        jobs=expand(spec),
    )


def approve(run: RunRecord, job: str, user: str, roles: list[str], now: datetime) -> RunRecord:
    """Let a manual job go, if `user` (or one of `roles`) is among its approvers."""
    current = run.jobs.get(job)
    if current is None:
        raise NotFound(f"run {run.id} has no job {job!r}")
    approvers = run.spec.jobs[current.job].approvers
    if approvers and user not in approvers and not set(roles) & set(approvers):
        raise RejectedError(f"{user} may not approve {job}: approvers are {', '.join(approvers)}")
    if current.state != JobState.MANUAL:
        what = "has already been approved" if current.approved_by else f"is {current.state}"
        raise RejectedError(f"job {job} of run {run.id} is not waiting for approval: it {what}")
    jobs = dict(run.jobs)
    jobs[job] = current.model_copy(
        update={
            "state": JobState.PENDING,
            "approved_by": user,
            "approved_at": now,
            "message": f"approved by {user}",
        }
    )
    return run.model_copy(update={"jobs": jobs, "updated_at": now})


def cancel(run: RunRecord, now: datetime, who: str = "") -> RunRecord:
    """Every job not finished is cancelled (the worker stops the running ones)."""
    if run.finished:
        raise RejectedError(f"run {run.id} has already {run.state}")
    note = f"cancelled by {who}" if who else "cancelled"
    jobs = {
        name: job
        if job.state in FINISHED
        else job.model_copy(
            update={
                "state": JobState.CANCELLED,
                "reason": "cancelled",
                "message": note,
                "finished_at": now if job.started_at else None,
                "holds": "",
            }
        )
        for name, job in run.jobs.items()
    }
    return run.model_copy(
        update={
            "jobs": jobs,
            "state": RunState.CANCELLED,
            "finished_at": now,
            "updated_at": now,
        }
    )


def retry(run: RunRecord, now: datetime) -> RunRecord:
    """Run again the jobs that failed, were cancelled or never ran; succeeded jobs (and their
    artifacts) stay as they are."""
    if not run.finished:
        raise RejectedError(f"run {run.id} is still running; cancel it first or let it finish")
    if run.state == RunState.SUCCEEDED:
        raise RejectedError(f"run {run.id} succeeded: there is nothing to retry")
    jobs = {}
    for name, job in run.jobs.items():
        if job.state == JobState.SUCCEEDED:
            jobs[name] = job
            continue
        jobs[name] = JobRun(
            name=job.name,
            job=job.job,
            matrix=job.matrix,
            needs=job.needs,
            attempt=job.attempt,
            history=job.history,
        )
    return run.model_copy(
        update={
            "jobs": jobs,
            "state": RunState.RUNNING,
            "finished_at": None,
            "updated_at": now,
            "rounds": run.rounds + 1,
        }
    )
