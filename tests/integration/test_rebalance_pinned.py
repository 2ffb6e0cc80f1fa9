"""`corral rebalance --apply` lands each new replica on the node the plan printed (pinned
through the scale command, booked by the scheduler after checking it still fits), and a pin
whose node no longer fits falls back to the usual placement and says why."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import Any

import pytest
from support import acli, collect, command, corral_env, eventually

from corral.schemas.placement import PlacementReply, PlacementRequest
from corral.schemas.spec import Resources
from corral.services.runner import Host, make_agent
from corral.workers.runtime import Context, Worker
from corral.workers.scheduler.worker import SchedulerWorker

pytestmark = pytest.mark.timeout(60)


def fake(node_id: str, zone: str, cpu: float = 8.0, **labels: str) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "driver": "fake",
        "capacity": {"cpu": cpu, "memory": "8Gi"},
        "labels": {"zone": zone, **labels},
    }


async def assignments(bus: Any, service: str) -> list[Any]:
    items = await bus.buckets.assignments.items()
    return [v.value for v in items.values() if v.value.service == service]


async def join(host: Host, agents: list[dict[str, Any]]) -> None:
    workers = []
    for spec in agents:
        spec = {**spec, "capacity": Resources.model_validate(spec["capacity"])}
        workers.append(make_agent(host.ctx, **spec))
    await host.add(workers)


async def test_apply_lands_each_new_replica_on_the_planned_node(
    settings, bus, control_plane
) -> None:
    # web prefers ssd nodes: left to itself the scheduler would put the whole surge on b1,
    # while the plan spreads the moves over zone b's least loaded nodes, b0 first
    env = corral_env(settings)
    spec = {
        "replicas": 4,
        "command": ["x"],
        "resources": {"cpu": 1},
        "placement": {"spread_by": "zone", "prefer": [{"label": "disk", "value": "ssd"}]},
    }
    async with control_plane(agents=[fake("a0", "a")]) as host:
        await command(bus, "deploy", "web", spec)

        async def four() -> list[Any]:
            found = await assignments(bus, "web")
            return found if len(found) == 4 else []

        await eventually(four, what="four replicas on a0")
        await join(host, [fake("b0", "b"), fake("b1", "b", disk="ssd")])

        async def planned() -> list[Any]:
            result = await acli(env, "rebalance", "--plan", "--budget", "2", "-o", "json")
            return json.loads(result.stdout)["moves"] if result.returncode == 0 else []

        moves = await eventually(planned, what="two moves to zone b")
        assert [m["to"] for m in moves] == ["b0", "b1"]
        moving = {m["replica"] for m in moves}

        result = await acli(
            env, "rebalance", "--apply", "--budget", "2", "--timeout", "30", "-o", "json"
        )
        assert result.returncode == 0, result
        view = json.loads(result.stdout)
        assert [m["to"] for m in view["moves"]] == ["b0", "b1"]
        applied = view["applied"][0]
        assert set(applied["stopped"]) == {m["replica"] for m in view["moves"]}
        assert Counter(applied["started"].values()) == {"b0": 1, "b1": 1}
        assert applied["missed"] == []
        after = await assignments(bus, "web")
        assert Counter(a.node for a in after) == {"a0": 2, "b0": 1, "b1": 1}
        landed = {a.node: a.reason for a in after if a.node != "a0"}
        assert landed["b0"].startswith("rebalance: on b0 as planned"), landed
        assert not (moving - set(applied["stopped"])) & {a.replica for a in after}

        # the pins belonged to that scale-out: the record no longer carries them
        record = await bus.buckets.services.get("web")
        assert record is not None
        assert record.value.place_on == []
        assert record.value.spec.replicas == 4

        # a later scale-out is placed by the usual rules, not by an old pin
        await command(bus, "scale", "web", {"replicas": 5})

        async def five() -> list[Any]:
            found = await assignments(bus, "web")
            return found if len(found) == 5 else []

        grown = await eventually(five, what="a fifth replica")
        new = [a for a in grown if a.replica not in {x.replica for x in after}]
        assert new[0].reason.startswith("spread by zone"), new[0].reason


async def test_a_pin_that_no_longer_fits_falls_back_and_says_why(settings, bus) -> None:
    agents = [fake("n0", "a", cpu=1.0), fake("n1", "a", cpu=4.0)]
    scheduler: list[SchedulerWorker] = []

    def build(ctx: Context) -> list[Worker]:
        scheduler.append(SchedulerWorker(ctx))
        return [scheduler[0]]

    async with Host(settings, build) as host:
        await join(host, agents)
        await eventually(lambda: len(scheduler[0].nodes.items) == 2, what="two nodes")
        replicas = [f"api-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
        request = PlacementRequest(
            service="api",
            replicas=replicas,
            resources={"cpu": 1.0},
            pinned=["n0", "n0", "gone"],
        )
        reply = await bus.nc.request(bus.names.place, request.model_dump_json().encode(), 10)
        answer = PlacementReply.model_validate(json.loads(reply.data))
        assert not answer.error
        assert not answer.unplaced
        where = {p.replica: (p.node, p.reason) for p in answer.placed}
        assert where[replicas[0]][0] == "n0"
        assert where[replicas[0]][1] == "rebalance: on n0 as planned, 1 of this service there"
        # n0 had room for one: the second pin falls back to the usual rules
        assert where[replicas[1]][0] == "n1"
        assert where[replicas[1]][1].startswith(
            "planned node n0 no longer fits (lacks cpu); placed by the usual rules: spread"
        ), where[replicas[1]]
        assert where[replicas[2]][0] == "n1"
        assert where[replicas[2]][1].startswith("planned node gone is gone; placed by the usual")
        ledger = await bus.buckets.allocations.get("n0")
        assert ledger is not None
        assert set(ledger.value.bookings) == {replicas[0]}


async def test_a_scale_pinning_more_nodes_than_replicas_is_rejected(
    settings, bus, control_plane
) -> None:
    spec = {"replicas": 1, "command": ["x"], "resources": {"cpu": 1}}
    async with control_plane(agents=[fake("a0", "a")]):
        events = await collect(bus, bus.names.evt("service", "web", ">"))
        try:
            await command(bus, "deploy", "web", spec)
            bad = await command(bus, "scale", "web", {"replicas": 2, "place_on": ["a0"] * 3})

            def rejected() -> list[str]:
                return [d for s, d in events if s.endswith(".rejected") and bad in d]

            found = await eventually(rejected, what="the scale rejected")
            assert "place_on names 3 nodes for 2 replicas" in found[0]
        finally:
            await events.close()
