"""Preemption on a real bus: a higher-priority service evicts lower-priority replicas when
nothing fits; the victims stay pending with the reason and return when room comes back; equal
priorities never evict each other."""

from __future__ import annotations

import json
from typing import Any

import pytest
from support import acli, collect, command, corral_env, eventually

from corral.schemas.placement import PlacementReply, PlacementRequest
from corral.schemas.spec import Placement
from corral.services.cli.explain import explain_view

pytestmark = pytest.mark.timeout(60)


def fake(node_id: str, cpu: float) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "driver": "fake",
        "capacity": {"cpu": cpu, "memory": "8Gi"},
        "labels": {"zone": "a"},
    }


def spec(replicas: int, priority: int) -> dict[str, Any]:
    return {
        "replicas": replicas,
        "command": ["x"],
        "resources": {"cpu": 1},
        "placement": {"priority": priority},
    }


async def active(bus: Any, service: str) -> list[Any]:
    items = await bus.buckets.assignments.items()
    return [v.value for v in items.values() if v.value.service == service and not v.value.draining]


async def status(bus: Any, service: str) -> Any:
    item = await bus.buckets.service_status.get(service)
    return item.value if item is not None else None


async def test_higher_priority_preempts_and_the_victims_come_back(
    settings, bus, control_plane
) -> None:
    env = corral_env(settings)
    preempted = await collect(bus, bus.names.evt("replica", "batch", "preempted"))
    lifecycle = await collect(bus, bus.names.evt("replica", "*", "*"))
    async with control_plane(agents=[fake("n0", 2.0), fake("n1", 2.0)]):
        await command(bus, "deploy", "batch", spec(4, 0))

        async def four() -> bool:
            return len(await active(bus, "batch")) == 4

        await eventually(four, what="batch fills the cluster")
        hi_id = await command(bus, "deploy", "web", spec(2, 100))

        async def web_placed() -> list[Any]:
            found = await active(bus, "web")
            return found if len(found) == 2 else []

        web = await eventually(web_placed, what="web placed by preemption")
        assert all(a.reason.startswith("preemption: evicted ") for a in web), web[0].reason
        assert all("of batch (priority 0)" in a.reason for a in web)
        # both go on one node (two for two evictions beats one for one): they wait for both
        assert all(len(a.waits_for) == 2 for a in web)
        assert len({a.node for a in web}) == 1

        async def web_started() -> bool:
            return sum(1 for subject, _ in lifecycle if subject.endswith(".web.started")) == 2

        await eventually(web_started, what="web started")
        # no overlap: each preemptor starts only once its victim has stopped
        order = [(subject, json.loads(data)) for subject, data in lifecycle]
        for a in web:
            stopped = max(
                i
                for i, (subject, data) in enumerate(order)
                if subject.endswith(".batch.stopped") and data["replica"] in a.waits_for
            )
            started = next(
                i
                for i, (subject, data) in enumerate(order)
                if subject.endswith(".web.started") and data["replica"] == a.replica
            )
            assert stopped < started
            assert order[stopped][1]["message"] == "preempted by web (priority 100)"

        async def batch_pending() -> Any:
            found = await status(bus, "batch")
            return found if found is not None and found.pending == 2 else None

        pending = await eventually(batch_pending, what="batch pending after preemption")
        assert pending.reason.startswith("preempted by web (priority 100); "), pending.reason
        assert "fit no node" in pending.reason
        assert pending.desired == 4
        assert len(await active(bus, "batch")) == 2
        record = await bus.buckets.services.get("batch")
        assert record is not None
        assert record.value.spec.replicas == 4  # nothing lost: the desired count stands

        # one event per victim, on the victim's subject, naming the preemptor
        await eventually(lambda: len(preempted) == 2, what="two preempted events")
        events = [json.loads(data) for _, data in preempted]
        assert {e["preemptor"] for e in events} == {"web"}
        assert {e["preemptor_priority"] for e in events} == {100}
        assert {e["priority"] for e in events} == {0}
        assert len({e["replica"] for e in events}) == 2
        shown = await acli(env, "events", "--type", "*.preempted", "-n", "500", "-o", "json")
        assert shown.returncode == 0, shown
        lines = [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]
        assert len(lines) == 2
        assert {line["type"] for line in lines} == {"io.corral.replica.preempted"}
        traced = await acli(env, "events", "--trace", hi_id, "-o", "json")
        assert "io.corral.replica.preempted" in traced.stdout

        # explain, both sides
        victim = await explain_view(bus, "batch")
        assert victim["pending"] == 2
        assert victim["pending_reason"].startswith("preempted by web (priority 100)")
        preemptor = await explain_view(bus, "web")
        assert all(r["why"].startswith("preemption: evicted") for r in preemptor["replicas"])
        table = await acli(env, "explain", "batch")
        assert "2 pending: preempted by web (priority 100)" in table.stdout

        # the room comes back: batch returns to its full count
        await command(bus, "delete", "web")

        async def back() -> bool:
            found = await status(bus, "batch")
            return (
                len(await active(bus, "batch")) == 4
                and found is not None
                and found.pending == 0
                and found.reason == ""
            )

        await eventually(back, within=20, what="batch back to four replicas")
    await preempted.close()
    await lifecycle.close()


