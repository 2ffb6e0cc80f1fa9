"""`Acks.send`, `Bucket.put_started` and `Bucket.create_started` on a real nats-server: sent
now, in order, their acks awaited later with the same outcomes as `Acks.publish`, `put` and
`create`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NoStreamResponseError

from corral.bus.connection import Bus
from corral.bus.store import Bucket
from corral.schemas.envelope import utcnow
from corral.schemas.errors import ConflictError
from corral.schemas.state import ReplicaState, ReplicaStatus


def status(replica: str, message: str = "") -> ReplicaStatus:
    return ReplicaStatus(
        replica=replica,
        service="web",
        node="n1",
        generation=1,
        state=ReplicaState.RUNNING,
        message=message,
        updated_at=utcnow(),
    )


async def test_sent_messages_keep_their_order_and_their_acks_come_later(bus: Bus) -> None:
    subject = bus.names.evt("service", "web", "tested")
    acks = [await bus.acks.send(subject, f'{{"n":{i}}}'.encode()) for i in range(50)]
    seqs = [await ack for ack in acks]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 50
    assert not bus.acks._pending  # every reply was taken and forgotten


async def test_a_send_fails_as_a_publish_does(bus: Bus) -> None:
    nowhere = await bus.acks.send(f"{bus.names.prefix}.no.stream.here", b"{}")
    with pytest.raises(NoStreamResponseError):
        await nowhere
    # a reply that never comes: a subscriber that never answers, and a short timeout
    subject = f"{bus.names.prefix}.silent"
    listener = await bus.nc.subscribe(subject)
    try:
        silent = await bus.acks.send(subject, b"{}", timeout=0.05)
        with pytest.raises(NatsTimeoutError):
            await asyncio.wait_for(_wait(silent), 5)
    finally:
        await listener.unsubscribe()
    assert not bus.acks._pending


async def _wait(ack: Awaitable[int]) -> int:
    return await ack


async def test_put_started_writes_the_record(bus: Bus) -> None:
    replicas = bus.buckets.replicas
    first = await replicas.put_started("web.r1", status("r1", "first"))
    second = await replicas.put_started("web.r1", status("r1", "second"))
    assert await second > await first
    stored = await replicas.get("web.r1")
    assert stored is not None
    assert stored.value.message == "second"


async def test_put_started_without_the_acks_path_writes_too(bus: Bus) -> None:
    plain = Bucket(bus.buckets.replicas.kv, ReplicaStatus)
    revision = await (await plain.put_started("web.r2", status("r2")))
    stored = await plain.get("web.r2")
    assert stored is not None
    assert stored.revision == revision


async def test_create_started_creates_refuses_a_present_key_and_reuses_a_deleted_one(
    bus: Bus,
) -> None:
    replicas = bus.buckets.replicas
    first = await (await replicas.create_started("web.r3", status("r3")))
    again = await replicas.create_started("web.r3", status("r3", "again"))
    with pytest.raises(ConflictError, match="already exists"):
        await again
    await replicas.delete("web.r3")
    revived = await (await replicas.create_started("web.r3", status("r3", "revived")))
    assert revived > first
    stored = await replicas.get("web.r3")
    assert stored is not None
    assert stored.value.message == "revived"
    plain = Bucket(bus.buckets.replicas.kv, ReplicaStatus)
    with pytest.raises(ConflictError):
        await (await plain.create_started("web.r3", status("r3")))
