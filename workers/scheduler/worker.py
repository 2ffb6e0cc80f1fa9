"""The scheduler's thin handler: a mirror of nodes and assignments, and a request/reply
subscriber that runs the pure solver. It keeps what it hands out as reservations until the
assignment shows up in its mirror, so back-to-back requests never double-book a node."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import NamedTuple

from faststream.nats import NatsBroker

from corral.bus.store import Mirror, Versioned
from corral.schemas.placement import Placed, PlacementReply, PlacementRequest
from corral.schemas.state import Assignment, NodeStatus, is_alive
from corral.workers.runtime import Context
from corral.workers.scheduler.placement import ClassRequest, NodeView, solve

log = logging.getLogger(__name__)
RESERVATION_TTL = 30.0


def node_ready(node: NodeStatus, grace: float, now: datetime | None = None) -> bool:
    now = now or datetime.now(UTC)
    return not node.draining and is_alive(node, now, grace)


class Usage(NamedTuple):
    """What one replica takes from a node, as the scheduler counts it."""

    service: str
    node: str
    resources: dict[str, float]


class SchedulerWorker:
    name = "scheduler"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        buckets = ctx.bus.buckets
        self.nodes: Mirror[NodeStatus] = Mirror(buckets.nodes)
        self.assignments: Mirror[Assignment] = Mirror(buckets.assignments)
        self.assignments.listen(self._on_assignment)
        self._known: dict[str, Usage] = {}
        self.allocated: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.totals: dict[str, int] = defaultdict(int)
        self.reserved: dict[str, tuple[float, Usage]] = {}

    def register(self, broker: NatsBroker) -> None:
        @broker.subscriber(self.ctx.bus.names.place, queue=f"{self.ctx.bus.names.prefix}-scheduler")
        async def on_place(request: PlacementRequest) -> dict[str, object]:
            try:
                return self.place(request).model_dump()
            except Exception as exc:  # a bad request must never kill the scheduler
                log.exception("placement failed")
                return PlacementReply(error=str(exc)).model_dump()

    async def start(self) -> None:
        await self.nodes.start()
        await self.assignments.start()

    async def stop(self) -> None:
        await self.assignments.stop()
        await self.nodes.stop()

    def _apply(self, usage: Usage, sign: int) -> None:
        alloc = self.allocated[usage.node]
        for resource, amount in usage.resources.items():
            alloc[resource] += sign * amount
        self.counts[(usage.service, usage.node)] += sign
        self.totals[usage.node] += sign

    def _on_assignment(self, key: str, item: Versioned[Assignment] | None) -> None:
        previous = self._known.pop(key, None)
        if previous is not None:
            self._apply(previous, -1)
        reservation = self.reserved.pop(key, None)
        if reservation is not None:
            self._apply(reservation[1], -1)
        if item is not None:
            a = item.value
            usage = Usage(a.service, a.node, a.template.resources.as_dict())
            self._known[key] = usage
            self._apply(usage, +1)

    def _expire_reservations(self) -> None:
        now = time.monotonic()
        for key in [k for k, (t, _) in self.reserved.items() if now - t > RESERVATION_TTL]:
            _, assignment = self.reserved.pop(key)
            self._apply(assignment, -1)

    def place(self, request: PlacementRequest) -> PlacementReply:
        self._expire_reservations()
        grace = self.ctx.settings.node_grace
        now = datetime.now(UTC)
        views = [
            NodeView(
                id=node.id,
                labels=node.labels,
                capacity=node.capacity.as_dict(),
                allocated=dict(self.allocated.get(node.id, {})),
                drivers=tuple(node.drivers),
                ready=node_ready(node, grace, now),
                count=self.counts.get((request.service, node.id), 0),
                total=self.totals.get(node.id, 0),
            )
            for node in sorted(self.nodes.values(), key=lambda n: n.id)
        ]
        solution = solve(
            ClassRequest(
                count=len(request.replicas),
                resources=request.resources,
                node_selector=request.node_selector,
                driver=request.driver,
            ),
            views,
        )
        placed: list[Placed] = []
        replicas = iter(request.replicas)
        for node_id, count in solution.per_node.items():
            for _ in range(count):
                replica = next(replicas)
                placed.append(Placed(replica=replica, node=node_id, reason=solution.why[node_id]))
                # hold the capacity until the deployer's write reaches our mirror
                held = Usage(request.service, node_id, request.resources)
                key = f"{node_id}.{replica}"
                if key not in self._known:
                    self.reserved[key] = (time.monotonic(), held)
                    self._apply(held, +1)
        return PlacementReply(placed=placed, unplaced=list(replicas), reason=solution.reason)
