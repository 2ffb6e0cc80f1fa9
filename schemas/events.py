"""Events: facts, published on `<prefix>.evt.<resource>.<name>.<what>` with the CloudEvents type
`io.corral.<resource>.<what>`."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from corral.schemas.envelope import TYPE_PREFIX


class EventData(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class CommandAccepted(EventData):
    """The api worker validated a command and wrote the desired state."""

    command: str = Field(description="the verb, e.g. scale")
    command_id: str
    name: str
    generation: int = Field(description="the spec generation after the command; 0 once deleted")
    changed: bool = Field(default=True, description="false when the command changed nothing")
    duplicate: bool = Field(default=False, description="the command id was seen before")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(frozen=True)

    loc: str
    msg: str


class CommandRejected(EventData):
    """A command that will never be applied, and why. A copy sits in the DLQ."""

    command: str
    command_id: str
    name: str
    code: str = Field(description="invalid | unknown | not_found | error")
    reason: str
    errors: list[ErrorDetail] = Field(default_factory=list)


class ServiceProgress(EventData):
    """The deployer's view of a service after it acted."""

    name: str
    generation: int
    desired: int
    assigned: int
    pending: int = 0
    reason: str = ""


class RolloutEvent(EventData):
    """A rollout of a new revision started, paused for its canary, completed or failed."""

    name: str
    generation: int
    revision: int
    from_revision: int
    state: str
    reason: str = ""
    desired: int = 0
    rollback_of: int = Field(default=0, description="the revision this one rolls back")


class ReplicaEvent(EventData):
    """Something happened to one replica on its node."""

    replica: str
    service: str
    node: str
    generation: int
    state: str
    pid: int | None = None
    ports: dict[str, int] = Field(default_factory=dict)
    exit_code: int | None = None
    message: str = ""
    at: datetime | None = None


class ReplicaPreempted(EventData):
    """A running replica was evicted so that a higher-priority service fits
    (`<prefix>.evt.replica.<victim service>.preempted`)."""

    replica: str
    service: str
    node: str
    priority: int = Field(description="the victim service's priority")
    preemptor: str = Field(description="the service that needed the room")
    preemptor_priority: int
    message: str = ""
    at: datetime | None = None


def event_type(resource: str, what: str) -> str:
    return f"{TYPE_PREFIX}{resource}.{what}"


class HealthEvent(EventData):
    """The healer's verdict on a service: degraded (a crash loop) or recovered."""

    name: str
    degraded: bool
    reason: str
    restarts_in_window: int = 0


class NodeEvent(EventData):
    """A node went silent past its grace (lost), or heartbeats again (returned)."""

    node: str
    state: str
    reason: str
    heartbeat_at: datetime | None = None


class MetricSample(BaseModel):
    """One gauge reading on `<prefix>.metrics.<service>` (core NATS, plain JSON: one object, or
    an array of them). Replicas publish their own; agents publish `cpu` (cores) and `memory`
    (bytes) for every replica they run."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")
    value: float = Field(allow_inf_nan=False)
    replica: str = Field(min_length=1, max_length=253)


class AutoscaleProposal(BaseModel):
    """What one metric asks for, and how it got there."""

    model_config = ConfigDict(frozen=True)

    metric: str = Field(description="e.g. `metric cpu`, `queue ORDERS/work`, `prometheus <q>`")
    value: float | None = Field(
        default=None, description="the observed value: per-replica average, total, or value"
    )
    target: float
    ratio: float | None = Field(default=None, description="value / target (per replica)")
    replicas: int | None = Field(default=None, description="the proposal; None: no reading")
    formula: str = ""
    note: str = Field(default="", description="tolerance, missing samples, or the read error")
    path: str = Field(
        default="",
        description="what the rules were fed (`behavior.smoothing`): empty, the reading as it "
        "came; `smoothed`, the average plus headroom; `burst`, the reading of a burst; "
        "`partial`, a reading that lacks some replicas' samples, as it came",
    )
    demand: float | None = Field(
        default=None, description="two_speed: this reading's demand, in replicas (unrounded)"
    )
    level: float | None = Field(
        default=None, description="two_speed: the average demand, in replicas"
    )
    noise: float | None = Field(
        default=None, description="two_speed: one noise deviation of the demand, in replicas"
    )


class AutoscaleDecision(EventData):
    """One evaluation of a service's autoscale policy, with its inputs."""

    name: str = ""
    at: datetime | None = None
    trigger: str = Field(default="", description="what woke the evaluation")
    current: int
    desired: int
    action: str = Field(description="scale_up | scale_down | none")
    code: str = Field(
        description="scale_up, scale_down, activated, cooldown, above_max, below_min, "
        "tolerance, stabilized, limited, at_max, at_min, missing_metrics, idle, disabled, "
        "steady"
    )
    reason: str
    recommended: int | None = Field(default=None, description="the largest proposal")
    stabilized: int | None = Field(default=None, description="after the stabilisation window")
    limited_by: str = Field(
        default="",
        description="scale_up_limit, scale_down_limit, too_many_replicas, too_few_replicas",
    )
    proposals: list[AutoscaleProposal] = Field(default_factory=list)
    replicas: int = Field(default=0, description="running replicas it counted")
    ready: int = Field(default=0, description="of which ready")
    prefer_remove: list[str] = Field(default_factory=list)
    command_id: str = ""
    recheck_after: float | None = None


class ColdStartEvent(EventData):
    """A service woke from zero: activation to its first ready replica."""

    name: str
    seconds: float
    trigger: str
    replica: str
    command_id: str = ""
