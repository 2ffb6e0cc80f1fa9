"""Typed access to NATS KV: one `Bucket[T]` per record type, compare-and-set writes, and a
`Mirror` that watches a bucket and keeps the latest record of every key in memory (an informer,
in Kubernetes words)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import APIError, InvalidKeyError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ValidationError

from corral.bus import flow
from corral.bus.publishing import Acks
from corral.schemas.errors import ConflictError

log = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)
U = TypeVar("U", bound=BaseModel)
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_EXPECT_ABSENT = {_EXPECTED_LAST: "0"}
_WRONG_LAST_SEQUENCE = (10071, 10164)
"""JetStream's error codes for a compare-and-set that lost (as nats-py's KV client reads them)"""
_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")


def _valid_key(key: str) -> bool:
    """NATS KV's key rule, as nats-py checks it before a write."""
    return bool(key) and key[0] != "." and key[-1] != "." and _KEY.match(key) is not None


_DELETES = ("DEL", "PURGE")
_KV_OP = "KV-Operation"
_MARKER = "Nats-Marker-Reason"
_MARKER_DELETES = ("MaxAge", "Purge", "Remove")
SETTLE = 0.05


@dataclass(frozen=True)
class Versioned(Generic[T]):
    value: T
    revision: int


class Bucket(Generic[T]):
    """A KV bucket holding records of one model. Writes go through `acks` when given (the
    bus's cheaper publish path, see `Acks`), else through nats-py's KV client."""

    def __init__(
        self,
        kv: KeyValue,
        model: type[T],
        acks: Acks | None = None,
        *,
        parts: Sequence[KeyValue] = (),
        name: str = "",
    ) -> None:
        self.kv = kv
        self.model = model
        self.acks = acks
        self.shared: tuple[Mirror[T], set[SharedMirror[T]]] | None = None
        """the whole-bucket mirror that this process's `SharedMirror`s read, and who uses it"""
        self.parts: list[KeyValue] = list(parts) or [kv]
        """the KV buckets that hold the keys: one, or several that split the keys by their
        first token (see `part`)"""
        self._name = name or str(kv._name)

    @property
    def name(self) -> str:
        return self._name

    def part(self, key: str) -> KeyValue:
        """The KV bucket that holds `key` (or a prefix `<first token>.>`): with several, the
        one a CRC-32 of the key's first token picks, the same in every process."""
        if len(self.parts) == 1:
            return self.parts[0]
        first = key.split(".", 1)[0]
        return self.parts[zlib.crc32(first.encode()) % len(self.parts)]

    def parts_for(self, prefix: str) -> list[KeyValue]:
        """The KV buckets that may hold keys under `prefix`."""
        first = prefix.split(".", 1)[0]
        if len(self.parts) == 1 or "*" in first or ">" in first:
            return list(self.parts)
        return [self.part(first)]

    def view(self, model: type[U]) -> Bucket[U]:
        """The same buckets, read as another model (a projection of the records)."""
        return Bucket(self.kv, model, self.acks, parts=self.parts, name=self._name)

    def decode(self, raw: bytes) -> T:
        return self.model.model_validate_json(raw)

    @staticmethod
    def encode(value: BaseModel) -> bytes:
        return value.model_dump_json().encode()

    async def get(self, key: str) -> Versioned[T] | None:
        try:
            entry = await self.part(key).get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None or entry.operation in _DELETES:
            return None
        return Versioned(self.decode(entry.value), entry.revision)

    async def create(
        self, key: str, value: T, *, ttl: float | None = None, raw: bytes | None = None
    ) -> int:
        """Write only if the key is absent (or deleted); ConflictError otherwise. `raw` is
        `value` already encoded (see `Mirror.expect`)."""
        data = raw if raw is not None else self.encode(value)
        if self.acks is not None and ttl is None:
            return await self._created(key, data, self._write(key, data, _EXPECT_ABSENT))
        return await self._created(key, data, None, ttl)

    async def create_started(
        self, key: str, value: T, *, raw: bytes | None = None
    ) -> Coroutine[Any, Any, int]:
        """`create`, sent now and awaited later: `await (await bucket.create_started(...))`,
        the same revision or ConflictError. A writer of many keys sends them back to back
        and collects the acks after, without a task per write. The returned coroutine must
        be awaited (or closed)."""
        data = raw if raw is not None else self.encode(value)
        if self.acks is None:
            return _ready(await self.create(key, value, raw=data))
        ack = await self.acks.send(self._subject(key), data, _EXPECT_ABSENT)
        return self._created(key, data, _wrong_last_sequence(ack))

    async def _created(
        self, key: str, data: bytes, first: Awaitable[int] | None, ttl: float | None = None
    ) -> int:
        """`create`'s outcome: `first`, a write that expected the key absent, if there was
        one; else, or when the key was present or deleted (a tombstone), nats-py's create,
        which tells which."""
        try:
            if first is not None:
                try:
                    return await first
                except KeyWrongLastSequenceError:
                    pass
            return int(await self.part(key).create(key, data, msg_ttl=ttl))
        except KeyWrongLastSequenceError as exc:
            raise ConflictError(f"{self.name}/{key} already exists") from exc

    async def update(self, key: str, value: T, revision: int, *, raw: bytes | None = None) -> int:
        """Compare-and-set: write only if the key is still at `revision`."""
        data = raw if raw is not None else self.encode(value)
        try:
            if self.acks is not None:
                return await self._write(key, data, {_EXPECTED_LAST: str(revision)})
            return int(await self.part(key).update(key, data, last=revision))
        except KeyWrongLastSequenceError as exc:
            raise ConflictError(f"{self.name}/{key} changed since revision {revision}") from exc

    async def put(self, key: str, value: T) -> int:
        """Unconditional write; only for records whose single owner is the caller's node."""
        if self.acks is not None:
            return await self._write(key, self.encode(value), None)
        return int(await self.part(key).put(key, value.model_dump_json().encode()))

    async def put_started(self, key: str, value: T) -> Awaitable[int]:
        """`put`, sent now and awaited later: `await (await bucket.put_started(k, v))`. A
        caller that has a second message to send after this one (in order, on the same
        connection) sends both before it waits for either ack, without a task for each."""
        if self.acks is None:
            return _ready(await self.put(key, value))
        return await self.acks.send(self._subject(key), self.encode(value))

    async def send(self, key: str, value: T) -> None:
        """An unconditional write that asks for no ack: the stream stores it all the same,
        but nobody learns whether it did. Only for a record rewritten on a period by its
        single owner, where the next write supersedes a lost one (heartbeats): a thousand
        nodes' acks cost their host's process a tenth of a core."""
        await self.part(key)._js._nc.publish(self._subject(key), self.encode(value))

    async def _write(self, key: str, data: bytes, headers: dict[str, str] | None) -> int:
        """A KV write as nats-py's client makes it (the same subject, headers and errors),
        through the bus's `Acks`."""
        assert self.acks is not None
        return await _wrong_last_sequence(self.acks.publish(self._subject(key), data, headers))

    def _subject(self, key: str) -> str:
        """The subject a write of `key` goes to, as nats-py's KV makes it; the key checked."""
        if not _valid_key(key):
            raise InvalidKeyError(key)
        return self.part(key)._pre + key

    async def delete(self, key: str, revision: int | None = None) -> None:
        try:
            await self.part(key).delete(key, last=revision)
        except KeyWrongLastSequenceError as exc:
            raise ConflictError(f"{self.name}/{key} changed since revision {revision}") from exc

    async def items(self, prefix: str = ">") -> dict[str, Versioned[T]]:
        """A one-off snapshot of every live key under `prefix` (`a.>`), or all with `>`."""
        found = await asyncio.gather(
            *(self._items(kv, prefix) for kv in self.parts_for(prefix)), return_exceptions=True
        )
        out: dict[str, Versioned[T]] = {}
        for one in found:  # every part is read to the end (or fails) before any error is raised
            if isinstance(one, BaseException):
                raise one
            out.update(one)
        return out

    async def _items(self, kv: KeyValue, prefix: str) -> dict[str, Versioned[T]]:
        out: dict[str, Versioned[T]] = {}

        def take(entry: KeyValue.Entry) -> None:
            if entry.operation in _DELETES or not entry.value:
                out.pop(entry.key, None)
            elif entry.revision is not None:
                with contextlib.suppress(ValidationError):
                    out[entry.key] = Versioned(self.decode(entry.value), entry.revision)

        watcher = await kv.watch(prefix)
        try:
            if await _watch_is_empty(watcher):
                return out
            while True:
                entry = await watcher.updates(timeout=10.0)
                if entry is None:
                    continue  # nats-py's "caught up" marker can overtake entries: not trusted
                take(entry)
                if entry.delta == 0:
                    break
            # a key rewritten while we read can be skipped (it is no longer its own last
            # message) and arrive just after "nothing pending": take what is still in flight
            while True:
                try:
                    entry = await watcher.updates(timeout=SETTLE)
                except (TimeoutError, NatsTimeoutError):
                    break
                if entry is None:
                    continue
                take(entry)
        finally:
            await watcher.stop()
        return out


