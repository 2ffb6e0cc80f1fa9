"""Pure: what an agent is handed to run one job attempt (argv, environment, artifacts to
fetch and to keep), and how far a deploy job's rollout has got. No I/O."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from corral.schemas.runs import ACTIVE, JobAssignment, JobRun, JobState, RunRecord
from corral.schemas.spec import ServiceSpec, expand
from corral.schemas.state import (
    NodeStatus,
    RolloutState,
    ServiceRecord,
    ServiceStatus,
    is_alive,
)
from corral.workers.pipeline.planning import DeployProgress, View

STOP_GRACE = 10.0


def artifact_object(run: str, job: str) -> str:
    return f"artifacts/{run}/{job}.tar.gz"


def environment(run: RunRecord, job: JobRun) -> dict[str, str]:
    """Run variables, then the matrix values, then the job's env (which may refer to both
    as ${NAME}), then Corral's own."""
    spec = run.spec.jobs[job.job]
    variables = {**run.variables, **job.matrix}
    env = dict(variables)
    env.update({key: expand(value, variables) for key, value in spec.env.items()})
    env.update(
        {
            "CORRAL_PIPELINE": run.pipeline,
            "CORRAL_RUN": run.id,
            "CORRAL_JOB": job.name,
            "CORRAL_ATTEMPT": str(job.attempt),
        }
    )
    return env


def argv(run: RunRecord, job: JobRun, env: dict[str, str]) -> list[str]:
    spec = run.spec.jobs[job.job]
    if spec.script is not None:
        return ["sh", "-e", "-c", "\n".join(spec.script)]
    assert spec.command is not None
    return [expand(arg, env) for arg in spec.command]


def assignment_for(run: RunRecord, name: str, now: datetime) -> JobAssignment:
    job = run.jobs[name]
    spec = run.spec.jobs[job.job]
    env = environment(run, job)
    fetch = {
        need: run.jobs[need].artifacts
        for need in job.needs
        if run.jobs[need].state == JobState.SUCCEEDED and run.jobs[need].artifacts
    }
    return JobAssignment(
        run=run.id,
        pipeline=run.pipeline,
        job=name,
        attempt=job.attempt,
        node=job.node,
        argv=argv(run, job, env),
        image=spec.image,
        env=env,
        timeout=spec.timeout,
        grace=STOP_GRACE,
        artifacts=list(spec.artifacts.paths) if spec.artifacts else [],
        fetch=fetch,
        assigned_at=now,
    )


def assignment_key(node: str, run: str, job: str, attempt: int) -> str:
    return f"{node}.{run}.{job}.{attempt}"


def deploy_progress(
    record: ServiceRecord | None,
    status: ServiceStatus | None,
    generation: int,
    revision: int,
) -> DeployProgress:
    """Whether the deploy that produced `generation` (at `revision`) has rolled out healthy,
    failed, or is still under way."""
    if record is None or record.deleted:
        return DeployProgress(done=True, failed=True, message="the service was deleted")
    if record.rollback_of == revision and record.revision != revision:
        return DeployProgress(
            done=True,
            failed=True,
            message=f"the rollout of revision {revision} failed and was rolled back to "
            f"revision {record.revision}",
        )
    if status is None or status.observed_generation < generation:
        return DeployProgress(done=False, message="waiting for the deployer")
    rollout = status.rollout
    if rollout is not None and rollout.revision == revision:
        if rollout.state == RolloutState.FAILED:
            return DeployProgress(
                done=True, failed=True, message=f"rollout failed: {rollout.reason}"
            )
        if rollout.state != RolloutState.COMPLETE:
            return DeployProgress(done=False, message=f"rollout {rollout.state}")
    if record.revision != revision:
        return DeployProgress(
            done=True,
            failed=True,
            message=f"revision {record.revision} replaced revision {revision} before it finished",
        )
    if status.ready < status.desired or status.pending:
        return DeployProgress(done=False, message=f"{status.ready}/{status.desired} ready")
    return DeployProgress(
        done=True, message=f"revision {revision}: {status.ready}/{status.desired} ready"
    )


def view_of(
    run: RunRecord,
    now: datetime,
    *,
    nodes: Iterable[NodeStatus],
    grace: float,
    others: Iterable[RunRecord],
    locks: dict[str, str],
    services: Callable[[str], ServiceRecord | None],
    statuses: Callable[[str], ServiceStatus | None],
) -> View:
    """What `decide` needs to know besides the run: the live nodes that run jobs (not
    simulated ones), how busy each is with other runs' jobs, who holds the run's resource
    groups, and how far its deploy jobs' rollouts have got."""
    alive = {n.id: n for n in nodes if is_alive(n, now, grace)}
    live = {
        n.id: tuple(n.drivers) for n in alive.values() if n.runtime != "fake" and not n.draining
    }
    load: dict[str, int] = {}
    for other in others:
        if other.id == run.id:
            continue
        for job in other.jobs.values():
            if job.state in ACTIVE and job.node:
                load[job.node] = load.get(job.node, 0) + 1
    groups = {spec.resource_group for spec in run.spec.jobs.values() if spec.resource_group}
    deploys = {}
    for job in run.jobs.values():
        spec = run.spec.jobs[job.job].deploy
        if job.state in ACTIVE and job.deploy_generation and isinstance(spec, ServiceSpec):
            deploys[job.name] = deploy_progress(
                services(spec.name), statuses(spec.name), job.deploy_generation, job.deploy_revision
            )
    return View(
        now=now,
        nodes=live,
        alive=set(alive),
        load=load,
        locks={g: locks[g] for g in groups if g in locks},
        deploys=deploys,
    )
