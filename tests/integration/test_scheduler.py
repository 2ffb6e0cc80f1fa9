"""The scheduler on a real bus: placement rules through the deployer, reasons kept in the
assignments, ledgers booked with compare-and-set, two schedulers racing for the same room,
and room freed when assignments go."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from support import acli, command, corral_env, eventually

from corral.schemas.placement import PlacementReply, PlacementRequest
from corral.schemas.spec import Placement
from corral.schemas.state import Booking, NodeLedger
from corral.services.runner import Host
from corral.workers.runtime import Context, Worker
from corral.workers.scheduler.executors import InProcess
from corral.workers.scheduler.placement import (
    ClassRequest,
    NodeTable,
    Solution,
    identical_groups,
)
from corral.workers.scheduler.worker import SchedulerWorker

pytestmark = pytest.mark.timeout(60)


def fake(node_id: str, zone: str, cpu: float = 4.0, **extra: float) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "driver": "fake",
        "capacity": {"cpu": cpu, "memory": "8Gi", **extra},
        "labels": {"zone": zone},
    }


async def assignments(bus, service: str) -> list[Any]:
    items = await bus.buckets.assignments.items()
    return [v.value for v in items.values() if v.value.service == service]


async def test_spread_by_zone_and_reasons_through_the_deployer(bus, control_plane) -> None:
    agents = [fake(f"n{i}", "ab"[i % 2]) for i in range(4)] + [fake("g0", "a", gpu=2)]
    spec = {
        "replicas": 6,
        "command": ["sleep", "1"],
        "resources": {"cpu": 0.5},
        "placement": {"spread_by": "zone", "avoid": ["gpu-job"]},
    }
    gpu = {"replicas": 3, "command": ["x"], "resources": {"gpu": 1}}
    async with control_plane(agents=agents):
        await command(bus, "deploy", "gpu-job", gpu)

        async def two_gpu() -> list[Any]:
            found = await assignments(bus, "gpu-job")
            return found if len(found) == 2 else []

        placed = await eventually(two_gpu, what="two gpu replicas")
        assert {a.node for a in placed} == {"g0"}
        status = await eventually(
            lambda: _pending(bus, "gpu-job"), what="the third gpu replica pending"
        )
        # the first answer says g0 ran out; a retry finds it full ("lacks")
        assert "5 nodes lack gpu" in status.reason or (
            "4 nodes lack gpu" in status.reason and "1 node ran out of gpu" in status.reason
        ), status.reason

        await command(bus, "deploy", "web", spec)

        async def six() -> list[Any]:
            found = await assignments(bus, "web")
            return found if len(found) == 6 else []

        web = await eventually(six, what="six web replicas")
        zones = Counter("ab"[int(a.node[1:]) % 2] for a in web)
        assert zones == {"a": 3, "b": 3}
        assert "g0" not in {a.node for a in web}  # web avoids gpu-job
        assert all(a.reason.startswith("spread by zone: ") for a in web), web[0].reason

        ledgers = await bus.buckets.allocations.items()
        booked = {
            f"{node}.{replica}" for node, item in ledgers.items() for replica in item.value.bookings
        }
        assert {f"{a.node}.{a.replica}" for a in web} <= booked

        # scale in: the freed bookings leave the ledgers
        await command(bus, "scale", "web", {"replicas": 2})

        async def freed() -> bool:
            items = await bus.buckets.allocations.items()
            web_bookings = [
                r
                for item in items.values()
                for r, b in item.value.bookings.items()
                if b.service == "web"
            ]
            return len(web_bookings) == 2

        await eventually(freed, what="four web bookings freed")


async def _pending(bus, service: str) -> Any:
    item = await bus.buckets.service_status.get(service)
    return item.value if item is not None and item.value.pending else None


async def _heartbeats(host: Host, agents: list[dict[str, Any]]) -> None:
    from corral.schemas.spec import Resources
    from corral.services.runner import make_agent

    workers = []
    for spec in agents:
        spec = dict(spec)
        spec["capacity"] = Resources.model_validate(spec["capacity"])
        workers.append(make_agent(host.ctx, **spec))
    await host.add(workers)


async def test_two_schedulers_never_book_the_same_room(settings, bus) -> None:
    """Two scheduler replicas answer in a queue group from their own mirrors; with
    compare-and-set on the ledgers no node is ever booked beyond its capacity."""
    schedulers: list[SchedulerWorker] = []

    def build(ctx: Context) -> list[Worker]:
        a = SchedulerWorker(ctx)
        b = SchedulerWorker(ctx)
        schedulers.extend([a, b])
        return [a, b]

    nodes = [fake(f"n{i}", "ab"[i % 2], cpu=4.0) for i in range(6)]
    async with Host(settings, build) as host:
        await _heartbeats(host, nodes)
        await eventually(
            lambda: all(len(s.nodes.items) == 6 for s in schedulers), what="both see 6 nodes"
        )

        async def ask(i: int) -> PlacementReply:
            request = PlacementRequest(
                service=f"s{i}",
                replicas=[f"s{i}-{uuid.uuid4().hex[:6]}-{j}" for j in range(3)],
                resources={"cpu": 1.0},
                placement=Placement(spread_by="zone"),
            )
            reply = await bus.nc.request(
                bus.names.place, request.model_dump_json().encode(), timeout=10
            )
            return PlacementReply.model_validate(json.loads(reply.data))

        replies = await asyncio.gather(*(ask(i) for i in range(12)))
        placed = [p for r in replies for p in r.placed]
        unplaced = sum(len(r.unplaced) for r in replies)
        assert not any(r.error for r in replies)
        # 6 nodes x 4 cpus = 24 slots for 36 replicas: every slot used, none twice
        assert len(placed) == 24
        assert unplaced == 12
        per_node = Counter(p.node for p in placed)
        assert max(per_node.values()) <= 4
        ledgers = await bus.buckets.allocations.items()
        for node, item in ledgers.items():
            assert len(item.value.bookings) == per_node[node]
        assert all(r.reason for r in replies if r.unplaced)
        assert sum(len(s.accounts.booked) for s in schedulers) >= 24


class Recording(InProcess):
    """The in-process executor, keeping every batch it was asked to place."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[ClassRequest], int]] = []

    async def solve(self, classes: list[ClassRequest], table: NodeTable) -> list[Solution]:
        self.batches.append((classes, len(identical_groups(classes, table))))
        return await super().solve(classes, table)


