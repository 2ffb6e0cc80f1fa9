"""Resource groups across every run: one KV key per group (`<prefix>-pipeline-locks`), created
with compare-and-set by the job that takes it (`<run>.<job>`), deleted (again with
compare-and-set) when that job ends or waits for a retry. A watch keeps every copy of the
worker's view current and says when a group is freed, so the jobs waiting for it go at once.
A lock whose holder no longer runs (a crash between taking it and recording it) is freed."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from corral.bus.lifecycle import Loops
from corral.bus.pipelines import PipelineStore
from corral.schemas.runs import ACTIVE, JobState

log = logging.getLogger(__name__)


class GroupLocks:
    def __init__(self, store: PipelineStore, on_freed: Callable[[str], None]) -> None:
        self.store = store
        self.on_freed = on_freed
        self.held: dict[str, str] = {}
        """group -> holder, as the watch last said (or as we just wrote)"""

    async def watch(self, loops: Loops) -> None:
        watcher = await self.store.locks.watch(">")
        try:
            while loops.running:
                try:
                    entry = await watcher.updates(timeout=1.0)
                except (TimeoutError, NatsTimeoutError):
                    continue
                if entry is None:
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self.held.pop(entry.key, None)
                    self.on_freed(entry.key)
                else:
                    self.held[entry.key] = entry.value.decode()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def acquire(self, wanted: dict[str, str]) -> list[str]:
        """Take each group for its holder if it is free (or stale); returns those taken."""
        got: list[str] = []
        for group, me in wanted.items():
            for _ in range(2):
                try:
                    await self.store.locks.create(group, me.encode())
                    self.held[group] = me
                    got.append(group)
                    break
                except KeyWrongLastSequenceError:
                    if not await self.free_if_stale(group):
                        break
        return got

    async def free_if_stale(self, group: str) -> bool:
        """Free a lock whose holder's run has finished (or is gone), or whose job no longer
        runs; True if the group is free now."""
        try:
            entry = await self.store.locks.get(group)
        except KeyNotFoundError:
            return True
        if entry.value is None or entry.revision is None:
            return True
        owner = entry.value.decode()
        run_id, _, job = owner.rpartition(".")
        found = await self.store.runs.get(run_id)
        run = found.value if found is not None else None
        current = run.jobs.get(job) if run is not None else None
        if current is not None and current.state in ACTIVE and current.holds == group:
            self.held[group] = owner
            return False
        taking = run is not None and not run.finished and current is not None
        if taking and current is not None and current.state == JobState.PENDING:
            return False  # it is taking the lock right now
        try:
            await self.store.locks.delete(group, last=entry.revision)
        except KeyWrongLastSequenceError:
            return False
        log.info("freed resource_group %s, held by %s which no longer runs", group, owner)
        return True

    async def release(self, groups: dict[str, str], *, run: str | None = None) -> None:
        """Delete each group's lock if `owner` (or, without one, this run) still holds it."""
        for group, owner in groups.items():
            try:
                entry = await self.store.locks.get(group)
            except KeyNotFoundError:
                continue
            if entry.value is None or entry.revision is None:
                continue
            held = entry.value.decode()
            if (owner and held != owner) or (run is not None and not held.startswith(f"{run}.")):
                continue
            with contextlib.suppress(KeyWrongLastSequenceError):
                await self.store.locks.delete(group, last=entry.revision)
            self.held.pop(group, None)
