"""The deployer's thin handler: mirrors of desired and observed state, a queue of services to
reconcile, and the I/O that carries out each plan. One deployer holds the lease and acts;
other copies stand by and take over when it stops renewing."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict, deque
from collections.abc import Coroutine
from dataclasses import replace
from datetime import datetime
from typing import Any

from faststream.nats import NatsBroker

from corral.bus.leases import Lease
from corral.bus.lifecycle import Loops
from corral.bus.store import Mirror, SharedMirror, Versioned
from corral.schemas.commands import RollbackCommand
from corral.schemas.envelope import utcnow
from corral.schemas.errors import ConflictError
from corral.schemas.events import ReplicaEvent, RolloutEvent, ServiceProgress
from corral.schemas.placement import PlacementReply, PlacementRequest
from corral.schemas.state import (
    Assignment,
    NodeStatus,
    ReplicaStatus,
    Rollout,
    RolloutState,
    ServiceRecord,
    ServiceStatus,
    is_alive,
    next_expiry,
)
from corral.workers.deployer.evicting import evict, with_preemption
from corral.workers.deployer.planning import Plan, new_replica_ids, pinned_nodes, plan
from corral.workers.runtime import Context

log = logging.getLogger(__name__)
RECONCILE_AT_ONCE = 32
"""services reconciled concurrently (each one's own steps stay in order)"""
WRITES_IN_FLIGHT = 1024
"""assignment creates awaiting their ack at once"""
LIVE_CACHE = 0.1
"""seconds a computed set of live nodes is reused (a new or returning node resets it)"""


class DeployerWorker:
    name = "deployer"

    def __init__(self, ctx: Context, *, lease_ttl: float = 5.0) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.emitter = ctx.emitter("deployer")
        b = ctx.bus.buckets
        self.services: Mirror[ServiceRecord] = Mirror(b.services)
        self.assignments: Mirror[Assignment] = Mirror(b.assignments)
        self.replicas: Mirror[ReplicaStatus] = Mirror(b.replicas)
        self.nodes: Mirror[NodeStatus] = SharedMirror(b.nodes)
        self.status: Mirror[ServiceStatus] = Mirror(b.service_status)
        self.by_service: dict[str, dict[str, Assignment]] = defaultdict(dict)
        self.lease = Lease(b.leases, f"{ctx.settings.prefix}.deployer", ttl=lease_ttl)
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self.loops = Loops("deployer")
        self._leading_since: float | None = None
        self._lost: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._announced: dict[str, tuple[int, str]] = {}
        self._writes = asyncio.Semaphore(WRITES_IN_FLIGHT)
        self._node_shapes: dict[str, tuple[object, ...]] = {}
        """node id -> what placement reads of it, to tell a heartbeat from a change"""
        self._pending_marked_at = 0.0
        self._live: tuple[float, set[str]] | None = None
        """the live nodes as last computed (loop time, ids), reused for LIVE_CACHE seconds"""
        self.services.listen(lambda key, _: self.mark(key))
        self.assignments.listen(self._on_assignment)
        self.replicas_by_service: dict[str, dict[str, ReplicaStatus]] = defaultdict(dict)
        self.replicas.listen(self._on_replica)
        self.preempted: dict[str, str] = {}
        """service -> the preemption that evicted some of its replicas, while it is pending"""
        self.nodes.listen(self._on_node)

    def register(self, broker: NatsBroker) -> None:
        return None

    async def start(self) -> None:
        for mirror in (self.services, self.assignments, self.replicas, self.nodes, self.status):
            await mirror.start()
        self.lease.start()
        self.loops.spawn(self._loop(), "reconcile")
        self.loops.spawn(self._resync(), "resync")
        self.loops.spawn(self._watch_nodes(), "node-liveness")

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._wake.set()
        await self.loops.stop()
        await self.lease.stop()
        for mirror in (self.status, self.nodes, self.replicas, self.assignments, self.services):
            await mirror.stop()

    # triggers ---------------------------------------------------------------------------
    def mark(self, service: str) -> None:
        self._dirty.add(service)
        self._wake.set()

    def _mark_later(self, service: str, delay: float) -> None:
        """Reconcile `service` again after `delay` seconds (one timer per service: the
        earliest wins)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        timer = self._timers.get(service)
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()

        def fire() -> None:
            self._timers.pop(service, None)
            self.mark(service)

        self._timers[service] = loop.call_at(when, fire)

    async def _watch_nodes(self) -> None:
        """Notice a node going silent when its grace runs out, not at the next resync: sleep
        until the earliest heartbeat would expire, then look again."""
        grace = self.ctx.settings.node_grace
        while self.loops.running:
            delay = next_expiry(self.nodes.values(), utcnow(), grace)
            if not await self.loops.sleep(max(0.05, delay + 0.01)):
                return
            live = self._live_nodes()
            if live is None:
                continue
            lost = {n.id for n in self.nodes.values()} - live
            if lost != self._lost:
                changed = lost ^ self._lost
                self._lost = lost
                for service, keys in self.by_service.items():
                    if any(a.node in changed for a in keys.values()):
                        self.mark(service)

    def _on_assignment(self, key: str, item: Versioned[Assignment] | None) -> None:
        if item is None:
            for service, keys in self.by_service.items():
                if keys.pop(key, None) is not None:
                    self.mark(service)
                    break
            return
        self.by_service[item.value.service][key] = item.value
        self.mark(item.value.service)

    def _on_replica(self, key: str, item: Versioned[ReplicaStatus] | None) -> None:
        service = key.split(".", 1)[0]
        if item is None:
            self.replicas_by_service[service].pop(key, None)
        else:
            self.replicas_by_service[service][key] = item.value
        self.mark(service)

    def _mark_everything(self) -> None:
        for name in list(self.services.items) + list(self.by_service):
            self.mark(name)

    def _on_node(self, key: str, item: Versioned[NodeStatus] | None) -> None:
        # a node that joins, changes or comes back may fit replicas that were pending; a
        # plain heartbeat retries them at most once per heartbeat interval (with 1,000 nodes,
        # looking at every service on every heartbeat cost a core)
        if item is None:
            self._node_shapes.pop(key, None)
            self._live = None
            return
        n = item.value
        shape = (n.labels, n.capacity, n.drivers, n.draining)
        changed = self._node_shapes.get(key) != shape or key in self._lost
        self._node_shapes[key] = shape
        if changed or (self._live is not None and key not in self._live[1]):
            self._live = None
        now = asyncio.get_running_loop().time()
        if not changed and now - self._pending_marked_at < self.ctx.settings.heartbeat_interval:
            return
        self._pending_marked_at = now
        for status in self.status.values():
            if status.pending:
                self.mark(status.name)

    async def _resync(self) -> None:
        while await self.loops.sleep(self.ctx.settings.resync_interval):
            self._mark_everything()

    async def _loop(self) -> None:
        leading = False
        while self.loops.running:
            if not self.lease.held.is_set():
                leading = False
                await self.lease.held.wait()
            if not leading:
                # a new leader trusts nothing it saw while standing by: look at everything
                leading = True
                self._leading_since = asyncio.get_running_loop().time()
                self._mark_everything()
            await self._wake.wait()
            self._wake.clear()
            batch, self._dirty = self._dirty, set()
            # services are independent: several reconcile at once, so that their placement
            # requests reach the scheduler together and are solved in one batch
            names = sorted(batch)
            results: list[bool] = []
            for i in range(0, len(names), RECONCILE_AT_ONCE):
                chunk = names[i : i + RECONCILE_AT_ONCE]
                results += await asyncio.gather(*(self._reconcile_one(n) for n in chunk))
            failed = not all(results)
            if not self._dirty:
                continue
            # what changed while we worked goes at once; after a failure, pause a little
            if not failed or await self.loops.sleep(0.2):
                self._wake.set()

    async def _reconcile_one(self, name: str) -> bool:
        """Reconcile one service; False when it failed (it is marked to try again)."""
        if not self.lease.held.is_set():
            self._dirty.add(name)
            return True
        try:
            await self.reconcile(name)
        except Exception:
            log.exception("reconcile %s failed; will retry", name)
            self._dirty.add(name)
            return False
        return True

    # reconcile ----------------------------------------------------------------------------
    async def reconcile(self, name: str) -> None:
        record = self.services.get(name)
        current = list(self.by_service.get(name, {}).values())
        statuses = {s.replica: s for s in self.replicas_by_service.get(name, {}).values()}
        record_for_plan = None if record is None or record.deleted else record
        now = utcnow()
        rollout = self._rollout(record_for_plan, self.status.get(name), now)
        progressing = rollout is not None and rollout.state == RolloutState.PROGRESSING
        # a first revision has nothing to fall back to: its crashes are the restart policy's
        under_way = (
            rollout is not None
            and rollout.from_revision > 0
            and rollout.state in (RolloutState.PROGRESSING, RolloutState.PAUSED)
        )
        live = self._live_nodes()
        if live is not None:
            suspects = {a.node for a in current if a.node not in live and not a.draining}
            if suspects:
                live = live | await self._still_alive(suspects)
        the_plan = plan(
            record_for_plan,
            current,
            statuses,
            live,
            now=now,
            rollout_started=rollout.started_at if under_way and rollout is not None else None,
            check_deadline=progressing,
        )
        if rollout is not None and rollout.state == RolloutState.FAILED:
            # a failed rollout holds where it stopped until a rollback or a new deploy
            the_plan = replace(the_plan, drain=[], add=0)
        correlation = record.command_id if record else ""
        await self._remove(the_plan, correlation)
        pending, reason = 0, ""
        if the_plan.add:
            assert record_for_plan is not None
            pending, reason = await self._add(record_for_plan, the_plan, correlation)
        if the_plan.recheck_after is not None:
            self._mark_later(name, the_plan.recheck_after + 0.01)
        await self._report(name, record, the_plan, rollout, pending, reason)

    def _live_nodes(self) -> set[str] | None:
        """Nodes whose heartbeat is within the grace, or None while this deployer has led for
        less than the grace: after a restart, agents need that long to be heard again."""
        grace = self.ctx.settings.node_grace
        if self._leading_since is None:
            return None
        clock = asyncio.get_running_loop().time()
        if clock - self._leading_since < grace:
            return None
        if self._live is not None and clock - self._live[0] < LIVE_CACHE:
            return self._live[1]
        now = self.nodes.as_of(utcnow())  # behind a backlog, heartbeats only look old
        live = {n.id for n in self.nodes.values() if is_alive(n, now, grace)}
        self._live = (clock, live)
        return live

    async def _still_alive(self, suspects: set[str]) -> set[str]:
        """Of nodes whose mirrored heartbeat is too old, those the bucket says are alive.

        Replacing a node's replicas is drastic, and a mirror lags behind the bus when this
        process is busy: the heartbeat in the bucket is read before anything is evicted.
        """
        grace = self.ctx.settings.node_grace
        found = await asyncio.gather(
            *(self.bus.buckets.nodes.get(node) for node in sorted(suspects)),
            return_exceptions=True,
        )
        now = utcnow()
        alive: set[str] = set()
        for node, item in zip(sorted(suspects), found, strict=True):
            if isinstance(item, BaseException):
                raise item
            if item is not None and is_alive(item.value, now, grace):
                alive.add(node)
                self.nodes.note_written(node, item.value, item.revision)
        if alive:
            self._live = None
        return alive

    def _rollout(
        self, record: ServiceRecord | None, previous: ServiceStatus | None, now: datetime
    ) -> Rollout | None:
        """The rollout of the record's revision: the one under way, or a new one."""
        if record is None:
            return None
        if (
            previous is not None
            and previous.rollout is not None
            and previous.rollout.revision == record.revision
        ):
            return previous.rollout
        replaced = previous.revision if previous is not None else 0
        return Rollout(
            revision=record.revision,
            from_revision=replaced if replaced != record.revision else 0,
            state=RolloutState.PROGRESSING,
            started_at=now,
        )

    async def _remove(self, the_plan: Plan, correlation: str) -> None:
        writes = []
        for assignment in the_plan.drain:
            key = f"{assignment.node}.{assignment.replica}"
            item = self.assignments.items.get(key)
            if item is None:
                continue
            marked = assignment.model_copy(
                update={"draining": True, "correlation": correlation or assignment.correlation}
            )
            writes.append(self._drain_one(key, marked, item.revision))
        for assignment in the_plan.forget:
            key = f"{assignment.node}.{assignment.replica}"
            writes.append(self._forget_one(key, assignment.service))
        for assignment in the_plan.lost:
            writes.append(self._replace_lost(assignment, correlation))
        for result in await asyncio.gather(*writes, return_exceptions=True):
            if isinstance(result, Exception):
                # a conflict means the key moved on under us: decide again on fresh state
                if not isinstance(result, ConflictError):
                    log.warning("could not update an assignment: %s", result)
                raise result

    async def _replace_lost(self, assignment: Assignment, correlation: str) -> None:
        """The node went silent: forget the replica there, so that a replacement is placed
        elsewhere now, and its agent stops the stale one if the node ever comes back."""
        key = f"{assignment.node}.{assignment.replica}"
        await self._forget_one(key, assignment.service)
        node = self.nodes.get(assignment.node)
        silent = (
            f" (no heartbeat for {(utcnow() - node.heartbeat_at).total_seconds():.1f}s)"
            if node is not None
            else ""
        )
        data = ReplicaEvent(
            replica=assignment.replica,
            service=assignment.service,
            node=assignment.node,
            generation=assignment.generation,
            state="lost",
            message=f"node {assignment.node} lost{silent}; placing a replacement on another node",
            at=utcnow(),
        )
        await self.emitter.emit(
            "replica",
            assignment.service,
            "lost",
            data,
            correlation=correlation or assignment.correlation or None,
            event_id=f"{assignment.replica}.lost",
        )

    async def _drain_one(self, key: str, marked: Assignment, revision: int) -> None:
        new_revision = await self.bus.buckets.assignments.update(key, marked, revision)
        self.by_service[marked.service][key] = marked
        self.assignments.note_written(key, marked, new_revision)

    async def _forget_one(self, key: str, service: str) -> None:
        await self.bus.buckets.assignments.delete(key)
        self.by_service[service].pop(key, None)
        self.assignments.note_deleted(key)

    async def _add(
        self, record: ServiceRecord, the_plan: Plan, correlation: str
    ) -> tuple[int, str]:
        spec = record.spec
        taken = {a.replica for a in self.by_service.get(spec.name, {}).values()}
        replica_ids = new_replica_ids(spec.name, the_plan.add, taken)
        request = PlacementRequest(
            service=spec.name,
            replicas=replica_ids,
            resources=spec.resources.as_dict(),
            placement=spec.placement,
            driver=spec.driver,
            pinned=pinned_nodes(record, list(self.by_service.get(spec.name, {}).values())),
            preempt=True,
        )
        try:
            response = await self.bus.nc.request(
                self.bus.names.place, request.model_dump_json().encode(), timeout=5.0
            )
        except Exception as exc:
            reason = f"scheduler did not answer: {exc.__class__.__name__}"
            log.warning("%s: %s", spec.name, reason)
            self.mark(spec.name)
            return the_plan.add, reason
        reply = PlacementReply.model_validate(json.loads(response.data))
        if reply.error:
            return the_plan.add, f"scheduler error: {reply.error}"
        assert the_plan.template is not None
        # preemption: the victims go first; a node where one could not be evicted gets none
        blocked = await evict(self, reply.evictions, correlation) if reply.evictions else set()
        kept = [p for p in reply.placed if p.node not in blocked]
        waits: dict[str, list[str]] = {}
        for eviction in reply.evictions:
            waits.setdefault(eviction.node, []).append(eviction.replica)
        now = utcnow()
        made: list[tuple[str, Assignment]] = []
        for placed in kept:
            assignment = Assignment(
                replica=placed.replica,
                service=spec.name,
                node=placed.node,
                generation=record.generation,
                template=the_plan.template,
                correlation=correlation,
                reason=placed.reason,
                assigned_at=now,
                waits_for=waits.get(placed.node, []),
            )
            made.append((f"{placed.node}.{placed.replica}", assignment))
        results = await self._create_all(made)
        for (key, assignment), result in zip(made, results, strict=True):
            if isinstance(result, int):
                self.by_service[spec.name][key] = assignment
                self.assignments.note_written(key, assignment, result)
            elif not isinstance(result, ConflictError):
                log.warning("could not write assignment %s: %s", key, result)
                self.mark(spec.name)
        if len(kept) < len(reply.placed):
            self.mark(spec.name)
            pending = len(reply.unplaced) + len(reply.placed) - len(kept)
            return pending, reply.reason or "could not evict for a preemption; will try again"
        return len(reply.unplaced), reply.reason

    async def _create_all(self, made: list[tuple[str, Assignment]]) -> list[int | Exception]:
        """Write new assignments: each one's revision, or why it failed. They go out back to
        back, with no task per write (at 100,000 replicas a task, a gather slot and a
        semaphore wait per write were a tenth of the deployer), and at most WRITES_IN_FLIGHT
        await their acks across the deployer: a write that times out under a flood may still
        have landed, and its service is then planned again on a view that lacks it (the
        surplus is drained later: churn that a bounded flood avoids). A writer that finds the
        bound reached settles its own oldest writes first, so writers never wait on each
        other's slots while holding their own."""
        bucket = self.bus.buckets.assignments
        results: list[int | Exception] = []
        sent: deque[tuple[int, str, Coroutine[Any, Any, int]]] = deque()
        try:
            for key, assignment in made:
                results.append(ConnectionError("not written"))
                raw = bucket.encode(assignment)
                while sent and self._writes.locked():
                    await self._settle(sent.popleft(), results)
                await self._writes.acquire()
                self.assignments.expect(key, assignment, raw)
                try:
                    ack = await bucket.create_started(key, assignment, raw=raw)
                except Exception as exc:
                    self._writes.release()
                    self.assignments.unexpect(key)
                    results[-1] = exc
                    continue
                sent.append((len(results) - 1, key, ack))
            while sent:
                await self._settle(sent.popleft(), results)
        finally:
            for _, key, ack in sent:  # cancelled: these acks are nobody's any more
                ack.close()
                self._writes.release()
                self.assignments.unexpect(key)
        return results

    async def _settle(
        self, entry: tuple[int, str, Coroutine[Any, Any, int]], results: list[int | Exception]
    ) -> None:
        index, key, ack = entry
        try:
            results[index] = await ack
        except Exception as exc:
            results[index] = exc
            self.assignments.unexpect(key)
        except BaseException:
            self.assignments.unexpect(key)
            raise
        finally:
            self._writes.release()

    async def _report(
        self,
        name: str,
        record: ServiceRecord | None,
        the_plan: Plan,
        rollout: Rollout | None,
        pending: int,
        reason: str,
    ) -> None:
        bucket = self.bus.buckets.service_status
        assigned = sum(1 for a in self.by_service.get(name, {}).values() if not a.draining)
        present = len(self.by_service.get(name, {}))
        has_statuses = bool(self.replicas_by_service.get(name))
        if record is None or (record.deleted and present == 0 and not has_statuses):
            if self.status.get(name) is not None:
                await bucket.delete(name)
                self.status.note_deleted(name)
                if record is not None:
                    await self._announce(name, record, "deleted", 0, 0, 0, "")
            return
        desired = 0 if record.deleted else record.spec.replicas
        if rollout is not None and not record.deleted:
            rollout = await self._advance(record, rollout, the_plan, desired, pending)
        previous = self.status.get(name)
        reason = with_preemption(self, name, previous.reason if previous else "", pending, reason)
        status = ServiceStatus(
            name=name,
            observed_generation=record.generation,
            desired=desired,
            assigned=assigned,
            pending=pending,
            reason=reason,
            updated_at=utcnow(),
            ready=the_plan.ready,
            revision=record.revision,
            rollout=rollout,
        )
        if (
            previous is None
            or previous.model_copy(update={"updated_at": status.updated_at}) != status
        ):
            revision = await bucket.put(name, status)
            self.status.note_written(name, status, revision)
        if pending:
            await self._announce(name, record, "unschedulable", desired, assigned, pending, reason)
        elif (
            not record.deleted
            and the_plan.ready == desired
            and the_plan.old == 0
            and assigned == desired
        ):
            await self._announce(name, record, "ready", desired, assigned, 0, "")

    async def _advance(
        self, record: ServiceRecord, rollout: Rollout, the_plan: Plan, desired: int, pending: int
    ) -> Rollout:
        """Move the rollout on from what the plan saw, and say so once per change."""
        if rollout.state in (RolloutState.COMPLETE, RolloutState.FAILED):
            return rollout
        now = utcnow()
        if the_plan.failure:
            automatic = (
                record.spec.update.auto_rollback
                and not record.rollback_of
                and rollout.from_revision > 0
            )
            action = (
                f"rolling back to revision {rollout.from_revision}"
                if automatic
                else "holding: auto_rollback is off"
                if rollout.from_revision and not record.rollback_of
                else "holding: this revision is itself a rollback"
            )
            rollout = rollout.model_copy(
                update={
                    "state": RolloutState.FAILED,
                    "reason": f"{the_plan.failure}; {action}",
                    "finished_at": now,
                }
            )
            await self._rollout_event(record, rollout, "rollout_failed", desired)
            if automatic:
                await self.emitter.command(
                    "service",
                    record.spec.name,
                    "rollback",
                    RollbackCommand(
                        to_revision=rollout.from_revision,
                        expected_revision=record.revision,
                        reason=the_plan.failure,
                    ),
                    command_id=f"{record.command_id}.rollback",
                    correlation=record.command_id,
                )
            return rollout
        if the_plan.paused:
            if rollout.state != RolloutState.PAUSED:
                rollout = rollout.model_copy(
                    update={
                        "state": RolloutState.PAUSED,
                        "reason": f"canary of {the_plan.ready} replica(s) ready; "
                        f"`corral promote {record.spec.name}` or `corral rollback`",
                    }
                )
                await self._rollout_event(record, rollout, "rollout_paused", desired)
            return rollout
        if the_plan.old == 0 and the_plan.ready == desired and pending == 0:
            rollout = rollout.model_copy(
                update={"state": RolloutState.COMPLETE, "reason": "", "finished_at": now}
            )
            if rollout.from_revision:
                await self._rollout_event(record, rollout, "rollout_complete", desired)
            return rollout
        if rollout.state == RolloutState.PAUSED:
            rollout = rollout.model_copy(update={"state": RolloutState.PROGRESSING, "reason": ""})
        elif rollout.from_revision and the_plan.old and rollout.reason == "":
            rollout = rollout.model_copy(
                update={"reason": f"replacing revision {rollout.from_revision}"}
            )
            await self._rollout_event(record, rollout, "rollout_started", desired)
        return rollout

    async def _rollout_event(
        self, record: ServiceRecord, rollout: Rollout, what: str, desired: int
    ) -> None:
        data = RolloutEvent(
            name=record.spec.name,
            generation=record.generation,
            revision=rollout.revision,
            from_revision=rollout.from_revision,
            state=rollout.state.value,
            reason=rollout.reason,
            desired=desired,
            rollback_of=record.rollback_of,
        )
        await self.emitter.emit(
            "service",
            record.spec.name,
            what,
            data,
            correlation=record.command_id or None,
            event_id=f"{record.command_id}.{what}" if record.command_id else None,
        )

    async def _announce(
        self,
        name: str,
        record: ServiceRecord,
        what: str,
        desired: int,
        assigned: int,
        pending: int,
        reason: str,
    ) -> None:
        """One event per (generation, kind of news), so followers see changes, not noise."""
        marker = (record.generation, f"{what}:{pending}:{reason}")
        if self._announced.get(name) == marker:
            return
        self._announced[name] = marker
        data = ServiceProgress(
            name=name,
            generation=record.generation,
            desired=desired,
            assigned=assigned,
            pending=pending,
            reason=reason,
        )
        await self.emitter.emit(
            "service",
            name,
            what,
            data,
            correlation=record.command_id or None,
            event_id=f"{record.command_id}.{what}.{pending}" if record.command_id else None,
        )
