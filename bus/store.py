"""Typed access to NATS KV: one `Bucket[T]` per record type, compare-and-set writes, and a
`Mirror` that watches a bucket and keeps the latest record of every key in memory (an informer,
in Kubernetes words)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ValidationError

from corral.schemas.errors import ConflictError

log = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)
_DELETES = ("DEL", "PURGE")
SETTLE = 0.05


@dataclass(frozen=True)
class Versioned(Generic[T]):
    value: T
    revision: int


class Bucket(Generic[T]):
    """A KV bucket holding records of one model."""

    def __init__(self, kv: KeyValue, model: type[T]) -> None:
        self.kv = kv
        self.model = model

    @property
    def name(self) -> str:
        return str(self.kv._name)

    def decode(self, raw: bytes) -> T:
        return self.model.model_validate_json(raw)

    async def get(self, key: str) -> Versioned[T] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None or entry.operation in _DELETES:
            return None
        return Versioned(self.decode(entry.value), entry.revision)

    async def create(self, key: str, value: T, *, ttl: float | None = None) -> int:
        """Write only if the key is absent (or deleted); ConflictError otherwise."""
        try:
            return int(await self.kv.create(key, value.model_dump_json().encode(), msg_ttl=ttl))
        except KeyWrongLastSequenceError as exc:
            raise ConflictError(f"{self.name}/{key} already exists") from exc

    async def update(self, key: str, value: T, revision: int) -> int:
        """Compare-and-set: write only if the key is still at `revision`."""
        try:
            return int(await self.kv.update(key, value.model_dump_json().encode(), last=revision))
        except KeyWrongLastSequenceError as exc:
            raise ConflictError(f"{self.name}/{key} changed since revision {revision}") from exc

    async def put(self, key: str, value: T) -> int:
        """Unconditional write; only for records whose single owner is the caller's node."""
        return int(await self.kv.put(key, value.model_dump_json().encode()))

    async def delete(self, key: str, revision: int | None = None) -> None:
        try:
            await self.kv.delete(key, last=revision)
        except KeyWrongLastSequenceError as exc:
            raise ConflictError(f"{self.name}/{key} changed since revision {revision}") from exc

    async def items(self, prefix: str = ">") -> dict[str, Versioned[T]]:
        """A one-off snapshot of every live key under `prefix` (`a.>`), or all with `>`."""
        out: dict[str, Versioned[T]] = {}

        def take(entry: KeyValue.Entry) -> None:
            if entry.operation in _DELETES or not entry.value:
                out.pop(entry.key, None)
            elif entry.revision is not None:
                with contextlib.suppress(ValidationError):
                    out[entry.key] = Versioned(self.decode(entry.value), entry.revision)

        watcher = await self.kv.watch(prefix)
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

    def __init__(self, bucket: Bucket[T], prefix: str = ">") -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.items: dict[str, Versioned[T]] = {}
        self.synced = asyncio.Event()
        self._listeners: list[Callable[[str, Versioned[T] | None], Awaitable[None] | None]] = []
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None

    def listen(
        self, listener: Callable[[str, Versioned[T] | None], Awaitable[None] | None]
    ) -> None:
        self._listeners.append(listener)

    def get(self, key: str) -> T | None:
        item = self.items.get(key)
        return item.value if item else None

    def values(self) -> list[T]:
        return [item.value for item in self.items.values()]

    async def start(self, sync_within: float = 30.0) -> None:
        self._watcher = await self.bucket.kv.watch(self.prefix)
        if await _watch_is_empty(self._watcher):
            self.synced.set()
        self._task = asyncio.create_task(self._run(), name=f"mirror:{self.bucket.name}")
        await asyncio.wait_for(self.synced.wait(), sync_within)

    async def stop(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def note_written(self, key: str, value: T, revision: int) -> None:
        """Record our own write at once, so a decision made before the watch catches up
        already counts it. The watch will deliver the same revision later."""
        current = self.items.get(key)
        if current is None or current.revision < revision:
            self.items[key] = Versioned(value, revision)

    def note_deleted(self, key: str) -> None:
        self.items.pop(key, None)

    async def _run(self) -> None:
        assert self._watcher is not None
        async for entry in self._watcher:
            if entry is None:
                continue  # not trusted (see _watch_is_empty); an entry with delta 0 is
            changed, item = self._apply(entry)
            if entry.delta == 0:
                self.synced.set()
            if not changed:
                continue
            for listener in self._listeners:
                try:
                    result = listener(entry.key, item)
                    if result is not None:
                        await result
                except Exception:
                    log.exception("listener failed on %s/%s", self.bucket.name, entry.key)

    def _apply(self, entry: KeyValue.Entry) -> tuple[bool, Versioned[T] | None]:
        """Fold one watched entry into `items`; False when it is older than what we hold."""
        key = entry.key
        current = self.items.get(key)
        revision = entry.revision or 0
        if current is not None and current.revision >= revision:
            return False, None  # the echo of our own write, or older: nothing new
        if entry.operation in _DELETES or not entry.value:
            self.items.pop(key, None)
            return True, None
        try:
            item = Versioned(self.bucket.decode(entry.value), revision)
        except ValidationError as exc:
            log.warning("skipping unreadable %s/%s: %s", self.bucket.name, key, exc)
            return False, None
        self.items[key] = item
        return True, item
