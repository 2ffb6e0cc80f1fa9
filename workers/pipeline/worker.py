"""The pipeline worker's thin handler. Each run is reconciled level-triggered: a job report,
a command, a node going silent, a lock freed, a rollout moving or a backoff timer marks the
run dirty; reconciling reads the run, lets `planning.decide` choose, writes the run back with
compare-and-set, and only then dispatches, stops, locks, unlocks and announces. Several
copies may run: they share durable consumers, and the compare-and-set decides who acts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from corral.bus.codec import decode
from corral.bus.edge import CommandEdge
from corral.bus.lifecycle import Loops
from corral.bus.pipelines import PipelineStore, pipeline_store
from corral.bus.store import Mirror, SharedMirror
from corral.schemas.envelope import utcnow
from corral.schemas.errors import ConflictError
from corral.schemas.runs import ACTIVE, JobReport, JobState, RunRecord
from corral.schemas.spec import ServiceSpec
from corral.schemas.state import NodeStatus, ServiceRecord, ServiceStatus, is_alive
from corral.workers.pipeline.active import ActiveRuns
from corral.workers.pipeline.assigning import assignment_for, assignment_key, view_of
from corral.workers.pipeline.commands import Commands
from corral.workers.pipeline.locking import GroupLocks
from corral.workers.pipeline.planning import Plan, View, decide
from corral.workers.pipeline.triggers import CronTrigger
from corral.workers.runtime import Context

log = logging.getLogger(__name__)
CAS_ATTEMPTS = 8
STARTED_COALESCE = 0.1
"""seconds a job's `started` report may wait to share a write with others"""
MAX_DELIVER = 5


