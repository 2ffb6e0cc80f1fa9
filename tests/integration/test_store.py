"""`corral.bus.store` and `Acks` on a real nats-server: KV writes through the bus's reply
subscription, and mirrors that fold each watched message in as it comes."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError, InvalidKeyError, NoStreamResponseError, NotFoundError
from support import eventually

from corral.bus import flow
from corral.bus.connection import ASSIGNMENT_PARTS, Bus
from corral.bus.publishing import Acks
from corral.bus.settings import Settings
from corral.bus.store import Bucket, Mirror, SharedMirror, Versioned
from corral.schemas.envelope import utcnow
from corral.schemas.errors import ConflictError
from corral.schemas.spec import Resources
from corral.schemas.state import Assignment, NodeStatus, Template


def node(node_id: str, zone: str = "a") -> NodeStatus:
    return NodeStatus(
        id=node_id,
        labels={"zone": zone},
        capacity=Resources(cpu=2, memory=1 << 30),
        heartbeat_at=utcnow(),
        started_at=utcnow(),
    )


async def test_acks_return_the_sequence_and_raise_what_js_publish_raises(bus: Bus) -> None:
    subject = bus.names.evt("service", "web", "tested")
    first = await bus.acks.publish(subject, b"{}")
    second = await bus.acks.publish(subject, b"{}")
    assert second == first + 1
    with pytest.raises(NoStreamResponseError):
        await bus.acks.publish("no-stream-has-this.subject", b"{}")
    with pytest.raises(APIError) as wrong:
        await bus.acks.publish(subject, b"{}", {"Nats-Expected-Stream": "not-this-one"})
    assert wrong.value.err_code is not None


async def test_a_reply_that_never_comes_is_a_timeout(bus: Bus) -> None:
    acks = Acks(bus.nc, timeout=0.3)
    await acks.start()
    try:
        # a subscriber that answers nothing: the request is delivered, no ack comes back
        silent = await bus.nc.subscribe("corral-test.silent")
        with pytest.raises(NatsTimeoutError):
            await acks.publish("corral-test.silent", b"x")
        assert not acks._pending
        await silent.unsubscribe()
    finally:
        await acks.stop()
    with pytest.raises(RuntimeError):
        await acks.publish("corral-test.silent", b"x")


async def test_bucket_writes_keep_compare_and_set(bus: Bus) -> None:
    nodes = bus.buckets.nodes
    assert nodes.acks is bus.acks
    revision = await nodes.create("n1", node("n1"))
    with pytest.raises(ConflictError):
        await nodes.create("n1", node("n1"))
    newer = await nodes.update("n1", node("n1", "b"), revision)
    assert newer > revision
    with pytest.raises(ConflictError):
        await nodes.update("n1", node("n1", "c"), revision)  # the revision moved on
    put = await nodes.put("n1", node("n1", "d"))
    assert put > newer
    stored = await nodes.get("n1")
    assert stored is not None
    assert stored.value.labels == {"zone": "d"}
    # a key deleted before can be created again (nats-py's tombstone dance)
    await nodes.delete("n1")
    again = await nodes.create("n1", node("n1", "e"))
    assert again > put
    with pytest.raises(InvalidKeyError):
        await nodes.put("bad key", node("x"))
    with pytest.raises(InvalidKeyError):
        await nodes.put(".leading", node("x"))


async def test_send_writes_without_an_ack_and_checks_the_key(bus: Bus) -> None:
    nodes = bus.buckets.nodes
    await nodes.send("sent.1", node("sent.1", "first"))
    await nodes.send("sent.1", node("sent.1", "second"))  # the newest wins

    async def stored() -> bool:
        found = await nodes.get("sent.1")
        return found is not None and found.value.labels["zone"] == "second"

    await eventually(stored, within=5, what="the unacked write stored")
    with pytest.raises(InvalidKeyError):
        await nodes.send("no spaces", node("x"))


async def test_a_mirror_follows_writes_deletes_and_its_prefix(bus: Bus) -> None:
    nodes = bus.buckets.nodes
    await nodes.put("a.1", node("a.1"))
    await nodes.put("b.1", node("b.1"))
    seen: list[tuple[str, str | None]] = []
    mirror: Mirror[NodeStatus] = Mirror(nodes, prefix="a.>")

    def listener(key: str, item: Versioned[NodeStatus] | None) -> None:
        seen.append((key, item.value.labels["zone"] if item is not None else None))

    mirror.listen(listener)
    await mirror.start(sync_within=5)
    try:
        assert mirror.synced.is_set()
        assert set(mirror.items) == {"a.1"}  # the snapshot, within the prefix
        await nodes.put("a.2", node("a.2", "z"))
        await nodes.put("b.2", node("b.2"))
        await eventually(lambda: "a.2" in mirror.items, within=5)
        second = mirror.get("a.2")
        assert second is not None
        assert second.labels == {"zone": "z"}
        await nodes.delete("a.1")
        await eventually(lambda: "a.1" not in mirror.items, within=5)
        assert ("a.2", "z") in seen
        assert ("a.1", None) in seen
        assert all(key.startswith("a.") for key, _ in seen)
    finally:
        await mirror.stop()


async def test_a_consumer_reset_while_stopping_leaves_no_subscription(bus: Bus) -> None:
    """nats-py resets an ordered consumer (a new subscription id) when its heartbeats were
    not read in time; one that landed while a mirror stopped left the new id subscribed with
    nothing reading it, and draining the connection then hung until its timeout."""
    nodes = bus.buckets.nodes
    await nodes.put("r.1", node("r.1"))
    mirror: Mirror[NodeStatus] = Mirror(nodes, prefix="r.>")
    await mirror.start(sync_within=5)
    sub = mirror._subs[0]
    jsi = flow._state(sub)
    unsubscribe = sub.unsubscribe

    async def racing(limit: int = 0) -> None:  # the reset lands just after the unsubscribe
        await unsubscribe(limit)
        await jsi.reset_ordered_consumer(jsi._sseq + 1)

    sub.unsubscribe = racing  # type: ignore[method-assign]
    await mirror.stop()
    inner = sub._sub
    assert all(held is not inner and held is not sub for held in bus.nc._subs.values())
    await nodes.put("r.2", node("r.2"))  # a write after the stop reaches no leftover
    await bus.nc.flush()
    assert all(held is not inner for held in bus.nc._subs.values())


async def test_a_mirror_behind_its_watch_is_as_of_the_last_entry_it_read(bus: Bus) -> None:
    """A mirror whose process has not yet read what the bus delivered says how far it got:
    heartbeats judged against that do not all look stale while a busy worker catches up."""
    nodes = bus.buckets.nodes
    mirror: Mirror[NodeStatus] = Mirror(nodes, prefix="lag.>")
    gate = asyncio.Event()
    holding = asyncio.Event()

    async def slow(key: str, item: Versioned[NodeStatus] | None) -> None:
        if key == "lag.first":
            holding.set()
            await gate.wait()  # the mirror stops reading here, as a busy process would

    mirror.listen(slow)
    await mirror.start(sync_within=5)
    try:
        assert mirror.as_of(utcnow()) <= utcnow()
        before = utcnow()
        await nodes.put("lag.first", node("lag.first"))
        written = utcnow()
        await eventually(holding.is_set, within=5)
        await nodes.put("lag.second", node("lag.second"))
        await nodes.put("lag.third", node("lag.third"))
        await eventually(lambda: mirror._subs[0].pending_msgs > 0, within=5)
        later = written + timedelta(seconds=60)  # as if the backlog were a minute old
        seen = mirror.as_of(later)
        # the moment the stream stored the entry being read (clocks to the millisecond)
        assert before - timedelta(milliseconds=50) <= seen <= written + timedelta(milliseconds=50)
        gate.set()
        await eventually(lambda: "lag.third" in mirror.items, within=5)
        await eventually(lambda: mirror.as_of(later) == later, within=5)
    finally:
        gate.set()
        await mirror.stop()


async def test_an_empty_bucket_mirror_is_synced_at_once(bus: Bus) -> None:
    mirror: Mirror[NodeStatus] = Mirror(bus.buckets.nodes, prefix="nothing-here.>")
    await mirror.start(sync_within=5)
    await mirror.stop()


async def test_an_expected_write_is_taken_without_decoding(bus: Bus) -> None:
    nodes = bus.buckets.nodes
    decoded: list[bytes] = []

    class Counting(Bucket[NodeStatus]):
        def decode(self, raw: bytes) -> NodeStatus:
            decoded.append(raw)
            return super().decode(raw)

    mirror: Mirror[NodeStatus] = Mirror(Counting(nodes.kv, NodeStatus, bus.acks))
    await mirror.start(sync_within=5)
    try:
        mine = node("mine")
        raw = nodes.encode(mine)
        mirror.expect("mine", mine, raw)
        await nodes.create("mine", mine, raw=raw)
        # someone else's write of the same key with other bytes is decoded as usual
        await nodes.put("other", node("other"))
        await eventually(lambda: "other" in mirror.items and "mine" in mirror.items, within=5)
        assert mirror.get("mine") is mine  # the very object: no decode
        assert len(decoded) == 1
        assert b'"other"' in decoded[0]
        assert not mirror._expected
        # a write that failed says so, and its bytes are no longer taken on trust
        mirror.expect("later", mine, raw)
        mirror.unexpect("later")
        await nodes.put("later", mine)
        await eventually(lambda: "later" in mirror.items, within=5)
        assert mirror.get("later") is not mine
        assert len(decoded) == 2
    finally:
        await mirror.stop()


async def test_stop_wakes_a_sleeping_loop_at_once(bus: Bus) -> None:
    from corral.bus.lifecycle import Loops

    loops = Loops("test")
    turns: list[int] = []

    async def loop() -> None:
        while await loops.sleep(3600):
            turns.append(1)

    loops.spawn(loop(), "sleeper")
    await asyncio.sleep(0)
    await asyncio.wait_for(loops.stop(), 2)
    assert turns == []
    assert not loops._sleepers
    assert await loops.sleep(0.01) is False


def assignment(node_id: str, replica: str) -> Assignment:
    return Assignment(
        replica=replica,
        service="web",
        node=node_id,
        generation=1,
        template=Template(command=["sleep", "1"]),
        assigned_at=utcnow(),
    )


async def test_assignments_are_split_over_buckets_by_node(bus: Bus) -> None:
    bucket = bus.buckets.assignments
    assert len(bucket.parts) == ASSIGNMENT_PARTS
    assert bucket.name == bus.names.assignments
    nodes = [f"n{i}" for i in range(40)]
    for node_id in nodes:
        await bucket.create(f"{node_id}.r1", assignment(node_id, "r1"))
    used = {bucket.part(f"{node_id}.r1")._name for node_id in nodes}
    assert len(used) > ASSIGNMENT_PARTS // 2  # 40 nodes spread over most of the 16
    # a node's keys all live in one bucket, the one its prefix names
    assert bucket.part("n7.r1") is bucket.part("n7.other") is bucket.parts_for("n7.>")[0]
    assert len(bucket.parts_for(">")) == ASSIGNMENT_PARTS
    assert set(await bucket.items()) == {f"{n}.r1" for n in nodes}
    assert set(await bucket.items("n7.>")) == {"n7.r1"}
    stored = await bucket.get("n7.r1")
    assert stored is not None
    with pytest.raises(ConflictError):
        await bucket.update("n7.r1", assignment("n7", "r1"), stored.revision + 1000)
    # a mirror of everything sees every part; a node's mirror sees its own keys only
    everything: Mirror[Assignment] = Mirror(bucket)
    mine: Mirror[Assignment] = Mirror(bucket, prefix="n7.>")
    await everything.start(sync_within=5)
    await mine.start(sync_within=5)
    try:
        assert len(everything.items) == 40
        assert set(mine.items) == {"n7.r1"}
        await bucket.create("n7.r2", assignment("n7", "r2"))
        await bucket.delete("n8.r1")
        await eventually(lambda: "n7.r2" in mine.items and "n7.r2" in everything.items, within=5)
        await eventually(lambda: "n8.r1" not in everything.items, within=5)
        assert set(mine.items) == {"n7.r1", "n7.r2"}
    finally:
        await everything.stop()
        await mine.stop()


async def test_assignments_of_the_single_bucket_move_into_their_parts(
    settings: Settings,
) -> None:
    """A Corral from before the split kept every assignment in one bucket: the next start
    moves them into their parts and drops it, and a second start finds nothing to do."""
    first = await Bus.connect(settings, name="test-legacy")
    try:
        legacy = await first.js.create_key_value(
            KeyValueConfig(bucket=first.names.assignments, storage=StorageType.FILE)
        )
        old = {f"m{i}.r{i}": assignment(f"m{i}", f"r{i}") for i in range(12)}
        for key, value in old.items():
            await legacy.put(key, value.model_dump_json().encode())
    finally:
        await first.close()
    bus = await Bus.connect(settings, name="test-migrated")
    try:
        moved = await bus.buckets.assignments.items()
        assert {k: v.value for k, v in moved.items()} == old
        with pytest.raises(NotFoundError):
            await bus.js.key_value(bus.names.assignments)
    finally:
        await bus.close()
    again = await Bus.connect(settings, name="test-again")
    try:
        assert set(await again.buckets.assignments.items()) == set(old)
    finally:
        await again.close()


async def test_mirrors_answer_flow_control_from_one_shared_task(bus: Bus) -> None:
    """The ordered consumers of mirrors have no flow-control task of their own (one shared
    task per event loop stands in), and a burst larger than the server lets a push consumer
    have outstanding, read slowly, still arrives whole: the server's flow control requests
    are answered."""
    nodes = bus.buckets.nodes
    first: Mirror[NodeStatus] = Mirror(nodes, prefix="fc1.>")
    second: Mirror[NodeStatus] = Mirror(nodes, prefix="fc2.>")
    gate = asyncio.Event()

    async def slow(key: str, item: Versioned[NodeStatus] | None) -> None:
        await gate.wait()

    first.listen(slow)
    await first.start(sync_within=5)
    await second.start(sync_within=5)
    answerer = flow._ANSWERERS[asyncio.get_running_loop()]
    try:
        subs = [*first._subs, *second._subs]
        assert all(sub in answerer.subs for sub in subs)
        assert all(flow._state(sub)._fctask is None for sub in subs)  # no task of their own
        assert answerer.task is not None
        assert not answerer.task.done()
        big = {f"k{i}": "x" * 4000 for i in range(4)}
        count = 600  # ~10 MB
        for i in range(count):
            value = node(f"fc1.n{i}").model_copy(update={"labels": big})
            await nodes.put(f"fc1.n{i}", value)
        gate.set()
        await eventually(lambda: len(first.items) == count, within=10, what="every entry")
    finally:
        gate.set()
        await first.stop()
        await second.stop()
    assert not answerer.subs
    assert answerer.task is None


async def test_workers_of_a_process_share_one_mirror_of_a_bucket(bus: Bus) -> None:
    """Views start one watch between them; a view that starts later is told what is already
    there, as its own watch would have told it; the watch ends with the last view."""
    nodes = bus.buckets.nodes
    await nodes.put("sh.1", node("sh.1"))
    first: Mirror[NodeStatus] = SharedMirror(nodes)
    second: Mirror[NodeStatus] = SharedMirror(nodes)
    seen_first: list[str] = []
    seen_second: list[str] = []
    first.listen(lambda key, item: seen_first.append(key))
    second.listen(lambda key, item: seen_second.append(key))
    await first.start(sync_within=5)
    try:
        assert nodes.shared is not None
        shared, users = nodes.shared
        assert users == {first}
        assert "sh.1" in first.items
        assert "sh.1" in seen_first
        await nodes.put("sh.2", node("sh.2"))
        await eventually(lambda: "sh.2" in first.items, within=5)
        await second.start(sync_within=5)
        assert nodes.shared == (shared, {first, second})  # still one watch
        assert second.items is first.items
        assert {"sh.1", "sh.2"} <= set(seen_second)  # told what was there
        await nodes.put("sh.3", node("sh.3"))
        await eventually(lambda: "sh.3" in seen_first and "sh.3" in seen_second, within=5)
        # a write one view learns of is what every view reads
        later = node("sh.3", "later")
        second.note_written("sh.3", later, 10**9)
        assert first.get("sh.3") == later
        await first.stop()
        assert nodes.shared == (shared, {second})
        await nodes.put("sh.4", node("sh.4"))
        await eventually(lambda: "sh.4" in seen_second, within=5)
        assert "sh.4" not in seen_first  # a stopped view hears nothing more
    finally:
        await first.stop()
        await second.stop()
    assert nodes.shared is None
    assert not shared._subs  # the last view stopped the watch
