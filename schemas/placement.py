"""The deployer asks the scheduler for placements with these messages (request/reply on
`<prefix>.sched.place`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PlacementRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    service: str
    replicas: list[str] = Field(description="ids of the replicas to place")
    resources: dict[str, float] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    driver: str = "process"


class Placed(BaseModel):
    model_config = ConfigDict(frozen=True)

    replica: str
    node: str
    reason: str


class PlacementReply(BaseModel):
    model_config = ConfigDict(frozen=True)

    placed: list[Placed] = Field(default_factory=list)
    unplaced: list[str] = Field(default_factory=list, description="replica ids that fit nowhere")
    reason: str = Field(default="", description="why the unplaced ones fit nowhere")
    error: str = ""
