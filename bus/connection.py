"""`Bus`: one NATS connection with JetStream, the named streams and buckets provisioned
idempotently, typed buckets, and the event publisher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue

from corral.bus.connecting import connect_first
from corral.bus.names import Names
from corral.bus.publishing import Acks
from corral.bus.settings import Settings
from corral.bus.store import Bucket
from corral.bus.unreachable import jetstream_missing, redact_url
from corral.schemas.errors import ConflictError
from corral.schemas.rules import RuleRecord, RuleState
from corral.schemas.state import (
    Assignment,
    AutoscaleStatus,
    NodeLedger,
    NodeStatus,
    ReplicaStatus,
    ServiceHealth,
    ServiceRecord,
    ServiceStatus,
)

log = logging.getLogger(__name__)
DAY = 24 * 3600.0
MANY_WATCHERS = 1_000_000
ASSIGNMENT_PARTS = 16
"""the assignments are split over this many buckets by a hash of the node id: every node's
agent watches its prefix with a consumer, and nats-server checks every consumer of a stream
on every message, so at 1,000 nodes one bucket cost it ~127 us per write (bench/README.md,
`bus_costs.py`). Every process of a cluster must agree on it."""
"""consumers allowed on a bucket that every node watches (see `Bus._allow_consumers`)"""


@dataclass
class Buckets:
    services: Bucket[ServiceRecord]
    service_status: Bucket[ServiceStatus]
    assignments: Bucket[Assignment]
    replicas: Bucket[ReplicaStatus]
    nodes: Bucket[NodeStatus]
    health: Bucket[ServiceHealth]
    leases: KeyValue
    autoscale: Bucket[AutoscaleStatus]
    allocations: Bucket[NodeLedger]
    rules: Bucket[RuleRecord]
    rule_state: Bucket[RuleState]


class Bus:
    """Connect with `await Bus.connect(settings)`; close with `await bus.close()`."""

    def __init__(self, nc: Client, settings: Settings) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.settings = settings
        self.names = Names(settings.prefix)
        self._buckets: Buckets | None = None
        self._owns_connection = True
        self.acks = Acks(nc)
        """the cheaper path for single JetStream publishes (KV writes, events)"""

    @classmethod
    async def connect(
        cls, settings: Settings, *, name: str = "corral", within: float | None = None
    ) -> Bus:
        """The first connection is retried for `within` seconds (default: the
        `connect_timeout` setting), then `NatsUnreachableError`; once connected, reconnects
        are unlimited (`corral.bus.connecting`)."""
        url = settings.resolved_url()
        nc = await connect_first(url, name=name, within=within or settings.connect_timeout)
        bus = cls(nc, settings)
        try:
            await bus.provision()
        except BaseException as exc:  # a failed or interrupted start leaves no connection
            with contextlib.suppress(Exception):
                await bus.acks.stop()
            with contextlib.suppress(Exception):
                await nc.close()
            if isinstance(exc, ServiceUnavailableError | NoRespondersError):
                raise jetstream_missing(redact_url(url), exc) from None
            raise
        return bus

    @classmethod
    async def attach(cls, nc: Client, settings: Settings) -> Bus:
        """Use a connection someone else owns (a FastStream broker's)."""
        bus = cls(nc, settings)
        bus._owns_connection = False
        await bus.provision()
        return bus

    @property
    def buckets(self) -> Buckets:
        if self._buckets is None:
            raise RuntimeError("Bus.provision() has not run")
        return self._buckets

    async def close(self) -> None:
        await self.acks.stop()
        if self._owns_connection and not self.nc.is_closed:
            if self.nc.is_connected:
                await self.nc.drain()
            else:  # NATS is away (nats-py refuses to drain while reconnecting): just stop
                await self.nc.close()

    async def provision(self) -> None:
        """Ensure every stream and bucket exists. Safe to run from every worker at once."""
        n = self.names
        window = self.settings.duplicate_window
        if not self.acks.started:
            await self.acks.start()
        # (name, subjects, kept for, most messages, dedupe window)
        streams = [
            (n.cmd_stream, [n.all_cmd], 7 * DAY, 1_000_000, window),
            (n.evt_stream, [n.all_evt], 7 * DAY, 5_000_000, window),
            (n.dlq_stream, [f"{n.prefix}.dlq.>"], 30 * DAY, None, 0.0),  # 0: the default
        ]
        for name, subjects, max_age, max_msgs, duplicate_window in streams:
            await self._stream(
                StreamConfig(
                    name=name,
                    subjects=subjects,
                    retention=RetentionPolicy.LIMITS,
                    max_age=max_age,
                    max_msgs=max_msgs,
                    duplicate_window=duplicate_window,
                    storage=StorageType.FILE,
                    discard=DiscardPolicy.OLD,
                )
            )
        parts = await asyncio.gather(
            *(
                self._bucket(n.assignment_part(k), watchers=MANY_WATCHERS)
                for k in range(ASSIGNMENT_PARTS)
            )
        )
        kvs = await asyncio.gather(
            self._bucket(n.services, history=8),
            self._bucket(n.service_status),
            self._bucket(n.replicas, watchers=MANY_WATCHERS),
            self._bucket(n.nodes, ttl=3600.0),
            self._bucket(n.leases),
            self._bucket(n.health),
            self._bucket(n.autoscale),
            self._bucket(n.allocations),
        )
        rules, rule_state = await asyncio.gather(
            self._bucket(n.rules, history=5), self._bucket(n.rule_state)
        )
        self._buckets = Buckets(
            services=Bucket(kvs[0], ServiceRecord, self.acks),
            service_status=Bucket(kvs[1], ServiceStatus, self.acks),
            assignments=Bucket(parts[0], Assignment, self.acks, parts=parts, name=n.assignments),
            replicas=Bucket(kvs[2], ReplicaStatus, self.acks),
            nodes=Bucket(kvs[3], NodeStatus, self.acks),
            health=Bucket(kvs[5], ServiceHealth, self.acks),
            leases=kvs[4],
            autoscale=Bucket(kvs[6], AutoscaleStatus, self.acks),
            allocations=Bucket(kvs[7], NodeLedger, self.acks),
            rules=Bucket(rules, RuleRecord, self.acks),
            rule_state=Bucket(rule_state, RuleState, self.acks),
        )
        await self._migrate_assignments()

    async def _migrate_assignments(self) -> None:
        """Move the assignments of a Corral from before they were split (one bucket) into
        their parts, then drop the old bucket. Every process runs it at start; a key already
        in its part is left alone, so two at once do no harm."""
        try:
            legacy = await self.js.key_value(self.names.assignments)
        except NotFoundError:
            return
        buckets = self.buckets
        old = await Bucket(legacy, Assignment).items()
        for key, item in old.items():
            with contextlib.suppress(ConflictError):  # in its part already
                await buckets.assignments.create(key, item.value)
        if old:
            log.info("moved %d assignments into %d buckets", len(old), ASSIGNMENT_PARTS)
        with contextlib.suppress(NotFoundError):
            await self.js.delete_key_value(self.names.assignments)

    async def _stream(self, config: StreamConfig) -> None:
        try:
            await self.js.add_stream(config)
        except BadRequestError:
            # exists with another config (an older Corral, or an operator's tuning): keep it
            assert config.name is not None
            await self.js.stream_info(config.name)

    async def _bucket(
        self, name: str, *, history: int = 1, ttl: float | None = None, watchers: int = 0
    ) -> KeyValue:
        try:
            kv = await self.js.create_key_value(
                KeyValueConfig(bucket=name, history=history, ttl=ttl, storage=StorageType.FILE)
            )
        except BadRequestError:
            kv = await self.js.key_value(name)
        if watchers:
            await self._allow_consumers(f"KV_{name}", watchers)
        return kv

    async def _allow_consumers(self, stream: str, count: int) -> None:
        """nats-server 2.15 caps a stream at 1,000 consumers unless the stream says more, and
        nats-py creates buckets with "unlimited" (-1), which the server reads as that default.
        Every agent watches its prefix of the assignments (and reads the replicas when it
        starts), so a cluster of more than about 1,000 nodes needs the buckets' own, higher
        limit."""
        info = await self.js.stream_info(stream)
        config = info.config
        if config.max_consumers is not None and config.max_consumers >= count:
            return
        config.max_consumers = count
        try:
            await self.js.update_stream(config)
        except BadRequestError as exc:
            log.warning("could not raise %s's consumer limit to %d: %s", stream, count, exc)