async def test_services_of_one_shape_asked_together_are_placed_as_a_group(settings, bus) -> None:
    """Ten new services of one shape asked at once: the scheduler places them as one group
    and each still gets its own spread over the zones, its own reasons, and its bookings."""
    recording = Recording()
    nodes = [fake(f"n{i}", "ab"[i % 2], cpu=8.0) for i in range(6)]
    async with Host(settings, lambda ctx: [SchedulerWorker(ctx, executor=recording)]) as host:
        await _heartbeats(host, nodes)
        scheduler = next(w for w in host.started if isinstance(w, SchedulerWorker))
        await eventually(lambda: len(scheduler.nodes.items) == 6, what="6 nodes seen")

        async def ask(i: int) -> PlacementReply:
            request = PlacementRequest(
                service=f"web{i}",
                replicas=[f"web{i}-{j}" for j in range(4)],
                resources={"cpu": 1.0},
                placement=Placement(spread_by="zone", max_per_node=1),
            )
            reply = await bus.nc.request(
                bus.names.place, request.model_dump_json().encode(), timeout=10
            )
            return PlacementReply.model_validate(json.loads(reply.data))

        replies = await asyncio.gather(*(ask(i) for i in range(10)))
    assert any(groups for _, groups in recording.batches), recording.batches
    zone = {n["node_id"]: n["labels"]["zone"] for n in nodes}
    per_node: Counter[str] = Counter()
    for i, reply in enumerate(replies):
        assert not reply.error
        assert not reply.unplaced
        assert len(reply.placed) == 4
        nodes_used = [p.node for p in reply.placed]
        assert len(set(nodes_used)) == 4  # max_per_node=1 for each service
        assert Counter(zone[n] for n in nodes_used) == {"a": 2, "b": 2}
        for p in reply.placed:
            assert p.reason.startswith(f"spread by zone: 2 of this service in zone={zone[p.node]}")
            assert p.replica.startswith(f"web{i}-")
        per_node.update(nodes_used)
    assert max(per_node.values()) <= 8
    ledgers = await bus.buckets.allocations.items()
    assert sum(len(item.value.bookings) for item in ledgers.values()) == 40


