"""The agent's thin handler: reconcile what is assigned to this node against what its drivers
run, probe health, restart by the spec's policy (with backoff), heartbeat, and report every
change. Restarts happen here, on the node, as a kubelet does: no round trip to another worker
stands between a crash and its replacement."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime

from faststream.nats import NatsBroker

from corral.bus.lifecycle import Loops
from corral.bus.store import Mirror, Versioned
from corral.schemas.envelope import utcnow
from corral.schemas.events import ReplicaEvent
from corral.schemas.spec import Resources
from corral.schemas.state import Assignment, NodeStatus, ReplicaState, ReplicaStatus
from corral.workers.agent.assignments import AssignmentReader
from corral.workers.agent.drivers.base import Driver, DriverError, Launch, Started
from corral.workers.agent.jobs import JobRunner
from corral.workers.agent.probes import Prober, ProbeResult
from corral.workers.agent.reconciling import ReconcilePool
from corral.workers.runtime import Context

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_CAP = 10.0
JITTER = 0.1
"""restart delays vary by up to this share either way, so replicas that crashed together do
not all come back in the same instant"""
HEARTBEATS_IN_FLIGHT = 3
"""heartbeats awaiting their ack at once; past that a beat is skipped"""
ACK_EVERY = 10
"""one heartbeat in this many asks the bus for an ack (so a bus that stopped storing them is
noticed and logged); the others are sent without one: the next beat supersedes a lost one"""
_READER = AssignmentReader()
"""one per process: the agents it hosts are assigned the same services' templates"""
RETRY_FAILED_AFTER = 1.0
"""seconds before a replica whose reconcile failed is reconciled again"""


