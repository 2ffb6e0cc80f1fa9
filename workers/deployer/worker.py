"""The deployer's thin handler: mirrors of desired and observed state, a queue of services to
reconcile, and the I/O that carries out each plan. One deployer holds the lease and acts;
other copies stand by and take over when it stops renewing."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict

from faststream.nats import NatsBroker

from corral.bus.leases import Lease
from corral.bus.lifecycle import Loops
from corral.bus.store import Mirror, Versioned
from corral.schemas.envelope import utcnow
from corral.schemas.errors import ConflictError
from corral.schemas.events import ServiceProgress
from corral.schemas.placement import PlacementReply, PlacementRequest
from corral.schemas.state import (
    Assignment,
    NodeStatus,
    ReplicaState,
    ReplicaStatus,
    ServiceRecord,
    ServiceStatus,
)
from corral.workers.deployer.planning import Plan, new_replica_ids, plan
from corral.workers.runtime import Context

log = logging.getLogger(__name__)


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
        self.nodes: Mirror[NodeStatus] = Mirror(b.nodes)
        self.status: Mirror[ServiceStatus] = Mirror(b.service_status)
        self.by_service: dict[str, dict[str, Assignment]] = defaultdict(dict)
        self.lease = Lease(b.leases, f"{ctx.settings.prefix}.deployer", ttl=lease_ttl)
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self.loops = Loops("deployer")
        self._announced: dict[str, tuple[int, str]] = {}
        self.services.listen(lambda key, _: self.mark(key))
        self.assignments.listen(self._on_assignment)
        self.replicas_by_service: dict[str, dict[str, ReplicaStatus]] = defaultdict(dict)
        self.replicas.listen(self._on_replica)
        self.nodes.listen(self._on_node)

    def register(self, broker: NatsBroker) -> None:
        return None

    async def start(self) -> None:
        for mirror in (self.services, self.assignments, self.replicas, self.nodes, self.status):
            await mirror.start()
        self.lease.start()
        self.loops.spawn(self._loop(), "reconcile")
        self.loops.spawn(self._resync(), "resync")

    async def stop(self) -> None:
        self._wake.set()
        await self.loops.stop()
        await self.lease.stop()
        for mirror in (self.status, self.nodes, self.replicas, self.assignments, self.services):
            await mirror.stop()

    # triggers ---------------------------------------------------------------------------
    def mark(self, service: str) -> None:
        self._dirty.add(service)
        self._wake.set()

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
        # a node that joins (or changes) may fit replicas that were pending
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
                self._mark_everything()
            await self._wake.wait()
            self._wake.clear()
            batch, self._dirty = self._dirty, set()
            for name in sorted(batch):
                if not self.lease.held.is_set():
                    self._dirty.update(batch)
                    break
                try:
                    await self.reconcile(name)
                except Exception:
                    log.exception("reconcile %s failed; will retry", name)
                    self._dirty.add(name)
            if self._dirty and await self.loops.sleep(0.2):
                self._wake.set()

    # reconcile ----------------------------------------------------------------------------
    async def reconcile(self, name: str) -> None:
        record = self.services.get(name)
        current = list(self.by_service.get(name, {}).values())
        statuses = {s.replica: s for s in self.replicas_by_service.get(name, {}).values()}
        record_for_plan = None if record is None or record.deleted else record
        the_plan = plan(record_for_plan, current, statuses, self._live_nodes())
        correlation = record.command_id if record else ""
        await self._remove(the_plan, correlation)
        pending, reason = 0, ""
        if the_plan.add:
            assert record_for_plan is not None
            pending, reason = await self._add(record_for_plan, the_plan, correlation)
        await self._report(name, record, pending, reason, statuses)

    def _live_nodes(self) -> set[str]:
        grace = self.ctx.settings.node_grace
        now = utcnow()
        return {
            n.id for n in self.nodes.values() if (now - n.heartbeat_at).total_seconds() <= grace
        }

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
        for result in await asyncio.gather(*writes, return_exceptions=True):
            if isinstance(result, Exception):
                # a conflict means the key moved on under us: decide again on fresh state
                if not isinstance(result, ConflictError):
                    log.warning("could not update an assignment: %s", result)
                raise result

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
            node_selector=dict(spec.placement.node_selector),
            driver="process",
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
        now = utcnow()
        writes = []
        made: list[tuple[str, Assignment]] = []
        for placed in reply.placed:
            assignment = Assignment(
                replica=placed.replica,
                service=spec.name,
                node=placed.node,
                generation=record.generation,
                template=the_plan.template,
                correlation=correlation,
                reason=placed.reason,
                assigned_at=now,
            )
            key = f"{placed.node}.{placed.replica}"
            made.append((key, assignment))
            writes.append(self.bus.buckets.assignments.create(key, assignment))
        results = await asyncio.gather(*writes, return_exceptions=True)
        for (key, assignment), result in zip(made, results, strict=True):
            if isinstance(result, int):
                self.by_service[spec.name][key] = assignment
                self.assignments.note_written(key, assignment, result)
            elif not isinstance(result, ConflictError):
                log.warning("could not write assignment %s: %s", key, result)
                self.mark(spec.name)
        return len(reply.unplaced), reply.reason

    async def _report(
        self,
        name: str,
        record: ServiceRecord | None,
        pending: int,
        reason: str,
        statuses: dict[str, ReplicaStatus],
    ) -> None:
        bucket = self.bus.buckets.service_status
        assigned = sum(1 for a in self.by_service.get(name, {}).values() if not a.draining)
        present = len(self.by_service.get(name, {}))
        if record is None or (record.deleted and present == 0 and not statuses):
            if self.status.get(name) is not None:
                await bucket.delete(name)
                self.status.note_deleted(name)
                if record is not None:
                    await self._announce(name, record, "deleted", 0, 0, 0, "")
            return
        desired = 0 if record.deleted else record.spec.replicas
        previous = self.status.get(name)
        status = ServiceStatus(
            name=name,
            observed_generation=record.generation,
            desired=desired,
            assigned=assigned,
            pending=pending,
            reason=reason,
            updated_at=utcnow(),
        )
        if (
            previous is None
            or previous.model_copy(update={"updated_at": status.updated_at}) != status
        ):
            revision = await bucket.put(name, status)
            self.status.note_written(name, status, revision)
        active = {a.replica for a in self.by_service.get(name, {}).values() if not a.draining}
        running = sum(
            1 for s in statuses.values() if s.state == ReplicaState.RUNNING and s.replica in active
        )
        if pending:
            await self._announce(name, record, "unschedulable", desired, assigned, pending, reason)
        elif not record.deleted and running == desired and assigned == desired:
            await self._announce(name, record, "ready", desired, assigned, 0, "")

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