class RivalBooksWhileSolving(InProcess):
    """The in-process executor, except that once, after solving and before answering, a
    rival scheduler books all of `node` and this scheduler's watch brings that booking in:
    what a batch solved in a thread or on Ray meets when two schedulers share a cluster."""

    def __init__(self, bus: Any, node: str, cpu: float) -> None:
        self.bus = bus
        self.node = node
        self.cpu = cpu
        self.worker: SchedulerWorker | None = None
        self.rival_revision = 0

    async def solve(self, classes: list[ClassRequest], table: NodeTable) -> list[Solution]:
        solutions = await super().solve(classes, table)
        worker = self.worker
        if self.rival_revision or worker is None:
            return solutions
        bucket = self.bus.buckets.allocations
        rival = Booking(service="rival", resources={"cpu": self.cpu}, at=datetime.now(UTC))
        current = await bucket.get(self.node)
        ledger = NodeLedger(
            node=self.node,
            bookings={**(current.value.bookings if current else {}), "rival-0": rival},
        )
        if current is None:
            self.rival_revision = await bucket.create(self.node, ledger)
        else:
            self.rival_revision = await bucket.update(self.node, ledger, current.revision)

        def heard() -> bool:
            item = worker.ledgers.items.get(self.node)
            return item is not None and item.revision >= self.rival_revision

        await eventually(heard, what="the scheduler's watch brings the rival's booking")
        return solutions


async def test_a_booking_heard_of_while_solving_is_never_booked_over(settings, bus) -> None:
    """The plan is made on the ledgers as they were; a rival's booking that reaches this
    scheduler while the batch is solved makes the write a conflict (planned again, and
    refused: the node is full), never a booking on top of room the plan did not count."""
    executor = RivalBooksWhileSolving(bus, "n0", cpu=2.0)
    nodes = [fake("n0", "a", cpu=2.0)]
    async with Host(settings, lambda ctx: [SchedulerWorker(ctx, executor=executor)]) as host:
        await _heartbeats(host, nodes)
        scheduler = next(w for w in host.started if isinstance(w, SchedulerWorker))
        executor.worker = scheduler
        await eventually(lambda: len(scheduler.nodes.items) == 1, what="n0 seen")
        request = PlacementRequest(
            service="web", replicas=["web-0"], resources={"cpu": 1.0}, placement=Placement()
        )
        raw = await bus.nc.request(bus.names.place, request.model_dump_json().encode(), timeout=10)
        reply = PlacementReply.model_validate(json.loads(raw.data))
        assert executor.rival_revision, "the rival never booked"
        assert reply.placed == []
        assert reply.unplaced == ["web-0"]
        assert "cpu" in reply.reason, reply.reason
        assert scheduler.conflicts >= 1
        ledger = await bus.buckets.allocations.get("n0")
        assert ledger is not None
        assert set(ledger.value.bookings) == {"rival-0"}


async def test_invalid_request_gets_an_error_reply(settings, bus) -> None:
    async with Host(settings, lambda ctx: [SchedulerWorker(ctx)]):
        reply = await bus.nc.request(bus.names.place, b'{"service": 3}', timeout=5)
        answer = PlacementReply.model_validate(json.loads(reply.data))
        assert answer.error.startswith("invalid placement request")


async def test_corral_explain_shows_each_replica_and_why_others_are_pending(
    settings, bus, control_plane
) -> None:
    env = corral_env(settings)
    agents = [fake("n0", "a", cpu=2.0), fake("n1", "b", cpu=1.0)]
    spec = {
        "replicas": 5,
        "command": ["x"],
        "resources": {"cpu": 1},
        "placement": {"spread_by": "zone", "max_per_node": 2},
    }
    async with control_plane(agents=agents):
        await command(bus, "deploy", "web", spec)
        await eventually(lambda: _pending(bus, "web"), what="web pending")
        result = await acli(env, "explain", "web", "-o", "json")
        assert result.returncode == 0, result
        view = json.loads(result.stdout)
        assert view["placement"] == {"max_per_node": 2, "spread_by": "zone"}
        assert sorted(r["node"] for r in view["replicas"]) == ["n0", "n0", "n1"]
        assert all(r["why"].startswith("spread by zone") for r in view["replicas"])
        assert view["pending"] == 2
        assert "2 of 2 replicas fit no node" in view["pending_reason"]
        table = await acli(env, "explain", "web")
        assert "2 pending: " in table.stdout
        assert "spread by zone" in table.stdout
        missing = await acli(env, "explain", "nope")
        assert missing.returncode == 1
        assert "not found" in missing.stderr


