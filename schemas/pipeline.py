"""The pipeline spec: jobs ordered by stages or by `needs`, each a command, a script or a
deploy, with retries, timeouts, approvals, artifacts, a matrix and a resource group.

The job graph is checked here, so that a cycle or a missing need is a validation error with
the job's path, wherever the spec comes from (a file, a command, the gateway)."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from cronsim import CronSim, CronSimError
from pydantic import Field, field_validator, model_validator

from corral.schemas.spec import IMAGE_REFERENCE, Duration, ServiceName, ServiceSpec, StrictModel

JOB_NAME = r"^[a-z0-9]([a-z0-9_-]{0,46}[a-z0-9])?$"
JobName = Annotated[
    str,
    Field(
        pattern=JOB_NAME,
        description="lowercase letters, digits, '-' and '_', 1-48 characters (it is a subject "
        "token and a KV key part)",
    ),
]
VariableName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
GroupName = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9_-]{0,62}[a-z0-9])?$")]
RETRY_REASONS = ("failure", "timeout", "node_lost")
WHEN = Literal["on_success", "always", "on_failure", "manual"]
MAX_JOBS = 1000
MAX_MATRIX = 200


class Backoff(StrictModel):
    """The n-th retry waits `initial * factor^(n-1)`, at most `max`."""

    initial: Duration = Field(default=1.0, ge=0, le=3600)
    factor: float = Field(default=2.0, ge=1, le=10)
    max: Duration = Field(default=60.0, ge=0, le=86400)

    def delay(self, retry: int) -> float:
        """Seconds before retry number `retry` (1 for the first)."""
        return float(min(self.max, self.initial * self.factor ** max(0, retry - 1)))


class Retry(StrictModel):
    max: int = Field(default=0, ge=0, le=20, description="retries after the first attempt")
    when: list[str | int] = Field(
        default_factory=lambda: list[str | int](RETRY_REASONS),
        min_length=1,
        description="failure (any non-zero exit), timeout, node_lost, or exit codes",
    )
    backoff: Backoff = Field(default_factory=Backoff)

    @field_validator("when")
    @classmethod
    def _reasons(cls, values: list[str | int]) -> list[str | int]:
        for value in values:
            if isinstance(value, bool):
                raise ValueError("a retry condition is a reason or an exit code, not a boolean")
            if isinstance(value, int):
                if not 1 <= value <= 255:
                    raise ValueError(f"exit code {value} is not between 1 and 255")
            elif value not in RETRY_REASONS:
                raise ValueError(
                    f"unknown retry condition {value!r}; use {', '.join(RETRY_REASONS)} or an "
                    "exit code"
                )
        return values

    def matches(self, reason: str, exit_code: int | None) -> bool:
        """Whether a failure with this reason (failure, timeout, node_lost) is retried."""
        if reason in self.when:
            return True
        return reason == "failure" and exit_code is not None and exit_code in self.when


class Artifacts(StrictModel):
    paths: list[str] = Field(
        min_length=1,
        max_length=100,
        description="files, directories or globs, relative to the job's workspace",
    )

    @field_validator("paths")
    @classmethod
    def _relative(cls, paths: list[str]) -> list[str]:
        for path in paths:
            parts = path.replace("\\", "/").split("/")
            if not path or path.startswith("/") or ".." in parts:
                raise ValueError(f"artifact path {path!r} must be relative, without '..'")
        return paths


MatrixEntry = dict[VariableName, str | list[str]]


class Parallel(StrictModel):
    """GitLab's `parallel: {matrix: [...]}`: each entry maps variables to a value or a list of
    values, and gives one job per combination."""

    matrix: list[MatrixEntry] = Field(min_length=1, max_length=50)

    def combinations(self) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for entry in self.matrix:
            keys = list(entry)
            values = [v if isinstance(v, list) else [v] for v in entry.values()]
            for combo in itertools.product(*values):
                out.append(dict(zip(keys, (str(v) for v in combo), strict=True)))
        return out

    @model_validator(mode="after")
    def _size(self) -> Parallel:
        for entry in self.matrix:
            if not entry or any(isinstance(v, list) and not v for v in entry.values()):
                raise ValueError("a matrix entry needs at least one variable with a value")
        if len(self.combinations()) > MAX_MATRIX:
            raise ValueError(f"a matrix expands to at most {MAX_MATRIX} jobs")
        return self


class JobSpec(StrictModel):
    stage: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    needs: list[JobName] | None = Field(
        default=None,
        description="jobs this one waits for; unset: every job of the earlier stages; []: none",
    )
    command: list[str] | None = Field(default=None, min_length=1, description="argv")
    script: list[str] | None = Field(
        default=None,
        min_length=1,
        description="shell lines run by `sh -e`, stopping at the first that fails",
    )
    image: str | None = Field(default=None, pattern=IMAGE_REFERENCE)
    env: dict[VariableName, str] = Field(default_factory=dict)
    timeout: Duration = Field(default=3600.0, gt=0, le=7 * 86400)
    retry: Retry = Field(default_factory=Retry)
    when: WHEN = "on_success"
    approvers: list[str] = Field(
        default_factory=list, description="users or roles who may approve a manual job"
    )
    artifacts: Artifacts | None = None
    parallel: Parallel | None = None
    resource_group: GroupName | None = Field(
        default=None, description="one job at a time per group, across every run"
    )
    deploy: ServiceSpec | str | None = Field(
        default=None,
        description="a service spec, or a file the CLI reads (relative to the pipeline file)",
    )

    @model_validator(mode="after")
    def _one_action(self) -> JobSpec:
        given = [n for n in ("command", "script", "deploy") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("a job has exactly one of command, script or deploy")
        if self.deploy is not None and self.image is not None:
            raise ValueError("a deploy job runs no image: the service spec names its own")
        if self.approvers and self.when != "manual":
            raise ValueError("approvers only apply to a job with when: manual")
        return self

    @property
    def driver(self) -> str:
        return "docker" if self.image else "process"


class Triggers(StrictModel):
    cron: str | None = Field(
        default=None, description="a 5-field cron expression, in UTC: `*/5 * * * *`"
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                next_cron(value, datetime(2000, 1, 1, tzinfo=UTC))
            except (CronSimError, ValueError) as exc:
                raise ValueError(f"invalid cron expression {value!r}: {exc}") from None
        return value


def next_cron(expression: str, after: datetime) -> datetime:
    """The first time the expression fires strictly after `after` (UTC)."""
    start = after.astimezone(UTC).replace(tzinfo=None, microsecond=0)
    fired: datetime = next(CronSim(expression, start))
    return fired.replace(tzinfo=UTC)


class PipelineSpec(StrictModel):
    name: ServiceName
    stages: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]] | None = Field(
        default=None, description="stage order; unset: the order stages first appear in"
    )
    variables: dict[VariableName, str] = Field(default_factory=dict)
    triggers: Triggers = Field(default_factory=Triggers)
    jobs: dict[JobName, JobSpec] = Field(min_length=1, max_length=MAX_JOBS)

    @model_validator(mode="after")
    def _graph(self) -> PipelineSpec:
        job_graph(self)  # raises ValueError naming the cycle or the missing need
        return self

    def stage_order(self) -> list[str]:
        order = list(self.stages or [])
        for job in self.jobs.values():
            stage = job.stage or "default"
            if stage not in order:
                order.append(stage)
        return order


def job_graph(spec: PipelineSpec) -> dict[str, list[str]]:
    """Each job's effective needs (job names, before matrix expansion), in a topological
    order. Without `needs`, a job waits for every job of the stages before its own."""
    order = spec.stage_order()
    if spec.stages is not None:
        unknown = sorted({j.stage for j in spec.jobs.values() if j.stage} - set(spec.stages))
        if unknown:
            raise ValueError(f"stage(s) {', '.join(unknown)} not in stages {spec.stages}")
    rank = {stage: i for i, stage in enumerate(order)}
    needs: dict[str, list[str]] = {}
    for name, job in spec.jobs.items():
        if job.needs is not None:
            missing = [n for n in job.needs if n not in spec.jobs]
            if missing:
                raise ValueError(
                    f"job {name!r} needs {', '.join(repr(m) for m in missing)}, which the "
                    "pipeline does not define"
                )
            if name in job.needs:
                raise ValueError(f"job {name!r} needs itself")
            needs[name] = list(dict.fromkeys(job.needs))
        else:
            mine = rank[job.stage or "default"]
            needs[name] = [
                other for other, o in spec.jobs.items() if rank[o.stage or "default"] < mine
            ]
    return _topological(needs)


def _topological(needs: dict[str, list[str]]) -> dict[str, list[str]]:
    done: dict[str, list[str]] = {}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = [*path[path.index(name) :], name]
            raise ValueError(f"the jobs' needs form a cycle: {' -> '.join(cycle)}")
        state[name] = 1
        for need in needs[name]:
            visit(need, [*path, name])
        state[name] = 2
        done[name] = needs[name]

    for name in needs:
        visit(name, [])
    return done


def instance_name(job: str, index: int, total: int) -> str:
    """A matrix job's instances are `<job>-1`, `<job>-2`, ...; a plain job keeps its name."""
    return job if total <= 1 and index == 0 else f"{job}-{index + 1}"


_SAFE = re.compile(r"[^a-z0-9-]")
RUN_ID = r"^[a-z0-9][a-z0-9-]{0,79}$"
"""what `run_id_for` makes (a pipeline's name is a DNS label, so a run id starts with one)"""


def run_id_for(pipeline: str, suffix: str) -> str:
    """Run ids are subject tokens and KV keys: [a-z0-9-]."""
    return _SAFE.sub("-", f"{pipeline}-{suffix}".lower())[:80]


def load_spec(data: Any) -> PipelineSpec:
    return PipelineSpec.model_validate(data)
