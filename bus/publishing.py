"""Pipelined JetStream publishing: many publishes sent back to back, their acks awaited once.

nats-py's `publish_async` pays, per message, a semaphore `wait_for`, a future with a done
callback, a `getrandom` syscall for the reply token and a `PubAck` built through dataclass
introspection. A worker that publishes hundreds of messages per batch and then waits for all of
them needs none of that: one reply subscription per connection, a counter for the tokens, and
one waiter per batch.

    pipeline = Pipeline(nc)
    await pipeline.start()
    batch = pipeline.batch()
    first = await batch.publish("corral.evt.x", b"{}", {"Nats-Msg-Id": "a"})
    results = await batch.wait(timeout=5.0)   # results[first]: a PubAck or an exception

The guarantees are JetStream's own: a `PubAck` means the stream stored the message (or had it
already, `duplicate`); an `APIError` (for example a compare-and-set that lost) or a
`NoStreamResponseError` means it did not; a reply that never came is a `TimeoutError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Generator
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError

Result = PubAck | BaseException
_NO_RESPONDERS = "503"


class Batch:
    """One round of publishes. Publish, then `wait` once; a batch is used once."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._results: list[Result | None] = []
        self._tokens: list[str] = []
        self._outstanding = 0
        self._done = asyncio.Event()
        self._done.set()

    def __len__(self) -> int:
        return len(self._results)

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> int:
        """Send one message to a stream; returns its index in the results of `wait`."""
        index = len(self._results)
        self._results.append(None)
        token = self._pipeline._register(self, index)
        self._tokens.append(token)
        self._outstanding += 1
        self._done.clear()
        try:
            await self._pipeline.nc.publish(
                subject, payload, reply=self._pipeline.prefix + token, headers=headers
            )
        except BaseException as exc:
            self._settle(index, exc)
            self._pipeline._pending.pop(token, None)
            raise
        return index

    def _settle(self, index: int, result: Result) -> None:
        if self._results[index] is not None:
            return
        self._results[index] = result
        self._outstanding -= 1
        if self._outstanding == 0:
            self._done.set()

    async def wait(self, timeout: float) -> list[Result]:
        """Every publish's outcome, in order. A reply that has not come within `timeout`
        seconds is a `TimeoutError`; it is forgotten, so a late reply changes nothing."""
        if self._outstanding:
            try:
                await asyncio.wait_for(self._done.wait(), timeout)
            except TimeoutError:
                for index, result in enumerate(self._results):
                    if result is None:
                        self._pipeline._pending.pop(self._tokens[index], None)
                        self._settle(index, TimeoutError(f"no ack within {timeout:.1f}s"))
        return [result for result in self._results if result is not None]