async def test_equal_priority_never_preempts(settings, bus, control_plane) -> None:
    preempted = await collect(bus, bus.names.evt("replica", "*", "preempted"))
    async with control_plane(agents=[fake("n0", 2.0)]):
        await command(bus, "deploy", "first", spec(2, 50))

        async def two() -> bool:
            return len(await active(bus, "first")) == 2

        await eventually(two, what="first fills the node")
        await command(bus, "deploy", "second", spec(1, 50))

        async def second_pending() -> Any:
            found = await status(bus, "second")
            return found if found is not None and found.pending == 1 else None

        pending = await eventually(second_pending, what="second pending")
        assert "fit no node" in pending.reason
        assert not pending.reason.startswith("preempted")
        # a lower one never preempts a higher one either
        await command(bus, "deploy", "third", spec(1, 10))

        async def third_pending() -> Any:
            found = await status(bus, "third")
            return found if found is not None and found.pending == 1 else None

        await eventually(third_pending, what="third pending")
        items = await bus.buckets.assignments.items()
        firsts = [v.value for v in items.values() if v.value.service == "first"]
        assert len(firsts) == 2
        assert not any(a.draining for a in firsts)
        assert not await active(bus, "second")
        assert list(preempted) == []
    await preempted.close()


async def test_a_request_that_does_not_allow_preemption_evicts_nothing(
    settings, bus, control_plane
) -> None:
    """Preemption is opt-in per request: only an asker that carries out evictions (the
    deployer) gets them; another asker's request just stays unplaced."""
    async with control_plane(agents=[fake("n0", 2.0)]):
        await command(bus, "deploy", "batch", spec(2, 0))

        async def two() -> bool:
            return len(await active(bus, "batch")) == 2

        await eventually(two, what="batch fills the node")

        async def ask(preempt: bool) -> PlacementReply:
            request = PlacementRequest(
                service="urgent",
                replicas=[f"urgent-{preempt}-0"],
                resources={"cpu": 1.0},
                placement=Placement(priority=500),
                preempt=preempt,
            )
            reply = await bus.nc.request(
                bus.names.place, request.model_dump_json().encode(), timeout=10
            )
            return PlacementReply.model_validate(json.loads(reply.data))

        refused = await ask(False)
        assert refused.unplaced == ["urgent-False-0"]
        assert refused.evictions == []
        assert "fit no node" in refused.reason
        allowed = await ask(True)
        assert [p.node for p in allowed.placed] == ["n0"]
        [eviction] = allowed.evictions
        assert eviction.service == "batch"
        assert eviction.node == "n0"
        assert (eviction.priority, eviction.preemptor_priority) == (0, 500)
        assert eviction.note == "preempted by urgent (priority 500)"
        # the preemptor's replica is booked on the node's ledger, next to the victims'
        ledger = await bus.buckets.allocations.get("n0")
        assert ledger is not None
        assert "urgent-True-0" in ledger.value.bookings


async def test_two_schedulers_preempting_at_once_never_overbook(
    settings, bus, control_plane
) -> None:
    """Two schedulers answer the deployer's requests (a queue group); several services of two
    priorities preempt at once. Every freed slot goes to one replica, the higher priority
    wins, and once the victims are gone no node holds more than it has."""
    nodes = [fake(f"n{i}", 4.0) for i in range(3)]
    workers = ("api", "deployer", "scheduler", "scheduler")
    async with control_plane(workers=workers, agents=nodes):
        await command(bus, "deploy", "low", spec(12, 0))

        async def full() -> bool:
            return len(await active(bus, "low")) == 12

        await eventually(full, what="low fills the cluster")
        for i in range(4):
            await command(bus, "deploy", f"h{i}", spec(2, 100))
        for i in range(2):
            await command(bus, "deploy", f"m{i}", spec(3, 50))

        async def settled() -> dict[str, int] | None:
            items = await bus.buckets.assignments.items()
            values = [v.value for v in items.values()]
            if any(a.draining for a in values):
                return None
            counts = {
                "h": sum(1 for a in values if a.service.startswith("h")),
                "m": sum(1 for a in values if a.service.startswith("m")),
                "low": sum(1 for a in values if a.service == "low"),
            }
            return counts if counts == {"h": 8, "m": 4, "low": 0} else None

        await eventually(settled, within=30, what="h placed, m partly, low evicted")
        items = await bus.buckets.assignments.items()
        per_node: dict[str, int] = {}
        for item in items.values():
            per_node[item.value.node] = per_node.get(item.value.node, 0) + 1
        assert all(count <= 4 for count in per_node.values()), per_node
        low = await status(bus, "low")
        assert low.pending == 12
        assert low.reason.startswith("preempted by "), low.reason
