"""The healer's thin handler. It watches replica events for crash loops and node heartbeats
for silence, and says what it sees as events. Restarts themselves happen on the node (the
agent applies the restart policy at once), and replacements for a lost node's replicas are
placed by the deployer; the healer names the verdicts, so that every remediation has a
cause in the audit log. One healer holds the lease and speaks; other copies stand by."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from corral.bus.codec import decode
from corral.bus.leases import Lease
from corral.bus.lifecycle import Loops
from corral.bus.store import Mirror, SharedMirror
from corral.schemas.envelope import utcnow
from corral.schemas.events import HealthEvent, NodeEvent
from corral.schemas.state import NodeStatus, ServiceHealth, ServiceRecord, is_alive, next_expiry
from corral.workers.healer.detection import CrashWindow
from corral.workers.runtime import Context

log = logging.getLogger(__name__)
CRASHES = frozenset({"failed", "exited", "restarting"})
"""replica events that count toward a crash loop"""


class HealerWorker:
    name = "healer"

    def __init__(self, ctx: Context, *, lease_ttl: float = 5.0) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.emitter = ctx.emitter("healer")
        b = ctx.bus.buckets
        self.services: Mirror[ServiceRecord] = Mirror(b.services)
        self.nodes: Mirror[NodeStatus] = SharedMirror(b.nodes)
        self.health: Mirror[ServiceHealth] = Mirror(b.health)
        self.lease = Lease(b.leases, f"{ctx.settings.prefix}.healer", ttl=lease_ttl)
        self.loops = Loops("healer")
        self.windows: dict[str, CrashWindow] = defaultdict(CrashWindow)
        self._silent: set[str] | None = None
        self._sub: Subscription | None = None

    def register(self, broker: NatsBroker) -> None:
        return None

    async def start(self) -> None:
        for mirror in (self.services, self.nodes, self.health):
            await mirror.start()
        self.lease.start()
        self._sub = await self.bus.nc.subscribe(
            self.bus.names.evt("replica", "*", "*"), cb=self._on_replica_event
        )
        self.loops.spawn(self._watch(), "watch")

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        await self.loops.stop()
        await self.lease.stop()
        for mirror in (self.health, self.nodes, self.services):
            await mirror.stop()

    # crash loops --------------------------------------------------------------------------
    async def _on_replica_event(self, msg: Msg) -> None:
        what = msg.subject.rsplit(".", 1)[-1]
        if what not in CRASHES:
            return
        try:
            event = decode(msg.headers, msg.data)
            data = dict(event.data or {})
            service = str(data["service"])
            cause = f"replica {data.get('replica', '?')}: {data.get('message') or what}"
        except Exception as exc:  # a malformed event is not ours to crash on
            log.warning("healer ignored a replica event it could not read: %s", exc)
            return
        record = self.services.get(service)
        if record is None or record.deleted:
            return
        window = self.windows[service]
        now = time.monotonic()
        window.note(now, cause)
        policy = record.spec.restart.crash_loop
        if not window.looping(now, policy):
            return
        current = self.health.get(service)
        if current is not None and current.degraded:
            return
        if not self.lease.held.is_set():
            return
        count = window.count(now, policy.window)
        reason = (
            f"crash loop: {count} restarts within {policy.window:g}s "
            f"(limit {policy.restarts}); latest {window.last_cause}; restarts go on with backoff"
        )
        await self._set_health(record, degraded=True, reason=reason, count=count)

    async def _set_health(
        self, record: ServiceRecord, *, degraded: bool, reason: str, count: int
    ) -> None:
        name = record.spec.name
        verdict = ServiceHealth(
            name=name, degraded=degraded, reason=reason, since=utcnow(), restarts_in_window=count
        )
        revision = await self.bus.buckets.health.put(name, verdict)
        self.health.note_written(name, verdict, revision)
        what = "degraded" if degraded else "recovered"
        await self.emitter.emit(
            "service",
            name,
            what,
            HealthEvent(name=name, degraded=degraded, reason=reason, restarts_in_window=count),
            correlation=record.command_id or None,
        )

    async def _recoveries(self) -> None:
        """A degraded service recovers once a whole window passes without a crash."""
        now = time.monotonic()
        for name, verdict in list(self.health.items.items()):
            if not verdict.value.degraded:
                continue
            record = self.services.get(name)
            if record is None or record.deleted:
                await self.bus.buckets.health.delete(name)
                self.health.note_deleted(name)
                continue
            window = self.windows.get(name)
            policy = record.spec.restart.crash_loop
            if window is None or window.quiet_for(now) > policy.window:
                await self._set_health(
                    record,
                    degraded=False,
                    reason=f"no crash for {policy.window:g}s",
                    count=0,
                )

    # nodes ----------------------------------------------------------------------------------
    async def _watch(self) -> None:
        grace = self.ctx.settings.node_grace
        while self.loops.running:
            delay = next_expiry(self.nodes.values(), utcnow(), grace)
            if not await self.loops.sleep(max(0.05, delay + 0.01)):
                return
            if not self.lease.held.is_set():
                self._silent = None
                continue
            try:
                await self._check_nodes(grace)
                await self._recoveries()
            except Exception:
                log.exception("healer check failed; will try again")

    async def _check_nodes(self, grace: float) -> None:
        now = self.nodes.as_of(utcnow())  # behind a backlog, heartbeats only look old
        silent = {n.id for n in self.nodes.values() if not is_alive(n, now, grace)}
        if self._silent is None:
            # just took over: what was already silent is old news, not a new loss
            self._silent = silent
            return
        for node in sorted(silent - self._silent):
            status = self.nodes.get(node)
            assert status is not None
            quiet = (utcnow() - status.heartbeat_at).total_seconds()
            await self.emitter.emit(
                "node",
                node,
                "lost",
                NodeEvent(
                    node=node,
                    state="lost",
                    reason=f"no heartbeat for {quiet:.1f}s (grace {grace:g}s); its replicas "
                    "are being placed on other nodes",
                    heartbeat_at=status.heartbeat_at,
                ),
                event_id=f"{node}.lost.{status.heartbeat_at.timestamp():.3f}",
            )
        for node in sorted(self._silent - silent):
            status = self.nodes.get(node)
            if status is None:
                continue
            await self.emitter.emit(
                "node",
                node,
                "returned",
                NodeEvent(
                    node=node,
                    state="returned",
                    reason="heartbeats again; its agent stops the replicas no longer assigned "
                    "to it",
                    heartbeat_at=status.heartbeat_at,
                ),
            )
        self._silent = silent