async def test_corral_rebalance_plan_moves_replicas_to_a_new_zone(
    settings, bus, control_plane
) -> None:
    env = corral_env(settings)
    spec = {
        "replicas": 6,
        "command": ["x"],
        "resources": {"cpu": 1},
        "placement": {"spread_by": "zone"},
    }
    async with control_plane(agents=[fake("a0", "a", cpu=8.0)]) as host:
        await command(bus, "deploy", "web", spec)

        async def six() -> list[Any]:
            found = await assignments(bus, "web")
            return found if len(found) == 6 else []

        await eventually(six, what="six replicas in zone a")
        result = await acli(env, "rebalance", "--plan", "-o", "json")
        assert result.returncode == 0, result
        assert json.loads(result.stdout)["moves"] == []
        await _heartbeats(host, [fake("b0", "b", cpu=8.0)])

        async def planned() -> list[Any]:
            result = await acli(env, "rebalance", "--plan", "--budget", "5", "-o", "json")
            return json.loads(result.stdout)["moves"] if result.returncode == 0 else []

        moves = await eventually(planned, what="moves to zone b")
        assert len(moves) == 3
        assert {(m["from"], m["to"]) for m in moves} == {("a0", "b0")}
        assert len({m["replica"] for m in moves}) == 3
        assert all(m["replica"].startswith("web-") for m in moves)
        assert moves[0]["why"].startswith("spread by zone: 6 in zone=a, 0 in zone=b")
        table = await acli(env, "rebalance", "--plan", "--budget", "1")
        assert "1 move(s) within a budget of 1" in table.stdout
        refused = await acli(env, "rebalance")
        assert refused.returncode == 2
        assert "--plan" in refused.stderr

        # --apply: three new replicas in zone b become ready, then the three planned ones stop
        moving = {m["replica"] for m in moves}
        result = await acli(
            env, "rebalance", "--apply", "--budget", "3", "--timeout", "30", "-o", "json"
        )
        assert result.returncode == 0, result
        applied = json.loads(result.stdout)["applied"]
        assert len(applied) == 1
        assert set(applied[0]["stopped"]) == moving
        assert set(applied[0]["started"].values()) == {"b0"}
        after = await assignments(bus, "web")
        assert len(after) == 6
        assert Counter(a.node for a in after) == {"a0": 3, "b0": 3}
        assert not moving & {a.replica for a in after}
        record = await bus.buckets.services.get("web")
        assert record is not None
        assert record.value.spec.replicas == 6
        again = await acli(env, "rebalance", "--plan", "-o", "json")
        assert json.loads(again.stdout)["moves"] == []


async def test_corral_sim_joins_nodes_with_zones_and_shapes(settings, bus, processes) -> None:
    env = corral_env(settings)
    sim = processes.start("sim", "--nodes", "30", "--zones", "3", "--prefix", "t", name="sim")

    async def thirty() -> list[Any]:
        items = await bus.buckets.nodes.items()
        found = [v.value for v in items.values() if v.value.id.startswith("t-")]
        return found if len(found) == 30 else []

    nodes = await eventually(thirty, what="30 simulated nodes")
    assert Counter(n.labels["zone"] for n in nodes) == {"z0": 10, "z1": 10, "z2": 10}
    assert {n.runtime for n in nodes} == {"fake"}
    assert len({n.labels["shape"] for n in nodes}) > 1
    bad = await acli(env, "sim", "--prefix", "Bad_Prefix")
    assert bad.returncode == 2
    assert "--prefix" in bad.stderr
    sim.terminate()
    assert sim.wait(timeout=20) == 0