@dataclass
class _Replica:
    restarts: int = 0
    failures: int = 0
    """crashes since the replica last stayed ready for `restart.reset_after`"""
    not_before: float = 0.0
    started: Started | None = None
    """set while the replica runs but its `running` status is not yet written"""
    ports: dict[str, int] = field(default_factory=dict)
    pid: int | None = None
    ready_at: datetime | None = None
    ready_mono: float | None = None
    finished: bool = False
    """exited and, by its restart policy, not to be started again"""
    prober: Prober | None = None
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
            ctx.bus.buckets.assignments, prefix=f"{node_id}.>", decode=_READER
        )
        self.assignments.listen(self._on_assignment)
        self._replicas: dict[str, _Replica] = {}
        self._services: dict[str, str] = {}
        self._queued: set[str] = set()
        """replicas marked and waiting in the process's reconcile queue (or, before the
        agent is up, for it)"""
        self._pool: ReconcilePool | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._waiters: dict[str, set[str]] = {}
        """replica -> the preemptors' replicas here that wait for it to go"""
        self.loops = Loops(f"agent {node_id}")
        self._timers: set[asyncio.TimerHandle] = set()
        self._started_at = utcnow()
        self._stopping = False
        self._simulated = driver.name == "fake"
        self.jobs: JobRunner | None = None
        """runs pipeline jobs on this node (a real node only); make_agent sets it"""

    def register(self, broker: NatsBroker) -> None:
        return None

    # lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self._come_up()
        except BaseException:
            pool, self._pool = self._pool, None
            if pool is not None:
                await pool.leave(self)
            raise

    async def _come_up(self) -> None:
        await self._heartbeat_once()
        previous = {
            s.replica: s
            for s in (v.value for v in (await self.bus.buckets.replicas.items()).values())
            if s.node == self.node_id
        }
        await self.assignments.start()
        assigned = {a.replica: a for a in (v.value for v in self.assignments.items.values())}
        claimed = {
            replica: (previous[replica].pid if replica in previous else None)
            for replica, a in assigned.items()
            if not a.draining
        }
        # a previous agent's replicas: adopt what the driver can (containers), stop the rest
        recovered = await self.driver.recover(claimed)
        if recovered.removed:
            log.info(
                "%s: removed %d replicas a previous agent left",
                self.node_id,
                len(recovered.removed),
            )
        for replica, started in recovered.adopted.items():
            state = self._replicas.setdefault(replica, _Replica())
            state.started = started
            state.ports = dict(started.ports)
            state.pid = started.pid
            old = previous.get(replica)
            if old is not None:
                state.restarts = old.restarts
        for replica, status in previous.items():
            self._services[replica] = status.service
            self.mark(replica)
        for replica in assigned:
            self.mark(replica)
        # only now: a reconcile before the driver recovered the predecessor's replicas would
        # start a second container for one it is about to adopt
        self._pool = ReconcilePool.joined(self)
        for replica in list(self._queued):
            self._pool.put(self, replica)
        self.loops.spawn(self._heartbeat(), "heartbeat")
        if not self._simulated:
            self.loops.spawn(self._report_usage(), "usage")
        if self.jobs is not None:
            await self.jobs.start()

    async def stop(self) -> None:
        self._stopping = True
        if self.jobs is not None:
            await self.jobs.stop()
        for timer in self._timers:
            timer.cancel()
        # what is still queued is skipped (see `_stopping`); a reconcile under way ends first,
        # for at most the grace: one in the middle of starting a replica would otherwise
        # start it after the shutdown below
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), SHUTDOWN_GRACE_CAP)
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.leave(self)
        await self.loops.stop()
        await asyncio.gather(*(self._stop_probe(r) for r in list(self._replicas)))
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
        """Queue a reconcile of `replica` (once, however often it is marked before it runs).
        Until the agent is up, marked replicas wait here and go to the pool together."""
        if replica in self._queued:
            return
        self._queued.add(replica)
        if self._pool is not None:
            self._pool.put(self, replica)

    async def reconcile_queued(self, replica: str) -> None:
        """Run by the process's reconcile pool: a failure is logged and tried again later."""
        self._queued.discard(replica)
        if self._stopping:
            return
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._reconcile(replica)
        except Exception as exc:
            log.error("%s: reconcile %s failed: %r", self.node_id, replica, exc)
            self._mark_later(replica, RETRY_FAILED_AFTER)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    def _on_assignment(self, key: str, item: Versioned[Assignment] | None) -> None:
        replica = key.split(".", 1)[1]
        self.mark(replica)
        if item is not None:
            for victim in item.value.waits_for:
                self._waiters.setdefault(victim, set()).add(replica)
            return
        # a preempted replica is gone: those that waited for its room may start now
        for waiter in self._waiters.pop(replica, ()):
            self.mark(waiter)

    def _waiting(self, assignment: Assignment) -> bool:
        """A preemptor's replica starts once the replicas evicted for it have left."""
        return any(f"{self.node_id}.{r}" in self.assignments.items for r in assignment.waits_for)

    def _mark_later(self, replica: str, delay: float) -> None:
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def fire() -> None:
            if timer is not None:
                self._timers.discard(timer)
            self.mark(replica)

        timer = loop.call_later(delay, fire)
        self._timers.add(timer)

    async def _heartbeat_once(self, *, acked: bool = True) -> None:
        status = NodeStatus(
            id=self.node_id,
            labels=self.labels,
            capacity=self.capacity,
            drivers=list(self.driver.provides),
            runtime=self.driver.name,
            heartbeat_at=utcnow(),
            started_at=self._started_at,
        )
        if acked:
            await self.bus.buckets.nodes.put(self.node_id, status)
        else:
            await self.bus.buckets.nodes.send(self.node_id, status)

    async def _heartbeat(self) -> None:
        """One heartbeat per interval. Most go without an ack (ACK_EVERY); one in ten asks
        for one, in a task of its own: on a busy bus an ack can take seconds, and waiting for
        it before the next beat stretched the period past the grace, so live nodes were
        declared lost (a few beats may be in flight; the newest wins)."""
        in_flight: set[asyncio.Task[None]] = set()
        beats = 0
        try:
            while await self.loops.sleep(self.ctx.settings.heartbeat_interval):
                beats += 1
                if beats % ACK_EVERY:
                    await self._beat(acked=False)
                    continue
                if len(in_flight) >= HEARTBEATS_IN_FLIGHT:
                    continue
                task = asyncio.create_task(self._beat(), name=f"heartbeat:{self.node_id}")
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:
            for task in list(in_flight):
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _beat(self, *, acked: bool = True) -> None:
        try:
            await self._heartbeat_once(acked=acked)
        except Exception as exc:
            log.warning("%s: heartbeat failed: %s", self.node_id, exc)

    async def _report_usage(self) -> None:
        """Every replica's cpu (cores) and memory (bytes) on `<prefix>.metrics.<service>`,
        one message per service, for the autoscaler."""
        while await self.loops.sleep(self.ctx.settings.metrics_interval):
            try:
                await self._usage_once()
            except Exception as exc:
                log.warning("%s: usage report failed: %s", self.node_id, exc)

    async def _usage_once(self) -> None:
        running = [r for r in self.driver.running() if r in self._services]
        found = await asyncio.gather(
            *(self.driver.stats(r) for r in running), return_exceptions=True
        )
        by_service: dict[str, list[dict[str, object]]] = {}
        for replica, usage in zip(running, found, strict=True):
            service = self._services.get(replica)
            if isinstance(usage, BaseException) or not usage or service is None:
                continue
            by_service.setdefault(service, []).extend(
                {"name": name, "value": value, "replica": replica} for name, value in usage.items()
            )
        for service, samples in by_service.items():
            await self.bus.nc.publish(self.bus.names.metrics(service), json.dumps(samples).encode())

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
                if not running and not state.finished:
                    if self._waiting(assignment):
                        return
                    await self._start(assignment, state)
                elif running and state.started is not None:
                    await self._report_running(assignment, state)  # an earlier write failed
                return
            await self._stop_probe(replica)
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
                        message=assignment.reason
                        if assignment.reason.startswith("preempted by ")
                        else "scaled in or replaced",
                        correlation=assignment.correlation,
                    )
                await self.bus.buckets.replicas.delete(f"{assignment.service}.{replica}")
                self._services.pop(replica, None)
                self._replicas.pop(replica, None)
                return
            service = self._services.get(replica)
            if running:
                code = await self.driver.stop(replica, 10.0)
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
                        message="no longer assigned to this node (rescheduled or removed)",
                    )
                self._services.pop(replica, None)
            self._replicas.pop(replica, None)

    async def _start(self, assignment: Assignment, state: _Replica) -> None:
        wait = state.not_before - time.monotonic()
        if wait > 0:
            self._mark_later(assignment.replica, wait)
            return
        launch = Launch(
            assignment.replica,
            assignment.service,
            self.node_id,
            assignment.template,
            assignment.generation,
        )
        try:
            started = await self.driver.start(launch)
        except DriverError as exc:
            state.failures += 1
            delay = self._backoff(assignment, state)
            await self._report(
                assignment,
                ReplicaState.FAILED,
                message=f"{exc}; retry in {delay:.1f}s",
                event="failed",
                restarts=state.restarts,
            )
            self._mark_later(assignment.replica, delay)
            return
        state.started = started
        state.ports = dict(started.ports)
        state.pid = started.pid
        state.ready_at = None
        state.ready_mono = None
        await self._report_running(assignment, state)

    async def _report_running(self, assignment: Assignment, state: _Replica) -> None:
        started = state.started
        assert started is not None
        health = assignment.template.health
        if health is None or self._simulated:
            # nothing to probe: a running replica is a ready one
            state.ready_at = state.ready_at or utcnow()
            state.ready_mono = state.ready_mono or time.monotonic()
        await self._report(
            assignment,
            ReplicaState.RUNNING,
            event="started",
            restarts=state.restarts,
            replica_state=state,
        )
        state.started = None
        if health is not None and not self._simulated and state.prober is None:
            replica = assignment.replica

            async def run_exec(argv: list[str], timeout: float) -> int:
                return await self.driver.exec(replica, argv, timeout)

            state.prober = Prober(replica, health, dict(state.ports), run_exec, self._on_health)
            state.prober.start()

    async def _stop_probe(self, replica: str) -> None:
        state = self._replicas.get(replica)
        if state is not None and state.prober is not None:
            prober, state.prober = state.prober, None
            await prober.stop()

    # health -------------------------------------------------------------------------------
    async def _on_health(self, replica: str, healthy: bool, result: ProbeResult) -> None:
        state = self._replicas.get(replica)
        assignment = self.assignments.get(f"{self.node_id}.{replica}")
        if state is None or assignment is None or assignment.draining or self._stopping:
            return
        if healthy:
            state.ready_at = utcnow()
            state.ready_mono = time.monotonic()
            await self._report(
                assignment,
                ReplicaState.HEALTHY,
                event="healthy",
                message=result.detail,
                restarts=state.restarts,
                replica_state=state,
            )
            return
        # liveness: restart it, with the same backoff as a crash
        health = assignment.template.health
        assert health is not None
        state.ready_at = None
        state.ready_mono = None
        cause = f"health probe failed {health.failure_threshold} times in a row ({result.detail})"
        await self._report(
            assignment,
            ReplicaState.UNHEALTHY,
            event="unhealthy",
            message=cause,
            restarts=state.restarts,
            replica_state=state,
        )
        # not under the replica's lock: the prober that called us is stopped from inside it
        self.loops.spawn(self._liveness_restart(assignment, cause), f"restart {replica}")

    async def _liveness_restart(self, assignment: Assignment, cause: str) -> None:
        replica = assignment.replica
        state = self._replicas.get(replica)
        if state is None:
            return
        async with state.lock:
            if self._stopping or replica not in self.driver.running():
                return
            await self._stop_probe(replica)
            code = await self.driver.stop(replica, assignment.template.stop_grace_period)
            await self._crashed(assignment, state, code, cause, stopped_by_us=True)

    # exits --------------------------------------------------------------------------------
    def _backoff(self, assignment: Assignment, state: _Replica) -> float:
        """The wait before the next start. The first restart after a healthy spell is at
        once; each further one waits the policy's exponential delay, with jitter."""
        backoff = assignment.template.restart.backoff
        if state.failures <= 1:
            delay = 0.0
        else:
            base = backoff.delay(state.failures - 1)
            delay = min(backoff.max, base * random.uniform(1 - JITTER, 1 + JITTER))
        state.not_before = time.monotonic() + delay
        return delay

    async def on_exit(self, replica: str, code: int, reason: str = "") -> None:
        """The driver saw a replica end on its own: report it, then restart it if its
        policy says so."""
        state = self._replicas.setdefault(replica, _Replica())
        assignment = self.assignments.get(f"{self.node_id}.{replica}")
        if assignment is None or assignment.draining or self._stopping:
            self.mark(replica)
            return
        await self._stop_probe(replica)
        detail = f"exited with code {code}" + (f": {reason}" if reason else "")
        await self._crashed(assignment, state, code, detail, stopped_by_us=False)

    async def _crashed(
        self,
        assignment: Assignment,
        state: _Replica,
        code: int | None,
        cause: str,
        *,
        stopped_by_us: bool,
    ) -> None:
        restart = assignment.template.restart
        if (
            state.ready_mono is not None
            and time.monotonic() - state.ready_mono >= restart.reset_after
        ):
            state.failures = 0
        state.ready_at = None
        state.ready_mono = None
        exit_code = code if code is not None else -1
        if not stopped_by_us and not restart.restarts_after(exit_code):
            state.finished = True
            final = ReplicaState.EXITED if exit_code == 0 else ReplicaState.FAILED
            await self._report(
                assignment,
                final,
                exit_code=code,
                message=f"{cause}; not restarted (restart policy {restart.policy})",
                event="exited" if exit_code == 0 else "failed",
                restarts=state.restarts,
            )
            return
        state.failures += 1
        state.restarts += 1
        delay = self._backoff(assignment, state)
        action = "restarting now" if delay == 0 else f"restarting in {delay:.1f}s"
        if stopped_by_us:
            what, shown = "restarting", ReplicaState.UNHEALTHY
        else:
            what = "exited" if exit_code == 0 else "failed"
            shown = ReplicaState.EXITED if exit_code == 0 else ReplicaState.FAILED
        await self._report(
            assignment,
            shown,
            exit_code=code,
            message=f"{cause}; {action} (restart {state.restarts})",
            event=what,
            restarts=state.restarts,
        )
        if delay > 0:
            self._mark_later(assignment.replica, delay)
        else:
            self.mark(assignment.replica)

    # reporting ----------------------------------------------------------------------------
    async def _report(
        self,
        assignment: Assignment,
        state: ReplicaState,
        *,
        event: str,
        exit_code: int | None = None,
        message: str = "",
        restarts: int = 0,
        replica_state: _Replica | None = None,
    ) -> None:
        now = utcnow()
        status = ReplicaStatus(
            replica=assignment.replica,
            service=assignment.service,
            node=self.node_id,
            generation=assignment.generation,
            state=state,
            pid=replica_state.pid if replica_state else None,
            ports=dict(replica_state.ports) if replica_state else {},
            exit_code=exit_code,
            restarts=restarts,
            message=message,
            started_at=now if state == ReplicaState.RUNNING else None,
            updated_at=now,
            ready=replica_state is not None and replica_state.ready_at is not None,
            ready_at=replica_state.ready_at if replica_state else None,
        )
        # both go out at once, the status first (one connection keeps their order), and
        # their acks are awaited together: one round trip per report instead of two. The
        # status's ack is waited for even when the event fails. No task for either: at
        # 100,000 replicas, a gather's two tasks per report were a few percent of the agents
        key = f"{assignment.service}.{assignment.replica}"
        stored = await self.bus.buckets.replicas.put_started(key, status)
        try:
            await self._event(
                assignment.service,
                assignment.replica,
                event,
                state,
                assignment.generation,
                pid=status.pid,
                ports=status.ports,
                exit_code=exit_code,
                message=message,
                correlation=assignment.correlation,
            )
        except Exception:
            with contextlib.suppress(Exception):
                await stored
            raise
        await stored

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
