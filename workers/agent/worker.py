"""The agent's thin handler: reconcile what is assigned to this node against what its driver
runs, restart what exits (with backoff), heartbeat, and report every change."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from faststream.nats import NatsBroker

from corral.bus.lifecycle import Loops
from corral.bus.store import Mirror
from corral.schemas.envelope import utcnow
from corral.schemas.events import ReplicaEvent
from corral.schemas.spec import Resources
from corral.schemas.state import Assignment, NodeStatus, ReplicaState, ReplicaStatus
from corral.workers.agent.drivers.base import Driver, DriverError, Launch, Started
from corral.workers.runtime import Context

log = logging.getLogger(__name__)
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
HEALTHY_RESET = 60.0
SHUTDOWN_GRACE_CAP = 10.0


@dataclass
class _Replica:
    restarts: int = 0
    failures: int = 0
    not_before: float = 0.0
    started_at: float = 0.0
    started: Started | None = None
    """set while the replica runs but its `running` status is not yet written"""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class AgentWorker:
    name = "agent"

    def __init__(
        self,
        ctx: Context,
        driver: Driver,
        *,
        node_id: str,
        capacity: Resources,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.driver = driver
        self.node_id = node_id
        self.capacity = capacity
        self.labels = labels or {}
        self.emitter = ctx.emitter(f"agent/{node_id}")
        self.assignments: Mirror[Assignment] = Mirror(
            ctx.bus.buckets.assignments, prefix=f"{node_id}.>"
        )
        self.assignments.listen(lambda key, _: self.mark(key.split(".", 1)[1]))
        self._replicas: dict[str, _Replica] = {}
        self._services: dict[str, str] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self.loops = Loops(f"agent {node_id}")
        self._timers: set[asyncio.TimerHandle] = set()
        self._started_at = utcnow()
        self._stopping = False

    def register(self, broker: NatsBroker) -> None:
        return None

    # lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self._heartbeat_once()
        previous = {
            s.replica: s
            for s in (v.value for v in (await self.bus.buckets.replicas.items()).values())
            if s.node == self.node_id
        }
        stale = await self.driver.clean_stale(
            {r: s.pid for r, s in previous.items() if s.pid is not None}
        )
        if stale:
            log.info("%s: stopped %d replicas left by a previous agent", self.node_id, len(stale))
        for replica, status in previous.items():
            self._services[replica] = status.service
            self.mark(replica)
        await self.assignments.start()
        for key in list(self.assignments.items):
            self.mark(key.split(".", 1)[1])
        self.loops.spawn(self._loop(), "reconcile")
        self.loops.spawn(self._heartbeat(), "heartbeat")

    async def stop(self) -> None:
        self._stopping = True
        for timer in self._timers:
            timer.cancel()
        self._wake.set()
        await self.loops.stop()
        await self.assignments.stop()
        await asyncio.gather(
            *(self._shutdown_replica(r) for r in self.driver.running()), return_exceptions=True
        )
        await self.driver.close()

    async def _shutdown_replica(self, replica: str) -> None:
        assignment = self.assignments.get(f"{self.node_id}.{replica}")
        grace = min(
            assignment.template.stop_grace_period if assignment else 5.0, SHUTDOWN_GRACE_CAP
        )
        code = await self.driver.stop(replica, grace)
        if assignment is not None:
            await self._report(
                assignment,
                ReplicaState.STOPPED,
                exit_code=code,
                message="node agent stopped",
                event="stopped",
            )

    # triggers ---------------------------------------------------------------------------
    def mark(self, replica: str) -> None:
        self._dirty.add(replica)
        self._wake.set()

    def _mark_later(self, replica: str, delay: float) -> None:
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def fire() -> None:
            if timer is not None:
                self._timers.discard(timer)
            self.mark(replica)

        timer = loop.call_later(delay, fire)
        self._timers.add(timer)

    async def _loop(self) -> None:
        while self.loops.running:
            await self._wake.wait()
            self._wake.clear()
            batch, self._dirty = self._dirty, set()
            results = await asyncio.gather(
                *(self._reconcile(replica) for replica in batch), return_exceptions=True
            )
            for replica, result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    log.error("%s: reconcile %s failed: %r", self.node_id, replica, result)
                    self._mark_later(replica, 1.0)

    async def _heartbeat_once(self) -> None:
        status = NodeStatus(
            id=self.node_id,
            labels=self.labels,
            capacity=self.capacity,
            drivers=list(self.driver.provides),
            runtime=self.driver.name,
            heartbeat_at=utcnow(),
            started_at=self._started_at,
        )
        await self.bus.buckets.nodes.put(self.node_id, status)

    async def _heartbeat(self) -> None:
        while await self.loops.sleep(self.ctx.settings.heartbeat_interval):
            try:
                await self._heartbeat_once()
            except Exception as exc:
                log.warning("%s: heartbeat failed: %s", self.node_id, exc)

    # reconcile ----------------------------------------------------------------------------
    async def _reconcile(self, replica: str) -> None:
        state = self._replicas.setdefault(replica, _Replica())
        async with state.lock:
            if self._stopping:
                return
            assignment = self.assignments.get(f"{self.node_id}.{replica}")
            running = replica in self.driver.running()
            if assignment is not None and not assignment.draining:
                self._services[replica] = assignment.service
                if not running:
                    await self._start(assignment, state)
                elif state.started is not None:
                    await self._report_running(assignment, state)  # an earlier write failed
                return
            if assignment is not None:
                # draining: stop it, say so with the command that asked, then drop the status
                if running:
                    code = await self.driver.stop(replica, assignment.template.stop_grace_period)
                    await self._event(
                        assignment.service,
                        replica,
                        "stopped",
                        ReplicaState.STOPPED,
                        assignment.generation,
                        exit_code=code,
                        message="scaled in or replaced",
                        correlation=assignment.correlation,
                    )
                await self.bus.buckets.replicas.delete(f"{assignment.service}.{replica}")
                self._services.pop(replica, None)
                self._replicas.pop(replica, None)
                return
            service = self._services.get(replica)
            if running:
                grace = 10.0
                code = await self.driver.stop(replica, grace)
                log.info("%s: stopped %s (exit %s)", self.node_id, replica, code)
            if service is not None:
                await self.bus.buckets.replicas.delete(f"{service}.{replica}")
                if running:
                    await self._event(
                        service,
                        replica,
                        "stopped",
                        ReplicaState.STOPPED,
                        0,
                        exit_code=None,
                        message="no longer assigned",
                    )
                self._services.pop(replica, None)
            self._replicas.pop(replica, None)

    async def _start(self, assignment: Assignment, state: _Replica) -> None:
        wait = state.not_before - time.monotonic()
        if wait > 0:
            self._mark_later(assignment.replica, wait)
            return
        launch = Launch(assignment.replica, assignment.service, self.node_id, assignment.template)
        try:
            started = await self.driver.start(launch)
        except DriverError as exc:
            state.failures += 1
            delay = self._backoff(state)
            await self._report(
                assignment,
                ReplicaState.FAILED,
                message=f"{exc}; retry in {delay:.0f}s",
                event="failed",
                restarts=state.restarts,
            )
            self._mark_later(assignment.replica, delay)
            return
        state.started_at = time.monotonic()
        state.started = started
        await self._report_running(assignment, state)

    async def _report_running(self, assignment: Assignment, state: _Replica) -> None:
        started = state.started
        assert started is not None
        await self._report(
            assignment,
            ReplicaState.RUNNING,
            pid=started.pid,
            ports=started.ports,
            event="started",
            restarts=state.restarts,
        )
        state.started = None

    def _backoff(self, state: _Replica) -> float:
        delay = float(min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** max(0, state.failures - 1)))
        state.not_before = time.monotonic() + delay
        return delay

    async def on_exit(self, replica: str, code: int) -> None:
        """The driver saw a replica end on its own: report it, then restart with backoff."""
        state = self._replicas.setdefault(replica, _Replica())
        assignment = self.assignments.get(f"{self.node_id}.{replica}")
        if assignment is None or self._stopping:
            self.mark(replica)
            return
        if state.started_at and time.monotonic() - state.started_at > HEALTHY_RESET:
            state.failures = 0
        state.failures += 1
        state.restarts += 1
        delay = self._backoff(state)
        what = "exited" if code == 0 else "failed"
        await self._report(
            assignment,
            ReplicaState.EXITED if code == 0 else ReplicaState.FAILED,
            exit_code=code,
            message=f"exited with code {code}; restart in {delay:.0f}s",
            event=what,
            restarts=state.restarts,
        )
        self._mark_later(replica, delay)

    async def _report(
        self,
        assignment: Assignment,
        state: ReplicaState,
        *,
        event: str,
        pid: int | None = None,
        ports: dict[str, int] | None = None,
        exit_code: int | None = None,
        message: str = "",
        restarts: int = 0,
    ) -> None:
        now = utcnow()
        status = ReplicaStatus(
            replica=assignment.replica,
            service=assignment.service,
            node=self.node_id,
            generation=assignment.generation,
            state=state,
            pid=pid,
            ports=ports or {},
            exit_code=exit_code,
            restarts=restarts,
            message=message,
            started_at=now if state == ReplicaState.RUNNING else None,
            updated_at=now,
        )
        await self.bus.buckets.replicas.put(f"{assignment.service}.{assignment.replica}", status)
        await self._event(
            assignment.service,
            assignment.replica,
            event,
            state,
            assignment.generation,
            pid=pid,
            ports=ports or {},
            exit_code=exit_code,
            message=message,
            correlation=assignment.correlation,
        )

    async def _event(
        self,
        service: str,
        replica: str,
        what: str,
        state: ReplicaState,
        generation: int,
        *,
        pid: int | None = None,
        ports: dict[str, int] | None = None,
        exit_code: int | None,
        message: str,
        correlation: str = "",
    ) -> None:
        data = ReplicaEvent(
            replica=replica,
            service=service,
            node=self.node_id,
            generation=generation,
            state=state.value,
            pid=pid,
            ports=ports or {},
            exit_code=exit_code,
            message=message,
            at=utcnow(),
        )
        await self.emitter.emit("replica", service, what, data, correlation=correlation or None)
