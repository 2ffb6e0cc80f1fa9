"""Leader leases in KV: one holder at a time for work that must not run twice at once (the
deployer's reconcile). The holder renews with compare-and-set; a lease whose holder stopped
renewing is taken over after it expires."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from corral.bus.lifecycle import Loops

log = logging.getLogger(__name__)


class Lease:
    def __init__(self, kv: KeyValue, key: str, *, ttl: float = 5.0) -> None:
        self.kv = kv
        self.key = key
        self.ttl = ttl
        self.holder = uuid.uuid4().hex
        self.held = asyncio.Event()
        self._revision: int | None = None
        self.loops = Loops(f"lease {key}")

    def _value(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": time.time() + self.ttl}).encode()

    async def try_acquire(self) -> bool:
        try:
            entry = await self.kv.get(self.key)
        except KeyNotFoundError:
            entry = None
        try:
            if entry is None or entry.value is None or entry.operation in ("DEL", "PURGE"):
                if entry is not None and entry.revision is not None:
                    self._revision = await self.kv.update(
                        self.key, self._value(), last=entry.revision
                    )
                else:
                    self._revision = await self.kv.create(self.key, self._value())
                return True
            current = json.loads(entry.value)
            mine = current.get("holder") == self.holder
            if mine or float(current.get("expires", 0)) < time.time():
                self._revision = await self.kv.update(self.key, self._value(), last=entry.revision)
                return True
        except KeyWrongLastSequenceError:
            return False
        return False

    async def _renew(self) -> bool:
        try:
            self._revision = await self.kv.update(self.key, self._value(), last=self._revision)
            return True
        except KeyWrongLastSequenceError:
            return False

    async def run(self) -> None:
        """Acquire, then keep renewing; clears `held` the moment renewal fails."""
        interval = self.ttl / 3
        while self.loops.running:
            try:
                if self.held.is_set():
                    if not await self._renew():
                        log.warning("lost lease %s", self.key)
                        self.held.clear()
                elif await self.try_acquire():
                    log.info("acquired lease %s", self.key)
                    self.held.set()
            except Exception as exc:
                log.warning("lease %s: %s", self.key, exc)
                self.held.clear()
            await self.loops.sleep(interval)

    def start(self) -> None:
        self.loops.spawn(self.run(), "renew")

    async def stop(self) -> None:
        await self.loops.stop()
        if self.held.is_set() and self._revision is not None:
            # hand over at once instead of making the next holder wait out the ttl
            with contextlib.suppress(Exception):
                await self.kv.delete(self.key, last=self._revision)
        self.held.clear()