async def _ready(value: int) -> int:
    return value


async def _wrong_last_sequence(write: Awaitable[int]) -> int:
    """A KV write's revision; a lost compare-and-set raised as nats-py's KV raises it."""
    try:
        return await write
    except APIError as exc:
        if exc.err_code in _WRONG_LAST_SEQUENCE:
            raise KeyWrongLastSequenceError(description=exc.description) from exc
        raise


def _position(reply: str) -> tuple[int, int, int]:
    """A delivered JetStream message's stream sequence (the key's revision), how many
    messages the consumer still has to deliver, and when the stream stored it (ns since the
    epoch), from its reply subject:
    `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`, or
    the newer form with `<domain>.<account hash>` after `$JS.ACK` (and a random token after)."""
    tokens = reply.split(".")
    if tokens[0] != "$JS" or tokens[1] != "ACK":
        raise ValueError(reply)
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[8]), int(tokens[7])
    return int(tokens[7]), int(tokens[10]), int(tokens[9])


async def _watch_is_empty(watcher: KeyValue.KeyWatcher) -> bool:
    """True when the watch has nothing to deliver. nats-py's initial None marker may arrive
    before entries already in flight (nats-io/nats.py#842), so the consumer is asked instead:
    what it delivered so far plus what is still pending."""
    subscription = watcher._sub
    if subscription is None:
        return False
    info = await subscription.consumer_info()
    return int(info.num_pending or 0) + int(info.delivered.consumer_seq or 0) == 0


