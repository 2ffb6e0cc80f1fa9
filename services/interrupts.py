"""Ctrl-C and SIGTERM while a process starts: until FastStream's own handlers take over (they
stop the workers gracefully), either signal cancels the start-up and raises `Interrupted`, so
that a process still waiting for NATS stops at once, with a message and no traceback."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A signal stopped the start-up; `code` is the shell's exit status for it (128 + n)."""

    def __init__(self, signum: int, doing: str) -> None:
        self.signum = signum
        self.code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} while {doing}: stopped")


@contextlib.asynccontextmanager
async def interruptible(doing: str) -> AsyncIterator[None]:
    """Within the block, SIGINT or SIGTERM cancels the current task and the block raises
    `Interrupted` (`doing` says what it was doing). The handlers that were there before
    (asyncio.run's for Ctrl-C) are put back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread's loop
        return
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []
    active = [True]

    def on_signal(signum: int) -> None:
        # a signal read from the loop's wake-up pipe may be handled after the block ended
        if active[0] and not received:
            received.append(signum)
            task.cancel()

    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    except asyncio.CancelledError:
        if received and task.uncancel() == 0:
            raise Interrupted(received[0], doing) from None
        raise
    finally:
        active[0] = False
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
            if previous[sig] is not None:
                signal.signal(sig, previous[sig])
    if received:  # the signal came as the block ended: take its pending cancellation
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)
        task.uncancel()
        raise Interrupted(received[0], doing)
