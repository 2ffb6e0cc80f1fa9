"""The deployer asks the scheduler for placements with these messages (request/reply on
`<prefix>.sched.place`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from corral.schemas.spec import Placement


class PlacementRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    service: str
    replicas: list[str] = Field(description="ids of the replicas to place")
    resources: dict[str, float] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="kept for older deployers; merged into `placement`"
    )
    placement: Placement = Field(default_factory=Placement)
    driver: str = "process"

    def rules(self) -> Placement:
        """The placement rules, with a bare `node_selector` from an older deployer folded in."""
        if not self.node_selector:
            return self.placement
        merged = {**self.node_selector, **self.placement.node_selector}
        return self.placement.model_copy(update={"node_selector": merged})


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