Listener = Callable[[str, "Versioned[T] | None"], Awaitable[None] | None]


class Mirror(Generic[T]):
    """Watches a bucket (or a prefix of it) and keeps every key's latest record.

    `synced` is set once the initial snapshot has arrived; before that, an absent key may
    simply not have been delivered yet, so nobody should act on absence.
    """

    def __init__(
        self, bucket: Bucket[T], prefix: str = ">", *, decode: Callable[[bytes], T] | None = None
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.decode = decode or bucket.decode
        """how a watched entry becomes a record (the bucket's model by default); it raises
        ValidationError on a bad one, which is then skipped with a warning"""
        self.items: dict[str, Versioned[T]] = {}
        self.synced = asyncio.Event()
        self._listeners: list[Callable[[str, Versioned[T] | None], Awaitable[None] | None]] = []
        self._subs: list[JetStreamContext.PushSubscription] = []
        self._unsynced: set[int] = set()
        self._expected: dict[str, tuple[bytes, T]] = {}
        self._stored: dict[int, int] = {}
        """part -> when the stream stored the last message read from it (ns since the epoch)"""

    def listen(
        self, listener: Callable[[str, Versioned[T] | None], Awaitable[None] | None]
    ) -> None:
        self._listeners.append(listener)

    def unlisten(
        self, listener: Callable[[str, Versioned[T] | None], Awaitable[None] | None]
    ) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def get(self, key: str) -> T | None:
        item = self.items.get(key)
        return item.value if item else None

    def values(self) -> list[T]:
        return [item.value for item in self.items.values()]

    def as_of(self, now: datetime) -> datetime:
        """The moment this mirror is up to date with: `now` when it has read every message
        the bus delivered, otherwise when the bus stored the last one it read (those still
        queued in this process are newer). Ages judged against it, such as a heartbeat's,
        do not grow while a busy process falls behind its watch: 1,000 nodes all looked
        silent to a scheduler three seconds behind, and it refused to place anything."""
        behind = [
            self._stored[index]
            for index, sub in enumerate(self._subs)
            if sub.pending_msgs > 0 and index in self._stored
        ]
        if not behind:
            return now
        return min(now, datetime.fromtimestamp(min(behind) / 1e9, tz=UTC))

    async def start(self, sync_within: float = 30.0) -> None:
        """Watch the bucket: an ordered consumer (nats-py resets it on a gap) from the last
        value of every key, as `KeyValue.watch` does, but each message is folded in as it
        arrives. nats-py's watcher builds metadata dataclasses, an entry and a queue hop for
        every message, which cost the deployer a tenth of its time at 100,000 replicas."""
        parts = self.bucket.parts_for(self.prefix)
        self._unsynced = set(range(len(parts)))
        for index, kv in enumerate(parts):
            sub = await kv._js.subscribe(
                kv._pre + self.prefix,
                stream=kv._stream,
                cb=functools.partial(self._on_msg, kv._pre, index),
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                inactive_threshold=300.0,
            )
            self._subs.append(sub)
            flow.adopt(sub)
            info = await sub.consumer_info()
            delivered = info.delivered.consumer_seq if info.delivered is not None else 0
            if int(info.num_pending or 0) + int(delivered or 0) == 0:
                self._part_synced(index)
        await asyncio.wait_for(self.synced.wait(), sync_within)

    def _part_synced(self, index: int) -> None:
        self._unsynced.discard(index)
        if not self._unsynced:
            self.synced.set()

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            await flow.retire(sub)

    def expect(self, key: str, value: T, raw: bytes) -> None:
        """Say that this process is writing `raw` (the encoding of `value`) to `key`. The
        watch often brings a write back before its ack does, so `note_written` comes too late
        to skip it; a watched entry whose bytes are these is taken as `value` undecoded. Every
        `expect` ends with `note_written`, `note_deleted` or `unexpect`."""
        self._expected[key] = (raw, value)

    def unexpect(self, key: str) -> None:
        """The write that `expect` announced failed."""
        self._expected.pop(key, None)

    def note_written(self, key: str, value: T, revision: int) -> None:
        """Record our own write at once, so a decision made before the watch catches up
        already counts it. The watch will deliver the same revision later."""
        self._expected.pop(key, None)
        current = self.items.get(key)
        if current is None or current.revision < revision:
            self.items[key] = Versioned(value, revision)

    def note_deleted(self, key: str) -> None:
        self._expected.pop(key, None)
        self.items.pop(key, None)

    async def _on_msg(self, pre: str, index: int, msg: Msg) -> None:
        try:
            revision, pending, stored = _position(msg.reply)
        except (ValueError, IndexError):
            log.warning("%s: a watched message without JetStream metadata", self.bucket.name)
            return
        self._stored[index] = stored
        deleted = False
        headers = msg.headers
        if headers:
            if headers.get(_KV_OP) in _DELETES:
                deleted = True
            elif _MARKER in headers:
                # nats-server 2.11+ marks keys removed by a TTL or a purge this way
                if headers[_MARKER] not in _MARKER_DELETES:
                    if pending == 0:
                        self._part_synced(index)
                    return
                deleted = True
        key = msg.subject[len(pre) :]
        changed, item = self._apply(key, revision, msg.data, deleted)
        if pending == 0:
            self._part_synced(index)
        if changed:
            await self._tell(self._listeners, key, item)

    async def _tell(
        self,
        listeners: Sequence[Callable[[str, Versioned[T] | None], Awaitable[None] | None]],
        key: str,
        item: Versioned[T] | None,
    ) -> None:
        """Tell listeners of a change; one that fails is logged, the others still hear it."""
        for listener in listeners:
            try:
                result = listener(key, item)
                if result is not None:
                    await result
            except Exception:
                log.exception("listener failed on %s/%s", self.bucket.name, key)

    def _apply(
        self, key: str, revision: int, value: bytes, deleted: bool
    ) -> tuple[bool, Versioned[T] | None]:
        """Fold one watched entry into `items`; False when it is older than what we hold."""
        current = self.items.get(key)
        if current is not None and current.revision >= revision:
            return False, None  # the echo of our own write, or older: nothing new
        if deleted or not value:
            self.items.pop(key, None)
            return True, None
        expected = self._expected.get(key)
        if expected is not None and expected[0] == value:
            del self._expected[key]
            item = Versioned(expected[1], revision)
            self.items[key] = item
            return True, item
        try:
            item = Versioned(self.decode(value), revision)
        except ValidationError as exc:
            log.warning("skipping unreadable %s/%s: %s", self.bucket.name, key, exc)
            return False, None
        self.items[key] = item
        return True, item


class SharedMirror(Mirror[T]):
    """A worker's view of the one mirror of a whole bucket that the workers of a process
    share. `corral up` hosts the scheduler, deployer, healer and pipeline workers in one
    process, and each watched `corral-nodes` itself: every heartbeat was delivered and
    decoded four times. Reads (`items`, `get`, `as_of`, `note_written`) go to the shared
    mirror; listeners stay this view's own, are told what the mirror already holds when the
    view starts (as its own watch would have), and leave with it. The last view to stop
    stops the watch."""

    def __init__(self, bucket: Bucket[T]) -> None:
        super().__init__(bucket)
        self._shared: Mirror[T] | None = None

    async def start(self, sync_within: float = 30.0) -> None:
        if self._shared is not None:
            return
        found = self.bucket.shared
        if found is None:
            found = self.bucket.shared = (Mirror(self.bucket), set())
        mirror, users = found
        first = not users
        users.add(self)
        self._shared = mirror
        self.items = mirror.items
        self.synced = mirror.synced
        try:
            if first:
                for listener in self._listeners:
                    mirror.listen(listener)
                await mirror.start(sync_within)
                return
            await asyncio.wait_for(mirror.synced.wait(), sync_within)
            for listener in self._listeners:
                mirror.listen(listener)
            for key in list(mirror.items):
                item = mirror.items.get(key)  # as it is now: a live change may have come
                if item is not None:
                    await self._tell(self._listeners, key, item)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        mirror, self._shared = self._shared, None
        if mirror is None:
            return
        for listener in self._listeners:
            mirror.unlisten(listener)
        self.items = dict(mirror.items)
        self.synced = asyncio.Event()
        found = self.bucket.shared
        if found is None or found[0] is not mirror:
            return
        found[1].discard(self)
        if not found[1]:
            self.bucket.shared = None
            await mirror.stop()

    def as_of(self, now: datetime) -> datetime:
        return self._shared.as_of(now) if self._shared is not None else now

    def note_written(self, key: str, value: T, revision: int) -> None:
        if self._shared is not None:
            self._shared.note_written(key, value, revision)
        else:
            super().note_written(key, value, revision)