class Pipeline:
    """The reply subscription that every `Batch` of one connection shares."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = ""
        self._sub: Subscription | None = None
        self._pending: dict[str, tuple[Batch, int]] = {}
        self._counter = 0

    async def start(self) -> None:
        self.prefix = self.nc.new_inbox() + "."
        self._sub = await self.nc.subscribe(self.prefix + "*", cb=self._on_reply)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None and not self.nc.is_closed:
            await sub.unsubscribe()
        for batch, index in list(self._pending.values()):
            batch._settle(index, ConnectionError("the publish pipeline stopped"))
        self._pending.clear()

    def batch(self) -> Batch:
        if self._sub is None:
            raise RuntimeError("Pipeline.start() has not run")
        return Batch(self)

    def _register(self, batch: Batch, index: int) -> str:
        self._counter += 1
        token = str(self._counter)
        self._pending[token] = (batch, index)
        return token

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject[len(self.prefix) :], None)
        if entry is None:
            return  # timed out already, or not ours
        batch, index = entry
        batch._settle(index, _outcome(msg))


def _outcome(msg: Msg) -> Result:
    if not msg.data:
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            return NoStreamResponseError()
        return APIError(description=f"empty reply to a publish: {msg.headers!r}")
    try:
        response: dict[str, Any] = json.loads(msg.data)
    except ValueError as exc:
        return APIError(description=f"unreadable reply to a publish: {exc}")
    error = response.get("error")
    if error is not None:
        try:
            APIError.from_error(error)  # raises the matching subclass
        except APIError as exc:
            return exc
        return APIError(description=str(error))
    return PubAck(
        stream=response["stream"],
        seq=response["seq"],
        domain=response.get("domain"),
        duplicate=response.get("duplicate"),
    )


class Acks:
    """One JetStream publish awaited on its own, cheaper than `JetStreamContext.publish`.

    nats-py's publish is a request: a fresh inbox token (a NUID), an `asyncio.wait_for` with
    its timer, and a `PubAck` built by dataclass introspection, about 65 us of CPU per message
    against 34 us here (`bench/README.md`). At 100,000 replicas every status, assignment and
    event goes through it, so the saving is a core's worth. One reply subscription per
    connection, a counter for the tokens, and one sweep every `SWEEP` seconds for the replies
    that never came. The outcomes are the same as nats-py's: the stream sequence, or the
    `APIError` (with its code), `NoStreamResponseError` or `nats.errors.TimeoutError` that
    `js.publish` raises.
    """

    SWEEP = 0.25

    def __init__(self, nc: Client, timeout: float = 5.0) -> None:
        self.nc = nc
        self.timeout = timeout
        self.prefix = ""
        self._sub: Subscription | None = None
        self._pending: dict[str, tuple[asyncio.Future[Result], float]] = {}
        self._counter = 0
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return self._sub is not None

    async def start(self) -> None:
        self.prefix = self.nc.new_inbox() + "."
        self._sub = await self.nc.subscribe(self.prefix + "*", cb=self._on_reply)
        self._sweeper = asyncio.create_task(self._sweep(), name="acks-sweep")

    async def stop(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        sub, self._sub = self._sub, None
        if sub is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for future, _ in self._pending.values():
            if not future.done():
                future.set_result(ConnectionError("the acks subscription stopped"))
        self._pending.clear()

    async def publish(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Publish to a stream and wait for its ack; the stored message's sequence."""
        token, future = self._expect(timeout)
        try:
            await self.nc.publish(subject, payload, reply=self.prefix + token, headers=headers)
            result = await future
        finally:
            self._pending.pop(token, None)
        if isinstance(result, BaseException):
            raise result
        return result.seq

    async def send(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Ack:
        """Publish to a stream now; the returned `Ack` is awaited for the outcome (once, and
        always: until then its reply is kept). Two messages that must reach the bus in order
        but whose acks may be awaited together go out this way, without a task for each."""
        token, future = self._expect(timeout)
        try:
            await self.nc.publish(subject, payload, reply=self.prefix + token, headers=headers)
        except BaseException:
            self._pending.pop(token, None)
            raise
        return Ack(self, token, future)

    def _expect(self, timeout: float | None) -> tuple[str, asyncio.Future[Result]]:
        """A token for the reply subject, and the future its reply (or the sweep) settles."""
        if self._sub is None:
            raise RuntimeError("Acks.start() has not run")
        loop = asyncio.get_running_loop()
        self._counter += 1
        token = str(self._counter)
        future: asyncio.Future[Result] = loop.create_future()
        self._pending[token] = (future, loop.time() + (timeout or self.timeout))
        return token, future

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject[len(self.prefix) :], None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(_outcome(msg))

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.SWEEP)
            now = loop.time()
            late = [t for t, (_, deadline) in self._pending.items() if deadline <= now]
            for token in late:
                future, _ = self._pending.pop(token)
                if not future.done():
                    future.set_result(NatsTimeoutError())


class Ack:
    """The outcome of one `Acks.send`: `await ack` is the stored message's sequence, or
    raises what `Acks.publish` raises."""

    def __init__(self, acks: Acks, token: str, future: asyncio.Future[Result]) -> None:
        self._acks = acks
        self._token = token
        self._future = future

    def __await__(self) -> Generator[Any, None, int]:
        return self._wait().__await__()

    async def _wait(self) -> int:
        try:
            result = await self._future
        finally:
            self._acks._pending.pop(self._token, None)
        if isinstance(result, BaseException):
            raise result
        return result.seq
