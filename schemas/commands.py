"""Commands: what callers ask for. Each travels on `<prefix>.cmd.<resource>.<name>.<verb>`
with the CloudEvents type `io.corral.<resource>.<verb>`."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from corral.schemas.envelope import TYPE_PREFIX as TYPE_PREFIX
from corral.schemas.rules import Rule, RuleDelete
from corral.schemas.runs import RUN_COMMANDS
from corral.schemas.spec import MAX_REPLICAS, ServiceSpec

MAX_PREFER_REMOVE = 256
"""how many replica ids a scale command may name as the first to go"""


class ScaleCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    replicas: int = Field(ge=0, le=MAX_REPLICAS)
    prefer_remove: list[str] = Field(
        default_factory=list,
        max_length=MAX_PREFER_REMOVE,
        description="on scale-in, remove these replicas first, in this order (least busy "
        "first); the rest follow the usual order",
    )
    place_on: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list,
        max_length=MAX_PREFER_REMOVE,
        description="on scale-out, put the new replicas on these nodes, one each, in order (a "
        "rebalance plan's targets); a node that no longer fits when the scheduler books it "
        "falls back to the usual placement, and the replica's reason says so",
    )

    @model_validator(mode="after")
    def _pins_fit(self) -> ScaleCommand:
        if len(self.place_on) > self.replicas:
            raise ValueError(
                f"place_on names {len(self.place_on)} nodes for {self.replicas} replicas"
            )
        return self


class DeleteCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RollbackCommand(BaseModel):
    """Run an earlier revision's spec again, as a new revision; the live replica count stays."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    to_revision: int | None = Field(
        default=None, ge=1, description="the revision to go back to; by default the one before"
    )
    expected_revision: int | None = Field(
        default=None,
        ge=1,
        description="act only if the service is still at this revision, so that a stale "
        "rollback never undoes a newer deploy",
    )
    reason: str = Field(default="", max_length=500)


class PromoteCommand(BaseModel):
    """Let a waiting canary of the current revision roll out to every replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# resource -> verb -> the model its data must validate against: every command on the bus,
# whichever worker applies it (OWNERS), so that the gateway validates each one and
# `corral schema export` covers them all
COMMANDS: dict[str, dict[str, type[BaseModel]]] = {
    "service": {
        "deploy": ServiceSpec,
        "scale": ScaleCommand,
        "delete": DeleteCommand,
        "rollback": RollbackCommand,
        "promote": PromoteCommand,
    },
    **RUN_COMMANDS,
    "rule": {"apply": Rule, "delete": RuleDelete},
}


OWNERS: dict[str, str] = {
    "service": "api",
    "pipeline": "pipeline",
    "run": "pipeline",
    "rule": "rules",
}
"""resource -> the worker that applies its commands. The api worker answers every command
subject, rejecting unknown resources, and leaves the resources that another worker owns
to that worker (which validates, applies and emits `…accepted` or `…rejected` itself)."""


def command_type(resource: str, verb: str) -> str:
    return f"{TYPE_PREFIX}{resource}.{verb}"
