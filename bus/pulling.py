"""Batches from a durable JetStream pull consumer, with one callback subscription.

nats-py's `PullSubscription.fetch` hands over each message through `next_msg`, which costs a
task, a `wait_for` and a uuid4 per message. `Puller` speaks the same pull protocol on the
public client API instead: one inbox subscription whose callback collects every delivered
message, and per fetch one `$JS.API.CONSUMER.MSG.NEXT` request.

- `fetch(batch, timeout)` first returns what an earlier request delivered since; otherwise it
  asks for up to `batch` messages with `no_wait` and returns them when the server says there are
  no more (status 404 or 408), or when the batch is full.
- When nothing is waiting it asks again, lingering for up to `timeout`, and returns as soon as
  the first message has come (with whatever came with it). What that request delivers later is
  kept for the next fetch. The messages are ordinary nats-py `Msg`s: ack, nak and metadata work.

Nothing delivered is dropped here; a message that is never acked (the caller stopped, say) is
delivered again after the consumer's `ack_wait`, as with any pull.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

API_PREFIX = "$JS.API"
_END = ("404", "408")
"""no messages (a no_wait request), request timeout (a lingering one expired)"""
_HEARTBEAT = "100"
_MARGIN = 0.05
"""a lingering request expires this much before the fetch gives up, so that the server's 408
normally arrives before the timeout"""


class PullError(Exception):
    """The server refused a pull (409: the consumer was deleted, too many waiting requests,
    ...; 503: no such consumer or stream answers); the message says why."""


class Puller:
    def __init__(
        self, nc: Client, stream: str, durable: str, *, api_prefix: str = API_PREFIX
    ) -> None:
        self.nc = nc
        self.subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._ready: deque[Msg] = deque()
        self._counter = 0
        self._request = ""
        """the reply token of the request the current fetch waits on"""
        self._ended = False
        self._status = ""
        self._want = 1
        """wake the fetch when this many messages are ready (or its request ended)"""
        self._arrived = asyncio.Event()
        self._fetching = asyncio.Lock()

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        # no pending limits: every message here was asked for, by batch
        self._sub = await self.nc.subscribe(
            self._inbox + ".*", cb=self._on_msg, pending_msgs_limit=0, pending_bytes_limit=0
        )

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._ready.clear()  # never acked: delivered again after ack_wait

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to `batch` messages; [] when none came within `timeout` seconds."""
        if self._sub is None:
            raise RuntimeError("Puller.start() has not run")
        async with self._fetching:
            if self._ready:
                return self._take(batch)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            await self._ask({"batch": batch, "no_wait": True})
            await self._wait(deadline, until_full=batch)
            if self._ready:
                return self._take(batch)
            self._raise_refusal()
            left = deadline - loop.time()
            if left <= _MARGIN:
                return []
            expires = int((left - _MARGIN) * 1_000_000_000)
            await self._ask({"batch": batch, "expires": expires})
            await self._wait(deadline, until_full=1)
            if self._ready:
                await asyncio.sleep(0)  # let what came in the same read be collected too
                return self._take(batch)
            self._raise_refusal()
            return []

    def _take(self, batch: int) -> list[Msg]:
        count = min(batch, len(self._ready))
        return [self._ready.popleft() for _ in range(count)]

    def _raise_refusal(self) -> None:
        if self._status:
            raise PullError(f"pull from {self.subject} refused: {self._status}")

    async def _ask(self, request: dict[str, object]) -> None:
        self._counter += 1
        self._request = str(self._counter)
        self._ended = False
        self._status = ""
        self._arrived.clear()
        reply = f"{self._inbox}.{self._request}"
        await self.nc.publish(self.subject, json.dumps(request).encode(), reply=reply)

    async def _wait(self, deadline: float, *, until_full: int) -> None:
        loop = asyncio.get_running_loop()
        self._want = until_full
        while not self._ended and len(self._ready) < until_full:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        # a status from the server has no payload and no ack subject; a delivered message
        # always has an ack subject, whatever headers its publisher gave it
        status = headers.get("Status") if headers and not msg.data and not msg.reply else None
        if status is None:
            self._ready.append(msg)
            if len(self._ready) < self._want:
                return  # one wake-up per batch, not one per message
        elif status == _HEARTBEAT:
            return
        elif msg.subject.endswith("." + self._request):
            # the end of the request the fetch waits on; an older request's end says nothing
            self._ended = True
            if status not in _END:
                description = headers.get("Description", "") if headers else ""
                self._status = f"{status} {description}".strip()
        self._arrived.set()
