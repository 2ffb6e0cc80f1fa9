"""A deployer whose mirror of `corral-nodes` lags behind the bus must not evict replicas from
nodes that are alive: before a node's replicas are replaced, its heartbeat is read from the
bucket itself."""

from __future__ import annotations

from datetime import timedelta

import pytest

from corral.bus.connection import Bus
from corral.bus.settings import Settings
from corral.schemas.envelope import utcnow
from corral.schemas.state import NodeStatus
from corral.workers.deployer.worker import DeployerWorker
from corral.workers.runtime import Context

pytestmark = pytest.mark.timeout(20)


def beat(node: str, age: float) -> NodeStatus:
    now = utcnow()
    return NodeStatus(id=node, heartbeat_at=now - timedelta(seconds=age), started_at=now)


async def test_a_stale_mirror_does_not_make_a_live_node_lost(settings: Settings, bus: Bus) -> None:
    deployer = DeployerWorker(Context(settings=settings, bus=bus))
    grace = settings.node_grace
    nodes = bus.buckets.nodes
    # the bucket: n1 beat just now, n2 has been silent for twice the grace, n3 never beat
    fresh = await nodes.put("n1", beat("n1", 0.0))
    await nodes.put("n2", beat("n2", 2 * grace))
    # the deployer's mirror is behind: it still holds old heartbeats of n1 and n2
    deployer.nodes.note_written("n1", beat("n1", 2 * grace), fresh - 1)
    deployer.nodes.note_written("n2", beat("n2", 3 * grace), 1)

    alive = await deployer._still_alive({"n1", "n2", "n3"})

    assert alive == {"n1"}
    held = deployer.nodes.items["n1"]
    assert held.revision == fresh  # the fresh read replaced the stale copy
    assert (utcnow() - held.value.heartbeat_at).total_seconds() < grace
