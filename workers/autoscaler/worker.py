"""The autoscaler's thin handler. Metric samples arrive on core NATS and wake an evaluation of
their service at once (bursts within a few milliseconds are evaluated once); pulled sources
are read on an interval, which also re-evaluates every autoscaled service. A change is a
`scale` command, sent like any other caller's; every decision is an event, and the recent ones
are kept in KV for `corral autoscale status`. Pushed samples from before the replica count
last changed no longer count: they measured the load over another count. Alertmanager alerts
(the gateway's events, followed from the events stream's start) wake an evaluation of the
services whose alert metrics they match. One autoscaler holds the lease and decides; other
copies keep collecting samples and alerts, and stand by."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from corral.bus.codec import decode
from corral.bus.leases import Lease
from corral.bus.lifecycle import Loops, unsubscribe_quietly
from corral.bus.store import Mirror, Versioned
from corral.schemas.autoscale import (
    AlertMetric,
    Autoscale,
    PrometheusMetric,
    PushMetric,
    QueueMetric,
)
from corral.schemas.commands import ScaleCommand
from corral.schemas.envelope import utcnow
from corral.schemas.errors import InvalidInput
from corral.schemas.events import AutoscaleDecision, ColdStartEvent
from corral.schemas.state import LIVE_STATES, AutoscaleStatus, ReplicaStatus, ServiceRecord
from corral.workers.autoscaler import alerts
from corral.workers.autoscaler.policy import History, Inputs, Reading, evaluate
from corral.workers.autoscaler.samples import SampleStore
from corral.workers.autoscaler.sources import (
    PrometheusQuery,
    SourceError,
    query_prometheus,
    queue_backlog,
)
from corral.workers.runtime import Context

log = logging.getLogger(__name__)
SETTLE_DELAYS = (0.02, 0.1, 0.5)
"""after a message on an activation stream's subjects, how long to wait before each re-read
of a backlog that was not there yet (the stream stores the message a moment after core NATS
delivers it)"""
RECENT = 20
"""decisions kept per service in `corral-autoscale`"""
QUIET = 60.0
"""a decision that changes nothing is published when its reason changes, or this often"""
NEWS_EVERY = 1.0
PENDING_FOR = 3.0
"""after a scale command, wait this long at most for it to land before deciding again"""
COLD_START_WITHIN = 600.0
BUSY_MAX_AGE = 30.0
SOURCE_TIMEOUT = 2.0
ROUTINE = frozenset({"poll", "timer"})
"""triggers that only say an evaluation was due, not what changed"""


def named_trigger(held: str | None, new: str) -> str:
    """The trigger to report for an evaluation woken by `held` and then by `new` before it
    ran: the first one that names a change (an alert, a sample, the spec...) over a routine
    poll or timer, so a decision that a resolved alert caused never says only "poll"."""
    if held is None or (held in ROUTINE and new not in ROUTINE):
        return new
    return held


@dataclass
class _ColdStart:
    started: float
    trigger: str
    command_id: str
    known: set[str]
    """replicas that existed at activation (still draining, say): they do not count"""


class AutoscalerWorker:
    name = "autoscaler"

    def __init__(
        self,
        ctx: Context,
        *,
        lease_ttl: float = 5.0,
        prometheus: PrometheusQuery | None = None,
        coalesce: float = 0.003,
    ) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.settings = ctx.settings
        self.emitter = ctx.emitter("autoscaler")
        b = ctx.bus.buckets
        self.services: Mirror[ServiceRecord] = Mirror(b.services)
        self.replicas: Mirror[ReplicaStatus] = Mirror(b.replicas)
        self.lease = Lease(b.leases, f"{ctx.settings.prefix}.autoscaler", ttl=lease_ttl)
        self.loops = Loops("autoscaler")
        self.prometheus = prometheus or query_prometheus
        self.coalesce = coalesce
        self.samples = SampleStore()
        self.pulled: dict[str, dict[str, tuple[Reading, float]]] = defaultdict(dict)
        self.histories: dict[str, History] = {}
        self.activity: dict[str, tuple[float, str]] = {}
        self.pending: dict[str, tuple[int, float]] = {}
        self.scaled_at: dict[str, float] = {}
        """when the replica count last changed: per-replica samples from before then describe
        the load spread over another count, and no longer count"""
        self._counts: dict[str, int] = {}
        self.cold: dict[str, _ColdStart] = {}
        self.invalid_samples = 0
        self.invalid_by_service: dict[str, int] = defaultdict(int)
        self._by_service: dict[str, dict[str, ReplicaStatus]] = defaultdict(dict)
        self._published: dict[str, tuple[tuple[Any, ...], float]] = {}
        self._recent: dict[str, deque[AutoscaleDecision]] = {}
        self._last_cold: dict[str, ColdStartEvent] = {}
        self._activations: dict[str, tuple[str, list[Subscription]]] = {}
        self._checking: dict[str, bool] = {}
        """services whose activation backlog is being read; True: read it again after"""
        self._backlog_reads: set[asyncio.Task[None]] = set()
        self._dirty: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._next_poll: dict[str, float] = {}
        self._poll_soon = asyncio.Event()
        self._warned_at = 0.0
        self._sub: Subscription | None = None
        self.alerts = alerts.Firing()
        """Alertmanager alerts firing now (`type: alert` metrics), by fingerprint"""
        self.invalid_alerts = 0
        self._alert_sub: Any = None
        self.alerts_synced = False
        """the alert events stored before the start are all read"""
        self.services.listen(self._on_service)
        self.replicas.listen(self._on_replica)

    def register(self, broker: NatsBroker) -> None:
        return None

    async def start(self) -> None:
        self._sub = await self.bus.nc.subscribe(self.bus.names.metrics("*"), cb=self._on_metric)
        for mirror in (self.services, self.replicas):
            await mirror.start()
        await self._follow_alerts()
        self.lease.start()
        self.loops.spawn(self._loop(), "evaluate")
        self.loops.spawn(self._poll(), "poll")

    async def stop(self) -> None:
        subs = [sub for _, watching in self._activations.values() for sub in watching]
        if self._sub is not None:
            subs.append(self._sub)
        self._sub = None
        if self._alert_sub is not None:
            subs.append(self._alert_sub)
        self._alert_sub = None
        self._activations.clear()
        for sub in subs:
            await unsubscribe_quietly(sub)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        reads, self._backlog_reads = self._backlog_reads, set()
        for task in reads:
            task.cancel()
        if reads:
            await asyncio.wait(reads, timeout=SOURCE_TIMEOUT + 1)
        self._wake.set()
        self._poll_soon.set()
        await self.loops.stop()
        await self.lease.stop()
        for mirror in (self.replicas, self.services):
            await mirror.stop()

    # triggers -----------------------------------------------------------------------------
    def mark(self, service: str, trigger: str) -> None:
        self._dirty[service] = named_trigger(self._dirty.get(service), trigger)
        self._wake.set()

    def _mark_later(self, service: str, delay: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        timer = self._timers.get(service)
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()

        def fire() -> None:
            self._timers.pop(service, None)
            self.mark(service, "timer")

        self._timers[service] = loop.call_at(when, fire)

    def _policy(self, service: str) -> tuple[ServiceRecord, Autoscale] | None:
        record = self.services.get(service)
        if record is None or record.deleted or record.spec.autoscale is None:
            return None
        return record, record.spec.autoscale

    async def _on_metric(self, msg: Msg) -> None:
        service = msg.subject.rsplit(".", 1)[-1]
        found = self._policy(service)
        if found is None:
            return  # not autoscaled: nobody asked for these samples
        taken = self.samples.ingest(service, msg.data, time.monotonic())
        for why in taken.errors:
            self._invalid(service, why)
        wanted = sorted(
            taken.names & {m.name for m in found[1].metrics if isinstance(m, PushMetric)}
        )
        if wanted:
            self.mark(service, f"sample {wanted[0]}")

    def _invalid(self, service: str, why: str) -> None:
        self.invalid_samples += 1
        self.invalid_by_service[service] += 1
        now = time.monotonic()
        if now - self._warned_at >= 10.0:
            self._warned_at = now
            log.warning(
                "ignored a metric sample for %s (%d so far): %s", service, self.invalid_samples, why
            )

    async def _follow_alerts(self) -> None:
        """Follow the gateway's Alertmanager events: an ordered consumer on the events stream
        from its start, so that a (re)started autoscaler knows the alerts still firing (the
        stream keeps a week; Alertmanager repeats a firing notification every
        `repeat_interval`). Without the stream, core NATS: new events only."""
        subject = self.bus.names.evt(alerts.EXT, alerts.SOURCE, "*")
        try:
            sub = await self.bus.js.subscribe(
                subject,
                stream=self.bus.names.evt_stream,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
                cb=self._on_alert,
                inactive_threshold=300.0,
            )
        except Exception as exc:
            log.warning("alerts: no replay from the events stream (%s); new ones only", exc)
            self._alert_sub = await self.bus.nc.subscribe(subject, cb=self._on_alert)
            self._alerts_read()
            return
        self._alert_sub = sub
        try:
            info = await asyncio.wait_for(sub.consumer_info(), SOURCE_TIMEOUT)
        except Exception as exc:  # unknown: better than holding every scale-down for ever
            log.warning("alerts: how many are stored is unknown (%s); not waiting for them", exc)
            self._alerts_read()
            return
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        if int(info.num_pending or 0) + int(delivered or 0) == 0:
            self._alerts_read()  # nothing stored: nothing to wait for

    def _alerts_read(self) -> None:
        """The stored alert events are all read: alert metrics may now say "not firing"."""
        if self.alerts_synced:
            return
        self.alerts_synced = True
        for name in list(self.services.items):
            found = self._policy(name)
            if found is not None and any(isinstance(m, AlertMetric) for m in found[1].metrics):
                self.mark(name, "alerts read")

    async def _on_alert(self, msg: Msg) -> None:
        """An Alertmanager alert, firing or resolved: fold it in, and evaluate at once the
        services with an alert metric it matches. A bad event is logged and skipped."""
        kind = msg.subject.rsplit(".", 1)[-1]
        if not self.alerts_synced:
            with contextlib.suppress(Exception):  # a core NATS message has no metadata
                if msg.metadata.num_pending == 0:
                    self._alerts_read()
        try:
            event = decode(msg.headers, msg.data)
            sent_at = event.time
            if sent_at is None:
                try:
                    sent_at = msg.metadata.timestamp
                except Exception:  # a core NATS message: no JetStream metadata
                    sent_at = utcnow()
            change = alerts.parse(kind, event.data, sent_at)
        except (InvalidInput, alerts.AlertError) as exc:
            self.invalid_alerts += 1
            now = time.monotonic()
            if now - self._warned_at >= 10.0:
                self._warned_at = now
                log.warning(
                    "ignored an alert event on %s (%d so far): %s",
                    msg.subject,
                    self.invalid_alerts,
                    exc,
                )
            return
        if not self.alerts.apply(change):
            return
        self._wake_for_alerts([change.alert], f"alert {change.alert.name} {change.status}")

    def _wake_for_alerts(self, changed: list[alerts.FiringAlert], trigger: str) -> None:
        for name in list(self.services.items):
            found = self._policy(name)
            if found is None:
                continue
            wanted = [m for m in found[1].metrics if isinstance(m, AlertMetric)]
            if any(alerts.matches(m, a.labels) for m in wanted for a in changed):
                self.mark(name, trigger)

    async def _on_service(self, key: str, item: Versioned[ServiceRecord] | None) -> None:
        await self._sync_activation(key)
        if self._policy(key) is None or item is None:
            self._forget(key)
            return
        count = item.value.spec.replicas
        if self._counts.get(key, count) != count:
            self.scaled_at[key] = time.monotonic()
        self._counts[key] = count
        if key not in self._next_poll:
            self._poll_soon.set()  # a new policy: read its pulled sources now, not in 5 s
        self.mark(key, "spec")

    async def _sync_activation(self, service: str) -> None:
        """Subscribe to what wakes the service: its activation subject, always (a message
        also counts as activity against the cooldown); or, while the service is at zero, the
        subjects of its activation stream, so that the first message there has the consumer's
        backlog read at once rather than at the next poll."""
        found = self._policy(service)
        activation = found[1].activation if found else None
        key: str | None = None
        if activation is not None and activation.subject is not None:
            key = activation.subject
        elif activation is not None and found is not None and found[0].spec.replicas == 0:
            key = f"stream {activation.stream}/{activation.consumer}"
        current = self._activations.get(service)
        if current is not None and current[0] == key:
            return
        if current is not None:
            del self._activations[service]
            for sub in current[1]:
                await unsubscribe_quietly(sub)
        if activation is None or key is None:
            return
        if activation.subject is not None:
            subject = activation.subject

            async def on_message(msg: Msg) -> None:
                self.activity[service] = (time.monotonic(), f"a message on {msg.subject}")
                record = self.services.get(service)
                if record is not None and record.spec.replicas == 0:
                    self.mark(service, "activation")

            sub = await self.bus.nc.subscribe(subject, cb=on_message)
            self._activations[service] = (key, [sub])
            return
        assert activation.stream is not None
        try:
            info = await asyncio.wait_for(
                self.bus.js.stream_info(activation.stream), SOURCE_TIMEOUT
            )
        except Exception as exc:  # not there yet: the poll reads the backlog, and tries again
            log.info("%s: activation stream %s not watched: %s", service, activation.stream, exc)
            return
        if service in self._activations:
            return  # another call got there during the await

        async def on_stream_message(msg: Msg) -> None:
            self._read_backlog_soon(service, settle=True)

        subs = [
            await self.bus.nc.subscribe(subject, cb=on_stream_message)
            for subject in info.config.subjects or []
        ]
        self._activations[service] = (key, subs)
        self._read_backlog_soon(service)  # a backlog may already be waiting

    def _read_backlog_soon(self, service: str, *, settle: bool = False) -> None:
        """Read the activation backlog now; a read already under way reads again after, so a
        burst of messages costs at most two reads at a time. `settle`: a message was just
        seen on the stream's subjects, and the stream may store it a moment after core NATS
        delivered it to us, so a read that finds no backlog looks again a few times, briefly."""
        if service in self._checking:
            self._checking[service] = True
            return
        self._checking[service] = False
        task = asyncio.create_task(
            self._read_backlogs(service, settle), name=f"autoscaler:wake:{service}"
        )
        self._backlog_reads.add(task)
        task.add_done_callback(self._backlog_reads.discard)

    async def _read_backlogs(self, service: str, settle: bool) -> None:
        try:
            delays = list(SETTLE_DELAYS) if settle else []
            while True:
                woken = self.lease.held.is_set() and await self._read_activation(service)
                if woken:
                    self.mark(service, "activation")
                if self._checking.get(service):
                    self._checking[service] = False
                    continue
                if woken or not delays or not self.loops.running:
                    return
                await asyncio.sleep(delays.pop(0))
        finally:
            self._checking.pop(service, None)

    async def _on_replica(self, key: str, item: Versioned[ReplicaStatus] | None) -> None:
        service = key.split(".", 1)[0]
        if item is None:
            self._by_service[service].pop(key, None)
            return
        status = item.value
        self._by_service[service][key] = status
        watch = self.cold.get(service)
        if watch is None or not status.ready or status.replica in watch.known:
            return
        del self.cold[service]
        event = ColdStartEvent(
            name=service,
            seconds=round(time.monotonic() - watch.started, 6),
            trigger=watch.trigger,
            replica=status.replica,
            command_id=watch.command_id,
        )
        self._last_cold[service] = event
        await self.emitter.emit(
            "autoscale", service, "cold_start", event, correlation=watch.command_id or None
        )
        await self._save(service)

    def _forget(self, service: str) -> None:
        self.samples.forget(service)
        for table in (
            self.pulled,
            self.histories,
            self.activity,
            self.pending,
            self.scaled_at,
            self._counts,
            self.cold,
            self._published,
            self._next_poll,
        ):
            table.pop(service, None)
        timer = self._timers.pop(service, None)
        if timer is not None:
            timer.cancel()

    # evaluating ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        while self.loops.running:
            if not self.lease.held.is_set():
                self._dirty.clear()  # a standby decides nothing
                await self.lease.held.wait()
                # a new leader trusts no history it kept while standing by: each service's
                # starts over, as the HPA's does after a restart
                self.histories.clear()
                self.pending.clear()
                for name in list(self.services.items):
                    if self._policy(name) is not None:
                        self.mark(name, "leader")
                self._poll_soon.set()
            await self._wake.wait()
            self._wake.clear()
            if not self.lease.held.is_set():
                continue
            if self.coalesce > 0 and not await self.loops.sleep(self.coalesce):
                return
            batch, self._dirty = self._dirty, {}
            for service, trigger in batch.items():
                try:
                    await self.evaluate(service, trigger)
                except Exception:
                    log.exception("evaluating %s failed; the next poll tries again", service)

    async def evaluate(self, service: str, trigger: str) -> AutoscaleDecision | None:
        found = self._policy(service)
        if found is None:
            return None
        record, policy = found
        now = time.monotonic()
        pending = self.pending.get(service)
        if pending is not None:
            if record.generation <= pending[0] and now < pending[1]:
                return None  # our last command has not landed: its record change wakes us
            del self.pending[service]
        statuses = [s for s in self._by_service.get(service, {}).values() if s.state in LIVE_STATES]
        live = tuple(sorted(s.replica for s in statuses))
        activity = self.activity.get(service)
        inputs = Inputs(
            current=record.spec.replicas,
            replicas=live,
            ready=sum(1 for s in statuses if s.ready),
            readings=tuple(self._reading(service, m, live, now) for m in policy.metrics),
            activity_at=activity[0] if activity else None,
            activity=activity[1] if activity else "",
            busy=self.samples.first_fresh(service, (policy.busy_metric, "cpu"), now, BUSY_MAX_AGE),
        )
        before = self.histories.get(service, History())
        decision, history = evaluate(policy, inputs, before, now)
        decision = decision.model_copy(update={"name": service, "at": utcnow(), "trigger": trigger})
        if decision.desired != decision.current:
            command_id = f"autoscale.{service}.g{record.generation}.r{decision.desired}"
            decision = decision.model_copy(update={"command_id": command_id})
            scale = ScaleCommand(replicas=decision.desired, prefer_remove=decision.prefer_remove)
            await self.emitter.command("service", service, "scale", scale, command_id=command_id)
            self.pending[service] = (record.generation, now + PENDING_FOR)
            if decision.code == "activated":
                woke_at = now
                zeroed = before.zeroed_at if before.zeroed_at is not None else float("-inf")
                if activity is not None and activity[0] > zeroed:
                    woke_at = activity[0]
                cause = decision.reason.removeprefix("woken from zero by ")
                self.cold[service] = _ColdStart(woke_at, cause, command_id, set(live))
        self.histories[service] = history
        await self._publish(decision, now)
        if decision.recheck_after is not None:
            self._mark_later(service, decision.recheck_after + 0.01)
        return decision

    def _reading(self, service: str, metric: Any, live: tuple[str, ...], now: float) -> Reading:
        if isinstance(metric, AlertMetric):
            if not self.alerts_synced:
                return Reading(error="the stored alert events are still being read")
            return Reading(alerts=self.alerts.matching(metric, utcnow()))
        if isinstance(metric, PushMetric):
            window = metric.max_age
            since_scale = now - self.scaled_at.get(service, float("-inf"))
            if since_scale < window:
                window = since_scale
            fresh = self.samples.fresh(service, metric.name, now, window, live)
            if fresh or window == metric.max_age:
                return Reading(per_replica=fresh)
            why = f"no sample from any of {len(live)} running replicas since the last scale"
            return Reading(per_replica=fresh, error=f"{why}, {since_scale:.2f}s ago")
        entry = self.pulled.get(service, {}).get(metric.label())
        if entry is None:
            return Reading(error="not read yet")
        reading, at = entry
        stale_after = 3 * self._interval(service) + SOURCE_TIMEOUT
        if now - at > stale_after:
            return Reading(error=f"last read {now - at:.0f}s ago")
        return reading

    async def _publish(self, decision: AutoscaleDecision, now: float) -> None:
        service = decision.name
        unread = tuple(p.note for p in decision.proposals if p.replicas is None)
        key = (decision.code, decision.desired, decision.recommended, unread)
        last = self._published.get(service)
        # a decision that changes nothing is news when its reason changed, or now and then;
        # new details of the same reason only once a second (noisy samples move them)
        wait = 0.0
        if decision.action == "none" and last is not None and last[0][0] == decision.code:
            wait = QUIET if last[0] == key else NEWS_EVERY
        if last is not None and now - last[1] < wait:
            return
        self._published[service] = (key, now)
        await self.emitter.emit(
            "autoscale",
            service,
            "decision",
            decision,
            correlation=decision.command_id or None,
            event_id=f"{decision.command_id}.decision" if decision.command_id else None,
        )
        recent = self._recent.get(service)
        if recent is None:
            stored = await self.bus.buckets.autoscale.get(service)
            recent = deque(stored.value.decisions if stored else [], maxlen=RECENT)
            self._recent[service] = recent
        recent.append(decision)
        await self._save(service)

    async def _save(self, service: str) -> None:
        status = AutoscaleStatus(
            name=service,
            updated_at=utcnow(),
            decisions=list(self._recent.get(service, [])),
            cold_start=self._last_cold.get(service),
            invalid_samples=self.invalid_by_service.get(service, 0),
        )
        await self.bus.buckets.autoscale.put(service, status)

    # pulled sources -------------------------------------------------------------------------
    def _interval(self, service: str) -> float:
        found = self._policy(service)
        if found is not None and found[1].poll_interval is not None:
            return found[1].poll_interval
        return self.settings.autoscale_poll_interval

    async def _poll(self) -> None:
        default = self.settings.autoscale_poll_interval
        while self.loops.running:
            now = time.monotonic()
            if self.lease.held.is_set():
                due = [
                    name
                    for name in list(self.services.items)
                    if self._policy(name) is not None and self._next_poll.get(name, 0.0) <= now
                ]
                for name in due:
                    self._next_poll[name] = now + self._interval(name)
                await asyncio.gather(*(self._read_sources(name) for name in due))
                for name in due:
                    self.mark(name, "poll")
                self.samples.prune(now)
                ended = self.alerts.prune(utcnow())
                if ended:
                    self._wake_for_alerts(ended, "alert ended")
                for name, watch in list(self.cold.items()):
                    if now - watch.started > COLD_START_WITHIN:
                        del self.cold[name]
            upcoming = [at - time.monotonic() for at in self._next_poll.values()]
            delay = min(max(0.02, min([*upcoming, default])), default)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poll_soon.wait(), delay)
            self._poll_soon.clear()

    async def _read_sources(self, service: str) -> None:
        found = self._policy(service)
        if found is None:
            return
        policy = found[1]
        pulled = [m for m in policy.metrics if isinstance(m, PrometheusMetric | QueueMetric)]
        readings = await asyncio.gather(*(self._read(m) for m in pulled))
        now = time.monotonic()
        table = self.pulled[service]
        for metric, reading in zip(pulled, readings, strict=True):
            table[metric.label()] = (reading, now)
        await self._read_activation(service)
        if policy.activation is not None and service not in self._activations:
            await self._sync_activation(service)  # the stream may exist by now

    async def _read_activation(self, service: str) -> bool:
        """Read a stream activation's backlog; True (and activity noted) when it is over the
        threshold."""
        found = self._policy(service)
        activation = found[1].activation if found is not None else None
        if activation is None or activation.stream is None or activation.consumer is None:
            return False
        try:
            backlog = await queue_backlog(
                self.bus.js, activation.stream, activation.consumer, SOURCE_TIMEOUT
            )
        except SourceError as exc:
            log.info("%s: activation not read: %s", service, exc)
            return False
        if backlog <= activation.threshold:
            return False
        what = (
            f"a backlog of {backlog} on {activation.stream}/{activation.consumer} "
            f"(threshold {activation.threshold})"
        )
        self.activity[service] = (time.monotonic(), what)
        return True

    async def _read(self, metric: PrometheusMetric | QueueMetric) -> Reading:
        try:
            if isinstance(metric, QueueMetric):
                value = float(
                    await queue_backlog(self.bus.js, metric.stream, metric.consumer, SOURCE_TIMEOUT)
                )
            else:
                url = metric.url or self.settings.prometheus_url
                if not url:
                    raise SourceError(
                        "no Prometheus server: set `url` on the metric, or CORRAL_PROMETHEUS_URL"
                    )
                value = await asyncio.wait_for(
                    self.prometheus(url, metric.query, SOURCE_TIMEOUT), SOURCE_TIMEOUT + 1
                )
        except SourceError as exc:
            return Reading(error=str(exc))
        except Exception as exc:
            return Reading(error=f"{type(exc).__name__}: {exc}")
        return Reading(value=value)
