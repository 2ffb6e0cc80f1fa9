"""The unfinished runs, in memory: what the worker reconciles, spreads load over and resyncs.

Runs are kept in KV long after they finish, so the worker never replays the whole runs
bucket. An index bucket holds one key per unfinished run (added when a run starts or is
retried, removed when it finishes); at start the worker reads the index and then each run it
names, and from then on follows new writes to the runs bucket (an ordered consumer that
starts at the end of the stream), which is how it sees what other copies of the worker
write."""

from __future__ import annotations

import contextlib
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import KeyNotFoundError, NoKeysError
from pydantic import ValidationError

from corral.bus.pipelines import PipelineStore
from corral.bus.store import Versioned
from corral.schemas.runs import RunRecord

log = logging.getLogger(__name__)


class ActiveRuns:
    def __init__(self, store: PipelineStore, js: JetStreamContext) -> None:
        self.store = store
        self.js = js
        self.items: dict[str, Versioned[RunRecord]] = {}
        self._sub: JetStreamContext.PushSubscription | None = None
        self._subject = f"$KV.{store.runs.name}."

    def get(self, run_id: str) -> RunRecord | None:
        item = self.items.get(run_id)
        return item.value if item else None

    def values(self) -> list[RunRecord]:
        return [item.value for item in self.items.values()]

    async def start(self) -> list[str]:
        """Follow new writes, then load every indexed run; returns their ids."""
        self._sub = await self.js.subscribe(
            f"{self._subject}>",
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
            cb=self._on_write,
        )
        return await self.load()

    async def load(self) -> list[str]:
        """Read the index and each run it names; drop index keys of finished or gone runs."""
        try:
            keys = await self.store.active.keys()
        except NoKeysError:
            keys = []
        found: list[str] = []
        for key in keys:
            item = await self.store.runs.get(key)
            if item is None or item.value.finished:
                with contextlib.suppress(KeyNotFoundError):
                    await self.store.active.delete(key)
                self.items.pop(key, None)
                continue
            self.note(key, item)
            found.append(key)
        return found

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def note(self, run_id: str, item: Versioned[RunRecord]) -> None:
        current = self.items.get(run_id)
        if current is not None and current.revision >= item.revision:
            return
        if item.value.finished:
            self.items.pop(run_id, None)
        else:
            self.items[run_id] = item

    async def written(self, run: RunRecord, revision: int, *, started: bool = False) -> None:
        """After our own write: remember it, and keep the index in step (a run that starts
        or is retried goes in, one that finishes goes out)."""
        self.note(run.id, Versioned(run, revision))
        if run.finished:
            with contextlib.suppress(KeyNotFoundError):
                await self.store.active.delete(run.id)
        elif started:
            await self.store.active.put(run.id, b"")

    async def _on_write(self, msg: Msg) -> None:
        key = msg.subject[len(self._subject) :]
        try:
            revision = int(msg.metadata.sequence.stream)
        except Exception:
            return
        operation = (msg.headers or {}).get("KV-Operation", "")
        if operation in ("DEL", "PURGE") or not msg.data:
            self.items.pop(key, None)
            return
        current = self.items.get(key)
        if current is not None and current.revision >= revision:
            return  # our own write, already noted
        try:
            run = self.store.runs.decode(msg.data)
        except ValidationError as exc:
            log.warning("skipping an unreadable run %s: %s", key, exc)
            return
        self.note(key, Versioned(run, revision))
