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
    preempt: bool = Field(
        default=False,
        description="may evict lower-priority replicas when nothing fits; the asker must then "
        "carry out the reply's `evictions` before writing the placements",
    )
    pinned: list[str] = Field(
        default_factory=list,
        description="nodes for the first replicas, one each, in order (a rebalance plan's "
        "targets): each goes there if the node still keeps the rules and has room when it is "
        "booked, and by the usual placement otherwise",
    )

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


class Eviction(BaseModel):
    """A running replica the scheduler chose to evict, so that the asker's replicas fit."""

    model_config = ConfigDict(frozen=True)

    replica: str
    service: str
    node: str
    priority: int = Field(description="the victim service's priority")
    preemptor: str
    preemptor_priority: int

    @property
    def note(self) -> str:
        """What the victim's service is told."""
        return f"preempted by {self.preemptor} (priority {self.preemptor_priority})"


class PlacementReply(BaseModel):
    model_config = ConfigDict(frozen=True)

    placed: list[Placed] = Field(default_factory=list)
    unplaced: list[str] = Field(default_factory=list, description="replica ids that fit nowhere")
    reason: str = Field(default="", description="why the unplaced ones fit nowhere")
    error: str = ""
    evictions: list[Eviction] = Field(
        default_factory=list,
        description="replicas to stop first (preemption); placements on their nodes need them",
    )
