"""Pipeline runs: the commands that start and steer them, the records the pipeline worker
keeps in KV (one per run), the job assignments it hands to agents, and the events both
publish."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from corral.schemas.events import EventData
from corral.schemas.pipeline import PipelineSpec, VariableName


# commands ----------------------------------------------------------------------------------
class RunPipeline(BaseModel):
    """`<prefix>.cmd.pipeline.<name>.run`: run `spec` (stored under its name first), or, when
    it is null, the stored pipeline of that name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: dict[str, Any] | None = None
    variables: dict[VariableName, str] = Field(default_factory=dict)
    requested_by: str | None = Field(default=None, max_length=200)


class ApplyPipeline(BaseModel):
    """`<prefix>.cmd.pipeline.<name>.apply`: store a spec (for cron triggers and later runs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: dict[str, Any]
    requested_by: str | None = Field(default=None, max_length=200)


class ApproveJob(BaseModel):
    """`<prefix>.cmd.run.<run>.approve`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str = Field(min_length=1, max_length=64)
    user: str = Field(min_length=1, max_length=200)
    roles: list[str] = Field(default_factory=list, max_length=100)


class SteerRun(BaseModel):
    """`<prefix>.cmd.run.<run>.cancel` and `.retry`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requested_by: str | None = Field(default=None, max_length=200)


RUN_COMMANDS: dict[str, dict[str, type[BaseModel]]] = {
    "pipeline": {"run": RunPipeline, "apply": ApplyPipeline},
    "run": {"approve": ApproveJob, "cancel": SteerRun, "retry": SteerRun},
}


# records -----------------------------------------------------------------------------------
class JobState(StrEnum):
    PENDING = "pending"
    """waiting for its needs, a node, or its resource group"""
    MANUAL = "manual"
    """waiting for an approval"""
    SCHEDULED = "scheduled"
    """a retry waiting out its backoff"""
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED})
ACTIVE = frozenset({JobState.DISPATCHED, JobState.RUNNING})


class RunState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Attempt(BaseModel):
    model_config = ConfigDict(frozen=True)

    attempt: int
    node: str = ""
    dispatched_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    reason: str = Field(default="", description="failure, timeout, node_lost, cancelled, error")
    message: str = ""
    retry_in: float | None = Field(default=None, description="the backoff before the next try")


class JobRun(BaseModel):
    """One job (one matrix instance) of a run."""

    model_config = ConfigDict(frozen=True)

    name: str
    job: str = Field(description="the job in the spec; differs from name for a matrix instance")
    matrix: dict[str, str] = Field(default_factory=dict)
    needs: list[str] = Field(default_factory=list, description="instances it waits for")
    state: JobState = JobState.PENDING
    attempt: int = Field(default=0, description="attempts dispatched so far, over all retries")
    tries: int = Field(default=0, description="attempts in the current round (retry resets)")
    node: str = ""
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    upstream_failed: bool = Field(default=False, description="skipped because a need failed")
    not_before: datetime | None = None
    dispatched_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    approved_by: str = ""
    approved_at: datetime | None = None
    holds: str = Field(default="", description="the resource group this job holds")
    deploy_command: str = ""
    deploy_generation: int = 0
    deploy_revision: int = 0
    artifacts: str = Field(default="", description="the object holding its artifacts")
    history: list[Attempt] = Field(default_factory=list)


class RunRecord(BaseModel):
    """A run. Owner: the pipeline worker. Key: the run id, in `<prefix>-pipelines`."""

    model_config = ConfigDict(frozen=True)

    id: str
    pipeline: str
    spec: PipelineSpec
    variables: dict[str, str] = Field(default_factory=dict)
    state: RunState = RunState.RUNNING
    requested_by: str = ""
    command_id: str = ""
    trigger: str = Field(default="command", description="command, cron")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    rounds: int = Field(default=1, description="1, plus one per `retry`")
    jobs: dict[str, JobRun]

    @property
    def finished(self) -> bool:
        return self.state != RunState.RUNNING


class StoredPipeline(BaseModel):
    """A pipeline stored by `apply` or `run`. Key: its name, in `<prefix>-pipeline-specs`."""

    model_config = ConfigDict(frozen=True)

    spec: PipelineSpec
    updated_at: datetime
    command_id: str = ""
    last_cron: datetime | None = Field(default=None, description="the last cron time it ran")


class JobAssignment(BaseModel):
    """A job attempt bound to a node. Owner: the pipeline worker. Key:
    `<node>.<run>.<job>.<attempt>` in `<prefix>-jobs`; the node's agent watches its prefix
    and stops the job when the key goes."""

    model_config = ConfigDict(frozen=True)

    run: str
    pipeline: str
    job: str
    attempt: int
    node: str
    argv: list[str]
    image: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout: float
    grace: float = 10.0
    artifacts: list[str] = Field(default_factory=list, description="paths to upload on success")
    fetch: dict[str, str] = Field(
        default_factory=dict, description="need -> object: artifacts to unpack before starting"
    )
    assigned_at: datetime


# events ------------------------------------------------------------------------------------
class JobReport(EventData):
    """What an agent says about a job attempt: `<prefix>.evt.job.<run>.started|finished`."""

    run: str
    job: str
    attempt: int
    node: str
    outcome: str = Field(default="", description="on finished: succeeded or failed")
    reason: str = Field(default="", description="failure, timeout, cancelled, error, node_lost")
    exit_code: int | None = None
    message: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    artifacts: str = ""


class JobEvent(EventData):
    """The pipeline worker's account of a job: `<prefix>.evt.job.<run>.<what>` with what in
    dispatched, retry_scheduled, skipped, approved, succeeded, failed, cancelled, waiting."""

    pipeline: str
    run: str
    job: str
    attempt: int = 0
    node: str = ""
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    retry_in: float | None = None
    at: datetime | None = None
    approved_by: str = ""


class FailedJob(BaseModel):
    model_config = ConfigDict(frozen=True)

    job: str
    reason: str
    message: str = ""


class RunEvent(EventData):
    """`<prefix>.evt.run.<run>.<what>`: started, succeeded, failed, cancelled,
    approval_needed."""

    pipeline: str
    run: str
    state: str = ""
    requested_by: str = ""
    job: str = ""
    approvers: list[str] = Field(default_factory=list)
    jobs: list[FailedJob] = Field(default_factory=list)
    round: int = 1
