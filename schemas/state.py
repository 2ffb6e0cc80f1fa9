"""Records kept in NATS KV. Each has one owner, who alone writes it, always with
compare-and-set on the key's revision."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from corral.schemas.events import AutoscaleDecision, ColdStartEvent
from corral.schemas.spec import Health, Resources, Restart, ServiceSpec


class Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class Revision(Record):
    """One version of a service's runtime template, kept so that it can be rolled back to."""

    revision: int = Field(ge=1)
    spec: ServiceSpec
    created_at: datetime
    command_id: str
    cause: str = Field(default="deploy", description="deploy, or 'rollback to N'")


MAX_REVISIONS = 10
"""how many revisions a service record keeps for history and rollback"""


class ServiceRecord(Record):
    """Desired state of one service. Owner: the api worker. Key: the service name."""

    spec: ServiceSpec
    generation: int = Field(ge=1)
    command_id: str = Field(description="the command that produced this generation")
    updated_at: datetime
    deleted: bool = Field(
        default=False, description="a tombstone: the service is being, or has been, removed"
    )
    recent_commands: list[str] = Field(
        default_factory=list,
        description="ids of the last commands that changed this record, oldest first, so that "
        "a re-sent or redelivered command acts once",
    )
    revision: int = Field(
        default=1, ge=1, description="bumped when the runtime template changes, not on scale"
    )
    revisions: list[Revision] = Field(
        default_factory=list, description=f"the last {MAX_REVISIONS} revisions, oldest first"
    )
    promoted_revision: int = Field(
        default=0, description="a canary of this revision was promoted: roll it out fully"
    )
    rollback_of: int = Field(
        default=0, description="this revision undoes that one; it is never rolled back itself"
    )
    prefer_remove: list[str] = Field(
        default_factory=list,
        description="replicas the last scale command named to go first on scale-in (least busy "
        "first)",
    )
    place_on: list[str] = Field(
        default_factory=list,
        description="nodes this generation's scale-out asked its new replicas to go to (a "
        "rebalance plan's targets); every new generation clears them",
    )


class Template(Record):
    """What a replica runs: the runtime part of the spec at one revision."""

    image: str | None = None
    command: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    ports: list[str] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    stop_grace_period: float = 10.0
    health: Health | None = None
    restart: Restart = Field(default_factory=Restart)

    @classmethod
    def from_spec(cls, spec: ServiceSpec) -> Template:
        return cls.model_validate(spec.runtime_fields())

    @property
    def driver(self) -> str:
        return "docker" if self.image is not None else "process"


class Assignment(Record):
    """A replica bound to a node. Owner: deployer and scheduler. Key: `<node>.<replica>`."""

    replica: str
    service: str
    node: str
    generation: int
    template: Template
    correlation: str = ""
    reason: str = Field(default="", description="why the scheduler chose this node")
    assigned_at: datetime
    draining: bool = Field(
        default=False,
        description="the replica is to stop; the key goes once its agent has stopped it",
    )
    waits_for: list[str] = Field(
        default_factory=list,
        description="replicas on the same node (preempted for this one) whose assignments "
        "must be gone before it starts",
    )


class _FootprintTemplate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    resources: Resources = Field(default_factory=Resources)


class AssignmentFootprint(BaseModel):
    """What an assignment takes on its node, read from an `Assignment` record: a reader that
    counts room (the scheduler) needs no more, and validating the whole template of every
    assignment cost it a third of its time at 100,000 replicas."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    service: str
    node: str
    template: _FootprintTemplate
    draining: bool = False


class ReplicaState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    PENDING = "pending"


LIVE_STATES = frozenset({ReplicaState.RUNNING, ReplicaState.HEALTHY, ReplicaState.UNHEALTHY})


class ReplicaStatus(Record):
    """What a replica is doing. Owner: the agent of its node. Key: `<service>.<replica>`."""

    replica: str
    service: str
    node: str
    generation: int
    state: ReplicaState
    pid: int | None = None
    ports: dict[str, int] = Field(default_factory=dict)
    exit_code: int | None = None
    restarts: int = 0
    message: str = ""
    started_at: datetime | None = None
    updated_at: datetime
    ready: bool = Field(
        default=False,
        description="running and, where the spec has a health probe, passing it",
    )
    ready_at: datetime | None = Field(default=None, description="since when it has been ready")


class Booking(Record):
    """What one replica takes from a node, as the scheduler booked it."""

    service: str
    resources: dict[str, float] = Field(default_factory=dict)
    at: datetime


class NodeLedger(Record):
    """The scheduler's bookings on one node. Owner: the schedulers, each writing with
    compare-and-set, so two plans never book the same room. Key: the node id."""

    node: str
    bookings: dict[str, Booking] = Field(default_factory=dict, description="by replica id")


class NodeStatus(Record):
    """A node's heartbeat. Owner: its agent. Key: the node id."""

    id: str
    labels: dict[str, str] = Field(default_factory=dict)
    capacity: Resources = Field(default_factory=Resources)
    drivers: list[str] = Field(default_factory=list, description="kinds of spec it can run")
    runtime: str = Field(default="", description="the agent's driver: process or fake")
    heartbeat_at: datetime
    started_at: datetime
    draining: bool = False


def is_alive(node: NodeStatus, now: datetime, grace: float) -> bool:
    """A node is alive while its last heartbeat is at most `grace` seconds old."""
    return (now - node.heartbeat_at).total_seconds() <= grace


def next_expiry(nodes: Iterable[NodeStatus], now: datetime, grace: float) -> float:
    """Seconds until the first live node's heartbeat would become too old (at most 1 s), so
    that a watcher can sleep exactly until a node may go silent."""
    left = [grace - (now - n.heartbeat_at).total_seconds() for n in nodes]
    return min([t for t in left if t >= 0] + [1.0])


class RolloutState(StrEnum):
    PROGRESSING = "progressing"
    PAUSED = "paused"
    """a canary runs beside the old replicas, waiting for promote or rollback"""
    COMPLETE = "complete"
    FAILED = "failed"


class Rollout(Record):
    revision: int
    from_revision: int = Field(default=0, description="0 for a service's first revision")
    state: RolloutState
    reason: str = ""
    started_at: datetime
    finished_at: datetime | None = None


class ServiceStatus(Record):
    """The deployer's observed view of a service. Owner: the deployer. Key: the service name."""

    name: str
    observed_generation: int
    desired: int
    assigned: int
    pending: int = 0
    reason: str = ""
    updated_at: datetime
    ready: int = Field(default=0, description="replicas of the current revision that are ready")
    revision: int = 1
    rollout: Rollout | None = None


class ServiceHealth(Record):
    """The healer's verdict on a service. Owner: the healer. Key: the service name."""

    name: str
    degraded: bool = False
    reason: str = ""
    since: datetime
    restarts_in_window: int = 0


class AutoscaleStatus(Record):
    """The autoscaler's recent decisions on a service. Owner: the autoscaler that holds the
    lease. Key: the service name."""

    name: str
    updated_at: datetime
    decisions: list[AutoscaleDecision] = Field(
        default_factory=list, description="the latest ones, oldest first"
    )
    cold_start: ColdStartEvent | None = Field(default=None, description="the latest one")
    invalid_samples: int = Field(default=0, description="metric samples it could not read")