class PipelineWorker:
    name = "pipeline"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.settings = ctx.settings
        self.emitter = ctx.emitter("pipeline")
        self.edge = CommandEdge(self.bus, self.emitter, max_deliver=MAX_DELIVER)
        self.loops = Loops("pipeline")
        self._store: PipelineStore | None = None
        self.nodes: Mirror[NodeStatus] = SharedMirror(ctx.bus.buckets.nodes)
        self.services: Mirror[ServiceRecord] = Mirror(ctx.bus.buckets.services)
        self.service_status: Mirror[ServiceStatus] = Mirror(ctx.bus.buckets.service_status)
        self.runs: ActiveRuns | None = None
        self._inbox: dict[str, list[tuple[Msg | None, JobReport]]] = defaultdict(list)
        self._busy: set[str] = set()
        self._again: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._carry_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._run_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._soon: dict[str, asyncio.TimerHandle] = {}
        self._subs: list[JetStreamContext.PushSubscription] = []
        self.group_locks: GroupLocks | None = None
        self.commands: Commands | None = None
        self.cron: CronTrigger | None = None

    @property
    def store(self) -> PipelineStore:
        assert self._store is not None, "the pipeline worker has not started"
        return self._store

    def register(self, broker: NatsBroker) -> None:
        return None  # pulls with nats-py, as the api worker does (see its note)

    # lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._store = await pipeline_store(self.bus)
        self.runs = ActiveRuns(self.store, self.bus.js)
        self.group_locks = GroupLocks(self.store, self._mark_group)
        self.nodes.listen(lambda _key, _value: self._mark_waiting_for_nodes())
        self.services.listen(lambda key, _value: self._mark_deploying(key))
        self.service_status.listen(lambda key, _value: self._mark_deploying(key))
        for mirror in (self.nodes, self.services, self.service_status):
            await mirror.start()
        await self.runs.start()
        self.commands = Commands(self)
        self.cron = CronTrigger(self)
        names = self.bus.names
        prefix = names.prefix
        # push consumers with a deliver group: each message reaches one copy of the worker
        # the moment it is stored (a pull batch would wait to fill up or time out)
        self._subs = [
            await self._consume(
                names.cmd("pipeline", "*", "*"),
                f"{prefix}-pipeline-cmd",
                names.cmd_stream,
                self._command,
                max_deliver=MAX_DELIVER + 1,
            ),
            await self._consume(
                names.cmd("run", "*", "*"),
                f"{prefix}-pipeline-run-cmd",
                names.cmd_stream,
                self._command,
                max_deliver=MAX_DELIVER + 1,
            ),
            await self._consume(
                names.evt("job", "*", "*"),
                f"{prefix}-pipeline-reports",
                names.evt_stream,
                self._report,
                max_deliver=-1,
            ),
        ]
        self.loops.spawn(self.group_locks.watch(self.loops), "locks")
        self.loops.spawn(self._watch_nodes(), "nodes")
        self.loops.spawn(self._resync(), "resync")
        self.loops.spawn(self.cron.run(), "cron")

    async def stop(self) -> None:
        for timer in [*self._timers.values(), *self._soon.values()]:
            timer.cancel()
        self._timers.clear()
        self._soon.clear()
        await self.loops.stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []
        for mirror in (self.nodes, self.services, self.service_status):
            await mirror.stop()
        if self.runs is not None:
            await self.runs.stop()

    # intake -------------------------------------------------------------------------------
    async def _consume(
        self,
        subject: str,
        durable: str,
        stream: str,
        handle: Callable[[Msg], Awaitable[None]],
        *,
        max_deliver: int,
    ) -> JetStreamContext.PushSubscription:
        async def on_msg(msg: Msg) -> None:
            try:
                await handle(msg)
            except Exception:
                log.exception("handling %s failed; it is redelivered", msg.subject)

        return await self.bus.js.subscribe(
            subject,
            queue=durable,
            durable=durable,
            stream=stream,
            cb=on_msg,
            manual_ack=True,
            pending_msgs_limit=100_000,
            config=ConsumerConfig(
                ack_wait=30,
                max_deliver=max_deliver,
                max_ack_pending=20_000,
                deliver_policy=DeliverPolicy.ALL,
            ),
        )

    async def _command(self, msg: Msg) -> None:
        assert self.commands is not None
        await self.edge.run(msg, self.commands.handle)

    async def _report(self, msg: Msg) -> None:
        what = msg.subject.rsplit(".", 1)[-1]
        if what not in ("started", "finished"):
            await msg.ack()  # the worker's own job events share the subject space
            return
        try:
            report = JobReport.model_validate(decode(msg.headers, msg.data).data)
        except (ValidationError, Exception) as exc:
            log.warning("dropping an unreadable job report on %s: %s", msg.subject, exc)
            await msg.ack()
            return
        if what == "started":
            report = report.model_copy(update={"outcome": ""})
        self._inbox[report.run].append((msg, report))
        if what == "started":
            # nothing waits on a start: fold it into the next write, so that the write a
            # finish needs (to dispatch what follows) is not queued behind one for a start
            self._mark_soon(report.run, STARTED_COALESCE)
        else:
            self.mark(report.run)

    # triggers -----------------------------------------------------------------------------
    def mark(self, run_id: str) -> None:
        """Reconcile the run soon: at once, or right after the reconcile under way."""
        if not self.loops.running:
            return
        if run_id in self._busy:
            self._again.add(run_id)
            return
        self._busy.add(run_id)
        self._track(asyncio.create_task(self._drive(run_id), name=f"pipeline run {run_id}"))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drive(self, run_id: str) -> None:
        try:
            while True:
                self._again.discard(run_id)
                try:
                    await self.reconcile(run_id)
                except Exception as exc:
                    log.error("reconciling run %s failed: %r", run_id, exc)
                    self._wake_at(run_id, 1.0)
                if run_id not in self._again or not self.loops.running:
                    return
        finally:
            self._busy.discard(run_id)
            if self.runs is not None and run_id not in self.runs.items:
                for locks in (self._run_locks, self._carry_locks):
                    lock = locks.get(run_id)
                    if lock is not None and not lock.locked():
                        del locks[run_id]

    def _wake_at(self, run_id: str, delay: float) -> None:
        old = self._timers.pop(run_id, None)
        if old is not None:
            old.cancel()
        self._timers[run_id] = asyncio.get_running_loop().call_later(
            max(0.0, delay), self._timer_fired, run_id
        )

    def _timer_fired(self, run_id: str) -> None:
        self._timers.pop(run_id, None)
        self.mark(run_id)

    def _mark_soon(self, run_id: str, delay: float) -> None:
        if run_id in self._soon:
            return
        self._soon[run_id] = asyncio.get_running_loop().call_later(delay, self._soon_fired, run_id)

    def _soon_fired(self, run_id: str) -> None:
        self._soon.pop(run_id, None)
        self.mark(run_id)

    def active_runs(self) -> list[RunRecord]:
        return [] if self.runs is None else self.runs.values()

    def cron_changed(self) -> None:
        if self.cron is not None:
            self.cron.changed.set()

    async def deploy_accepted(
        self, run_id: str, job: str, attempt: int, command: str, generation: int, revision: int
    ) -> None:
        """The api worker took a deploy job's command: the job runs until the rollout ends."""

        def change(run: RunRecord) -> RunRecord:
            current = run.jobs.get(job)
            if current is None or current.attempt != attempt or current.state not in ACTIVE:
                return run
            jobs = dict(run.jobs)
            jobs[job] = current.model_copy(
                update={
                    "state": JobState.RUNNING,
                    "started_at": utcnow(),
                    "deploy_command": command,
                    "deploy_generation": generation,
                    "deploy_revision": revision,
                    "message": f"rolling out revision {revision}",
                }
            )
            return run.model_copy(update={"jobs": jobs, "updated_at": utcnow()})

        assert self.commands is not None
        await self.commands.change(run_id, change)
        self.mark(run_id)

    async def deploy_failed(self, report: JobReport) -> None:
        self._inbox[report.run].append((None, report))
        self.mark(report.run)

    def _mark_waiting_for_nodes(self) -> None:
        """A node's heartbeat: runs whose jobs wait for a node may go on."""
        for run in self.active_runs():
            if any(
                j.state == JobState.PENDING and j.message.startswith("no live node")
                for j in run.jobs.values()
            ):
                self.mark(run.id)

    async def _watch_nodes(self) -> None:
        """A node that goes silent changes nothing in KV: look every heartbeat interval for
        jobs on nodes whose heartbeat has grown older than the grace."""
        while await self.loops.sleep(self.settings.heartbeat_interval):
            now = utcnow()
            grace = self.settings.node_grace
            alive = {n.id for n in self.nodes.values() if is_alive(n, now, grace)}
            for run in self.active_runs():
                if any(
                    j.state in ACTIVE and j.node and j.node not in alive for j in run.jobs.values()
                ):
                    self.mark(run.id)

    def _mark_deploying(self, service: str) -> None:
        for run in self.active_runs():
            for job in run.jobs.values():
                spec = run.spec.jobs[job.job].deploy
                if job.state in ACTIVE and isinstance(spec, ServiceSpec) and spec.name == service:
                    self.mark(run.id)

    def _mark_group(self, group: str) -> None:
        for run in self.active_runs():
            if any(
                run.spec.jobs[j.job].resource_group == group and j.state == JobState.PENDING
                for j in run.jobs.values()
            ):
                self.mark(run.id)

    async def _resync(self) -> None:
        """Level-triggered safety net: every active run now and then, and at start."""
        first = True
        while first or await self.loops.sleep(self.settings.resync_interval):
            first = False
            try:
                assert self.runs is not None
                await self.runs.load()
                for run in self.runs.values():
                    self.mark(run.id)
                    await self._ensure_assignments(run)
            except Exception as exc:
                log.warning("pipeline resync failed: %s", exc)

    async def _ensure_assignments(self, run: RunRecord) -> None:
        """A crash between writing the run and its assignments leaves dispatched jobs with
        nothing for the agent to run: write them again (create-only, so never twice)."""
        for job in run.jobs.values():
            if job.state == JobState.DISPATCHED and job.node:
                key = assignment_key(job.node, run.id, job.name, job.attempt)
                with contextlib.suppress(ConflictError):
                    await self.store.jobs.create(key, assignment_for(run, job.name, utcnow()))
            elif job.state == JobState.DISPATCHED and not job.node and self.commands:
                # a deploy whose command a crash cut off (not one that is under way here)
                self._track(
                    asyncio.create_task(
                        self.commands.start_deploy(run, job.name), name=f"deploy {job.name}"
                    )
                )

    # reconcile ----------------------------------------------------------------------------
    def view(self, run: RunRecord) -> View:
        held = self.group_locks.held if self.group_locks is not None else {}
        return view_of(
            run,
            utcnow(),
            nodes=self.nodes.values(),
            grace=self.settings.node_grace,
            others=self.active_runs(),
            locks=held,
            services=self.services.get,
            statuses=self.service_status.get,
        )

    async def reconcile(self, run_id: str) -> None:
        async with self._run_locks[run_id]:
            taken = self._inbox.pop(run_id, [])
            reports = [report for _, report in taken]
            try:
                plan = await self._decide_and_write(run_id, reports)
            except Exception:
                self._inbox[run_id][:0] = taken  # keep them for the next try
                raise
            await asyncio.gather(
                *(msg.ack() for msg, _ in taken if msg is not None), return_exceptions=True
            )
            if plan is None:
                return
            # carry the plan out in order, but let the next decision overlap with it
            carry = self._carry_locks[run_id]
            await carry.acquire()
        self._track(asyncio.create_task(self._carry(plan, carry), name=f"carry {run_id}"))

    async def _carry(self, plan: Plan, lock: asyncio.Lock) -> None:
        try:
            try:
                await self.act(plan)
            finally:
                lock.release()  # the next plan may act while this one's events go out
            await self.announce(plan)
        except Exception as exc:
            log.error("carrying out run %s failed: %r", plan.run.id, exc)
            self._wake_at(plan.run.id, 1.0)

    async def _decide_and_write(self, run_id: str, reports: list[JobReport]) -> Plan | None:
        assert self.runs is not None
        for attempt in range(CAS_ATTEMPTS):
            # our own last write (or the watch's latest) saves a read; a stale one only
            # costs a failed compare-and-set and a fresh read
            known = self.runs.items.get(run_id) if attempt == 0 else None
            current = known or await self.store.runs.get(run_id)
            if current is None:
                return None
            view = self.view(current.value)
            plan = decide(current.value, view, reports)
            acquired: list[str] = []
            if plan.want_locks:
                assert self.group_locks is not None
                acquired = await self.group_locks.acquire(plan.want_locks)
                if acquired:
                    view.locks.update({g: plan.want_locks[g] for g in acquired})
                    plan = decide(current.value, view, reports)
            if plan.run == current.value:
                return plan
            try:
                revision = await self.store.runs.update(run_id, plan.run, current.revision)
            except ConflictError:
                assert self.group_locks is not None
                await self.group_locks.release({g: plan.want_locks[g] for g in acquired})
                continue
            assert self.runs is not None
            await self.runs.written(plan.run, revision)
            return plan
        raise ConflictError(f"run {run_id} kept changing under us")

    async def carry_out(self, plan: Plan) -> None:
        await self.act(plan)
        await self.announce(plan)

    async def act(self, plan: Plan) -> None:
        """Dispatch, stop, unlock and start deploys, in the order the plans were made."""
        run = plan.run
        now = utcnow()
        jobs = self.store.jobs
        # every attempt has a key of its own, so the writes and removals need no order
        writes = [
            jobs.put(
                assignment_key(d.node, run.id, d.job, d.attempt),
                assignment_for(run, d.job, now),
            )
            for d in plan.dispatch
        ]
        removals = [
            jobs.delete(assignment_key(r.node, run.id, r.job, r.attempt)) for r in plan.revoke
        ]
        results = await asyncio.gather(*writes, *removals, return_exceptions=True)
        failed = [r for r in results[: len(writes)] if isinstance(r, BaseException)]
        if failed:
            log.warning("writing job assignments of %s failed: %s; retrying", run.id, failed[0])
            await self._ensure_assignments(run)
        if plan.release and self.group_locks is not None:
            held = self.group_locks.held
            await self.group_locks.release({g: held.get(g, "") for g in plan.release}, run=run.id)
        if self.commands is not None:
            for name in plan.deploy:
                self._track(
                    asyncio.create_task(
                        self.commands.start_deploy(run, name), name=f"deploy {name}"
                    )
                )
        if plan.wake_at is not None:
            self._wake_at(run.id, (plan.wake_at - now).total_seconds())

    async def announce(self, plan: Plan) -> None:
        run = plan.run
        await asyncio.gather(
            *(
                self.emitter.emit(
                    resource,
                    run.id,
                    what,
                    data,
                    correlation=run.command_id or None,
                    event_id=_event_id(run, resource, what, data),
                )
                for resource, what, data in plan.events
            )
        )


def _event_id(run: RunRecord, resource: str, what: str, data: object) -> str:
    job = getattr(data, "job", "") or ""
    attempt = getattr(data, "attempt", 0) or 0
    if resource == "run":
        return f"{run.id}.r{run.rounds}.{job}.{what}" if job else f"{run.id}.r{run.rounds}.{what}"
    return f"{run.id}.{job}.{attempt}.r{run.rounds}.{what}"
