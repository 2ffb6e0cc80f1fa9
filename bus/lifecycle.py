"""Background loops that really stop.

Cancelling a task is not enough on its own: nats-py may catch the cancellation inside a request
and report it as a timeout, which a loop that retries on errors would then swallow, leaving a
task that never ends. So every loop also checks a stop flag on each turn, and sleeps on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Loops:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []
        self._sleepers: set[asyncio.Future[None]] = set()

    @property
    def running(self) -> bool:
        return not self.stopping.is_set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{self.owner}:{name}")
        self.tasks.append(task)
        return task

    async def sleep(self, seconds: float) -> bool:
        """Sleep, or return early once stopping; True means: carry on.

        A future and a timer, which `stop` wakes: `wait_for` on the event cost a task and a
        cancellation per turn, and 1,000 simulated nodes sleep a thousand times a second."""
        if not self.running:
            return False
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _wake, woken)
        self._sleepers.add(woken)
        try:
            await woken
        finally:
            timer.cancel()
            self._sleepers.discard(woken)
        return self.running

    async def stop(self, within: float = 15.0) -> None:
        self.stopping.set()
        for woken in list(self._sleepers):
            _wake(woken)
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=within)
        for task in pending:
            log.error("%s: task %s did not stop within %.0fs", self.owner, task.get_name(), within)


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


async def unsubscribe_quietly(sub: Any) -> None:
    """Unsubscribe on the way out; a connection already closed or draining is not an error."""
    try:
        await sub.unsubscribe()
    except Exception as exc:
        log.debug("unsubscribe: %s", exc)


async def on_server(nc: Any) -> None:
    """Return once the server has read every command this connection queued before the call,
    a new subscription above all. `flush()` alone does not promise that in nats-py 2.16: its
    PING goes straight to the socket while earlier commands wait in the queue for the flusher
    task, so the PONG can come back before the server has read an earlier SUB, and a request
    sent on another connection at that moment finds no responders (it did, in CI). So the
    queue is written out first (a private call: there is no public one), then the ping."""
    write_queue = getattr(nc, "_flush_pending", None)
    if write_queue is not None:
        await write_queue(force_flush=True)
    await nc.flush()
