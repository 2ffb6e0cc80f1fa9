"""Records kept in NATS KV. Each has one owner, who alone writes it, always with
compare-and-set on the key's revision."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from corral.schemas.spec import Resources, ServiceSpec


class Record(BaseModel):
    model_config = ConfigDict(frozen=True)


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


class Template(Record):
    """What a replica runs: the runtime part of the spec at one generation."""

    command: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    ports: list[str] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    stop_grace_period: float = 10.0

    @classmethod
    def from_spec(cls, spec: ServiceSpec) -> Template:
        return cls.model_validate(spec.runtime_fields())


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


class ReplicaState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


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


class ServiceStatus(Record):
    """The deployer's observed view of a service. Owner: the deployer. Key: the service name."""

    name: str
    observed_generation: int
    desired: int
    assigned: int
    pending: int = 0
    reason: str = ""
    updated_at: datetime
