"""The scheduler's thin handler: request/reply on `<prefix>.sched.place` (a queue group, so
several schedulers share the work), requests batched over a short window, solved together by
the pure solver (or its Ray shards), and committed with compare-and-set on each touched node's
ledger in `corral-allocations`, Nomad-style: the replicas of a node whose ledger moved under
us are planned again on fresh state, never written over someone else's booking."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from corral.bus.lifecycle import Loops, on_server
from corral.bus.store import Mirror, SharedMirror, Versioned
from corral.schemas.errors import ConflictError
from corral.schemas.placement import Eviction, Placed, PlacementReply, PlacementRequest
from corral.schemas.state import (
    AssignmentFootprint,
    Booking,
    NodeLedger,
    NodeStatus,
    ServiceRecord,
    is_alive,
)
from corral.workers.runtime import Context
from corral.workers.scheduler.accounting import Accounts, Usage, book, grown, release, stale
from corral.workers.scheduler.executors import Executor, Sharded
from corral.workers.scheduler.pinning import place_pinned
from corral.workers.scheduler.placement import ClassRequest, NodeTable, Solution
from corral.workers.scheduler.preempting import preempt_left

log = logging.getLogger(__name__)
BOOKING_TTL = 30.0
"""a booking no assignment took up within this long is freed"""
ROUNDS = 5
"""how many times a batch is planned again after ledger conflicts before giving up"""
Ledgers = dict[str, Versioned[NodeLedger]]
"""node -> its ledger, as a plan counted it"""


def node_ready(node: NodeStatus, grace: float, now: datetime | None = None) -> bool:
    now = now or datetime.now(UTC)
    return not node.draining and is_alive(node, now, grace)


@dataclass
class _Asked:
    request: PlacementRequest
    reply_to: str
    placed: list[Placed]
    left: list[str]
    """replica ids still to place"""
    reason: str = ""
    pins: dict[str, str] = field(default_factory=dict)
    """replica -> the node a rebalance plan pinned it to, until booked or refused"""
    unpinned: dict[str, str] = field(default_factory=dict)
    """replica -> why its pinned node no longer fit (it was placed by the usual rules)"""
    evictions: list[Eviction] = field(default_factory=list)
    """running replicas to evict first, so that some of `placed` fit (preemption)"""

    def asking(self, count: int | None = None) -> ClassRequest:
        """The request as a solver class of `count` replicas (by default, those left)."""
        r = self.request
        return ClassRequest.of(
            r.service, len(self.left) if count is None else count, r.resources, r.rules(), r.driver
        )


class SchedulerWorker:
    name = "scheduler"

    def __init__(self, ctx: Context, *, executor: Executor | None = None) -> None:
        self.ctx = ctx
        buckets = ctx.bus.buckets
        self.nodes: Mirror[NodeStatus] = SharedMirror(buckets.nodes)
        # room is all the scheduler reads of an assignment: decode no more than that
        self.assignments: Mirror[AssignmentFootprint] = Mirror(
            buckets.assignments.view(AssignmentFootprint)
        )
        self.ledgers: Mirror[NodeLedger] = Mirror(buckets.allocations)
        self.services: Mirror[ServiceRecord] = Mirror(buckets.services)
        self.accounts = Accounts()
        self.assignments.listen(self._on_assignment)
        self.ledgers.listen(self._on_ledger)
        self.nodes.listen(self._on_node)
        self._template: NodeTable | None = None
        self._shapes: dict[str, tuple[object, ...]] = {}
        """node id -> what the template holds of it (labels, capacity, drivers)"""
        self.executor: Executor = executor or Sharded(
            ctx.settings.sched_shard_above,
            ctx.settings.sched_shards,
            placements_above=ctx.settings.sched_shard_placements_above,
        )
        self.loops = Loops("scheduler")
        self._queue: list[_Asked] = []
        self._wake = asyncio.Event()
        self._sub: Subscription | None = None
        self._release: set[str] = set()
        self._written: dict[str, tuple[int, bytes]] = {}
        """node -> the revision and JSON of the ledger this scheduler last wrote there, which
        the next booking on the node extends instead of encoding the ledger again"""
        self.conflicts = 0
        """ledger writes that lost a race and were planned again (for tests and metrics)"""

    def register(self, broker: object) -> None:
        return None  # subscribes with nats-py in start(): replies are sent after the batch

    async def start(self) -> None:
        for mirror in (self.nodes, self.ledgers, self.assignments, self.services):
            await mirror.start()
        names = self.ctx.bus.names
        self._sub = await self.ctx.bus.nc.subscribe(
            names.place, queue=f"{names.prefix}-scheduler", cb=self._on_request
        )
        await on_server(self.ctx.bus.nc)  # the server has the subscription before "started"
        self.loops.spawn(self._batches(), "batches")
        self.loops.spawn(self._sweep(), "sweep")

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        self._wake.set()
        await self.loops.stop()
        await self.executor.close()
        for mirror in (self.services, self.assignments, self.ledgers, self.nodes):
            await mirror.stop()

    # --- state ---------------------------------------------------------------------------
    def _on_assignment(self, key: str, item: Versioned[AssignmentFootprint] | None) -> None:
        if item is None:
            self.accounts.set_assigned(key, None)
            self._release.add(key)
            self._wake.set()
            return
        a = item.value
        self.accounts.set_assigned(key, Usage(a.service, a.node, a.template.resources.as_dict()))

    def _on_node(self, key: str, item: Versioned[NodeStatus] | None) -> None:
        """Heartbeats change nothing the template holds; a new node, a gone one, or new
        labels, capacity or drivers make the next batch build it again."""
        if item is None:
            if self._shapes.pop(key, None) is not None:
                self._template = None
            return
        n = item.value
        shape = (
            tuple(sorted(n.labels.items())),
            tuple(sorted(n.capacity.as_dict().items())),
            tuple(n.drivers),
        )
        if self._shapes.get(key) != shape:
            self._shapes[key] = shape
            self._template = None

    def _on_ledger(self, key: str, item: Versioned[NodeLedger] | None) -> None:
        if item is None:
            self._written.pop(key, None)
        self.accounts.set_ledger(key, item.value if item is not None else None)

    def avoids(self) -> dict[str, tuple[str, ...]]:
        return {
            r.spec.name: tuple(r.spec.placement.avoid)
            for r in self.services.values()
            if r.spec.placement.avoid and not r.deleted
        }

    # --- requests ------------------------------------------------------------------------
    async def _on_request(self, msg: Msg) -> None:
        try:
            request = PlacementRequest.model_validate_json(msg.data)
        except ValidationError as exc:
            if msg.reply:
                error = f"invalid placement request: {exc.errors()[0]['msg']}"
                await self.ctx.bus.nc.publish(
                    msg.reply, PlacementReply(error=error).model_dump_json().encode()
                )
            return
        pins = {r: n for r, n in zip(request.replicas, request.pinned, strict=False) if n}
        self._queue.append(_Asked(request, msg.reply, [], list(request.replicas), pins=pins))
        self._wake.set()

    async def _batches(self) -> None:
        window = self.ctx.settings.sched_batch_window
        while self.loops.running:
            await self._wake.wait()
            self._wake.clear()
            if self._release:
                await self._release_freed()
            if not self._queue:
                continue
            if window > 0 and not await self.loops.sleep(window):
                return
            batch, self._queue = self._queue, []
            try:
                await self.place(batch)
            except Exception as exc:  # a bad batch must never kill the scheduler
                log.exception("placement failed")
                for asked in batch:
                    asked.reason = f"scheduler error: {exc}"
            await asyncio.gather(*(self._answer(asked) for asked in batch))

    async def _answer(self, asked: _Asked) -> None:
        if not asked.reply_to:
            return
        reply = PlacementReply(
            placed=[_unpinned(p, asked.unpinned.get(p.replica)) for p in asked.placed],
            unplaced=asked.left,
            reason=asked.reason if asked.left else "",
            error=asked.reason if asked.reason.startswith("scheduler error") else "",
            evictions=asked.evictions,
        )
        with contextlib.suppress(Exception):
            await self.ctx.bus.nc.publish(asked.reply_to, reply.model_dump_json().encode())

    def table(self, services: list[str] | None = None) -> NodeTable:
        """The cluster now. The nodes' fixed part is kept between batches; allocations,
        readiness and the replicas of `services` (and of the services they avoid, or that
        avoid them) are read fresh. None: every service."""
        grace = self.ctx.settings.node_grace
        # heartbeats are judged against what the watch has read: behind a backlog, every
        # node would otherwise look silent
        now = self.nodes.as_of(datetime.now(UTC))
        nodes = sorted(self.nodes.values(), key=lambda n: n.id)
        if self._template is None or self._template.ids != [n.id for n in nodes]:
            self._template = NodeTable.build(
                [self.accounts.view(node, True) for node in nodes], avoids={}
            )
        template = self._template
        position = {node_id: i for i, node_id in enumerate(template.ids)}
        allocated = np.zeros_like(template.capacity)
        columns = {r: c for c, r in enumerate(template.resources)}
        totals = np.zeros(len(nodes), dtype=np.int64)
        for node_id, resources in self.accounts.allocated.items():
            i = position.get(node_id)
            if i is None:
                continue
            totals[i] = self.accounts.totals.get(node_id, 0)
            for r, amount in resources.items():
                c = columns.get(r)
                if c is not None:
                    allocated[c, i] = amount
        ready = np.fromiter((node_ready(n, grace, now) for n in nodes), bool, len(nodes))
        avoids = self.avoids()
        wanted = set(self.accounts.by_service) if services is None else set(services)
        for name in list(wanted):
            wanted.update(avoids.get(name, ()))
        wanted.update(other for other, theirs in avoids.items() if wanted & set(theirs))
        placed = {}
        for name in wanted:
            per_node = self.accounts.by_service.get(name)
            if per_node:
                found = [(position[n], c) for n, c in per_node.items() if n in position]
                if found:
                    where, counts = zip(*found, strict=True)
                    placed[name] = (np.array(where, dtype=np.intp), np.array(counts))
        return template.fresh(
            allocated=allocated, totals=totals, ready=ready, placed=placed, avoids=avoids
        )

    def planning(self, services: list[str]) -> tuple[NodeTable, Ledgers]:
        """The table to plan `services` on, and the ledgers it counts. A plan's bookings are
        written over those ledgers, never over newer ones that arrive while it is solved (an
        await, in a thread or on Ray): a second scheduler's booking read in the meantime
        would otherwise pass the compare-and-set without having been counted."""
        return self.table(services), dict(self.ledgers.items)

    async def _place_pinned(self, batch: list[_Asked]) -> None:
        """Replicas pinned to a node (a rebalance plan's targets) go there when it still fits,
        booked with compare-and-set like any other; a pin whose node lost a race is checked
        again on fresh state, and one that no longer fits is left to the usual placement."""
        now = datetime.now(UTC)
        for _ in range(ROUNDS):
            todo = [asked for asked in batch if asked.pins]
            if not todo:
                return
            table, seen = self.planning([a.request.service for a in todo])
            per_node: dict[str, list[tuple[_Asked, str, str]]] = {}
            for asked in todo:
                pinned = place_pinned(table, asked.asking(0), list(asked.pins.items()))
                for replica, why in pinned.refused.items():
                    del asked.pins[replica]
                    asked.unpinned[replica] = why
                for replica, node, note in pinned.kept:
                    per_node.setdefault(node, []).append((asked, replica, note))
            made: _Bookings = {}
            results = await asyncio.gather(
                *(self._book(node, entries, now, made, seen) for node, entries in per_node.items()),
                return_exceptions=True,
            )
            for (node, entries), result in zip(per_node.items(), results, strict=True):
                if result is not True:
                    self.conflicts += 1  # checked again on the ledger as it is now
                    continue
                for asked, replica, note in entries:
                    del asked.pins[replica]
                    asked.left.remove(replica)
                    asked.placed.append(Placed(replica=replica, node=node, reason=note))
        for asked in batch:
            for replica, node in asked.pins.items():
                asked.unpinned[replica] = f"planned node {node} kept being booked by others"
            asked.pins.clear()

    async def place(self, batch: list[_Asked]) -> None:
        """Plan, book with compare-and-set, and plan again what lost a race; then, for askers
        that allow it, evict lower priorities for what still fits nowhere."""
        await self._place_pinned(batch)
        await self._place_usual(batch)
        if any(a.left and a.request.preempt for a in batch):
            await preempt_left(self, batch)

    async def _place_usual(self, batch: list[_Asked]) -> None:
        for _ in range(ROUNDS):
            todo = [asked for asked in batch if asked.left]
            if not todo:
                return
            classes = [a.asking() for a in todo]
            table, seen = self.planning([a.request.service for a in todo])
            solutions = await self.executor.solve(classes, table)
            if not await self._commit(todo, solutions, seen):
                return
        for asked in batch:
            if asked.left:
                asked.reason = (
                    f"{len(asked.left)} of {len(asked.request.replicas)} replicas: other "
                    f"schedulers kept booking the same nodes; will try again"
                )

    async def _commit(self, todo: list[_Asked], solutions: list[Solution], seen: Ledgers) -> bool:
        """Book every solution on its nodes' ledgers; True when some node lost a race and
        its replicas need planning again."""
        now = datetime.now(UTC)
        per_node: dict[str, list[tuple[_Asked, str, str]]] = {}
        for asked, solution in zip(todo, solutions, strict=True):
            replicas = iter(asked.left)
            notes = solution.why  # written once per solution, not once per node
            for node_id, count in solution.per_node.items():
                note = notes.get(node_id, "")
                for _ in range(count):
                    per_node.setdefault(node_id, []).append((asked, next(replicas), note))
            asked.left = list(replicas)
            asked.reason = solution.reason
        made: _Bookings = {}
        results = await asyncio.gather(
            *(
                self._book(node_id, entries, now, made, seen)
                for node_id, entries in per_node.items()
            ),
            return_exceptions=True,
        )
        again = False
        for (node_id, entries), result in zip(per_node.items(), results, strict=True):
            if result is True:
                for asked, replica, note in entries:
                    asked.placed.append(Placed(replica=replica, node=node_id, reason=note))
                continue
            if not isinstance(result, ConflictError):
                log.warning("could not book on %s: %s", node_id, result)
            again = True
            self.conflicts += 1
            for asked, replica, _ in entries:
                asked.left.append(replica)
        return again

    async def _book(
        self,
        node_id: str,
        entries: list[tuple[_Asked, str, str]],
        now: datetime,
        made: _Bookings,
        seen: Ledgers,
    ) -> bool:
        """Add the entries to the node's ledger, written over the one the plan counted
        (`seen`) with compare-and-set: a ledger that changed since, even one this process
        has heard of while the batch was solved, makes it a conflict, planned again."""
        bucket = self.ctx.bus.buckets.allocations
        current = seen.get(node_id)
        known = self.ledgers.items.get(node_id)
        if (known.revision if known else 0) != (current.revision if current else 0):
            # already heard of: no write to lose, no read to refresh
            raise ConflictError(f"{bucket.name}/{node_id} changed while the batch was solved")
        # the replicas of one request book the same thing: one record (and its JSON) serves
        # them all, on every node of the round (`made`, shared by the round's bookings)
        for a, _, _ in entries:
            if id(a) not in made:
                request = a.request
                one = Booking(service=request.service, resources=request.resources, at=now)
                made[id(a)] = (one, bucket.encode(one))
        ledger = book(
            current.value if current is not None else None,
            node_id,
            ((replica, made[id(a)][0]) for a, replica, _ in entries),
        )
        raw: bytes | None = None
        written = self._written.get(node_id)
        if current is not None and written is not None and written[0] == current.revision:
            added = {replica: made[id(a)][1] for a, replica, _ in entries}
            raw = grown(written[1], current.value, added, node_id)
        if raw is None:
            raw = bucket.encode(ledger)
        self.ledgers.expect(node_id, ledger, raw)
        try:
            if current is None:
                revision = await bucket.create(node_id, ledger, raw=raw)
            else:
                revision = await bucket.update(node_id, ledger, current.revision, raw=raw)
        except ConflictError:
            self.ledgers.unexpect(node_id)
            await self._refresh(node_id)
            raise
        except BaseException:
            self.ledgers.unexpect(node_id)
            raise
        self.ledgers.note_written(node_id, ledger, revision)
        self._written[node_id] = (revision, raw)
        self.accounts.set_ledger(node_id, ledger)
        return True

    async def _refresh(self, node_id: str) -> None:
        """Read a node's ledger now, rather than waiting for the watch to bring it."""
        fresh = await self.ctx.bus.buckets.allocations.get(node_id)
        if fresh is None:
            return
        self.ledgers.note_written(node_id, fresh.value, fresh.revision)
        self.accounts.set_ledger(node_id, self.ledgers.get(node_id))

    # --- freeing room --------------------------------------------------------------------
    async def _release_freed(self) -> None:
        """Take removed assignments' bookings off their ledgers."""
        keys, self._release = self._release, set()
        by_node: dict[str, list[str]] = {}
        for key in keys:
            node, _, replica = key.partition(".")
            by_node.setdefault(node, []).append(replica)
        await asyncio.gather(
            *(self._unbook(node, replicas) for node, replicas in by_node.items()),
            return_exceptions=True,
        )

    async def _unbook(self, node_id: str, replicas: list[str]) -> None:
        bucket = self.ctx.bus.buckets.allocations
        for _ in range(ROUNDS):
            current = self.ledgers.items.get(node_id)
            if current is None:
                return
            smaller = release(current.value, replicas)
            if smaller is None:
                return
            raw = bucket.encode(smaller)
            self.ledgers.expect(node_id, smaller, raw)
            try:
                revision = await bucket.update(node_id, smaller, current.revision, raw=raw)
            except ConflictError:
                self.ledgers.unexpect(node_id)
                await self._refresh(node_id)
                continue
            except BaseException:
                self.ledgers.unexpect(node_id)
                raise
            self.ledgers.note_written(node_id, smaller, revision)
            self._written[node_id] = (revision, raw)
            self.accounts.set_ledger(node_id, smaller)
            return

    async def _sweep(self) -> None:
        """Free bookings that no assignment took up (the asker crashed or gave up)."""
        while await self.loops.sleep(BOOKING_TTL / 3):
            now = datetime.now(UTC)
            assigned = set(self.assignments.items)
            for item in list(self.ledgers.items.values()):
                old = stale(item.value, assigned, now, BOOKING_TTL)
                if old:
                    try:
                        await self._unbook(item.value.node, old)
                    except Exception as exc:
                        log.warning("could not free bookings on %s: %s", item.value.node, exc)


_Bookings = dict[int, tuple[Booking, bytes]]
"""id of an `_Asked` -> the booking of its replicas in one round, and its JSON"""


def _unpinned(placed: Placed, why: str | None) -> Placed:
    """A pinned replica the usual placement took: its reason says why the plan's node lost."""
    if why is None:
        return placed
    reason = f"{why}; placed by the usual rules: {placed.reason}"
    return placed.model_copy(update={"reason": reason})
