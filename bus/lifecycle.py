"""Background loops that really stop.

Cancelling a task is not enough on its own: nats-py may catch the cancellation inside a request
and report it as a timeout, which a loop that retries on errors would then swallow, leaving a
task that never ends. So every loop also checks a stop flag on each turn, and sleeps on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Loops:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []

    @property
    def running(self) -> bool:
        return not self.stopping.is_set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{self.owner}:{name}")
        self.tasks.append(task)
        return task

    async def sleep(self, seconds: float) -> bool:
        """Sleep, or return early once stopping; True means: carry on."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return self.running

    async def stop(self, within: float = 15.0) -> None:
        self.stopping.set()
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=within)
        for task in pending:
            log.error("%s: task %s did not stop within %.0fs", self.owner, task.get_name(), within)


async def unsubscribe_quietly(sub: Any) -> None:
    """Unsubscribe on the way out; a connection already closed or draining is not an error."""
    try:
        await sub.unsubscribe()
    except Exception as exc:
        log.debug("unsubscribe: %s", exc)
