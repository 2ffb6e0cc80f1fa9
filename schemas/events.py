"""Events: facts, published on `<prefix>.evt.<resource>.<name>.<what>` with the CloudEvents type
`io.corral.<resource>.<what>`."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from corral.schemas.commands import TYPE_PREFIX


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
