"""Flow-control replies for every ordered consumer in a process, from one task.

nats-py gives each ordered consumer a task that wakes every 0.25 s to see whether a flow
control request from the server can be answered yet (the server pauses a push consumer until
it is). A process that hosts a thousand simulated nodes holds a thousand such watches, and
their four thousand wake-ups a second were most of what its idle nodes cost. `adopt` stops a
subscription's own task and puts it under this module's single task per event loop, which
makes the same check on every adopted subscription on the same period. A nats-py whose
internals differ keeps its own task (`adopt` says False).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any

log = logging.getLogger(__name__)
PERIOD = 0.25
"""seconds between two looks, as nats-py's own task"""
_FIELDS = ("_fctask", "_fcr", "_fcd", "_fciseq", "_psub", "_conn")


class _Answerer:
    def __init__(self) -> None:
        self.subs: dict[Any, Any] = {}
        """subscription -> its JetStream state (nats-py's `_JSI`)"""
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(PERIOD)
            for jsi in list(self.subs.values()):
                await _answer(jsi)


_ANSWERERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Answerer] = (
    weakref.WeakKeyDictionary()
)


def _answerer() -> _Answerer:
    loop = asyncio.get_running_loop()
    found = _ANSWERERS.get(loop)
    if found is None:
        found = _ANSWERERS[loop] = _Answerer()
    return found


async def _answer(jsi: Any) -> None:
    """nats-py's check: reply once every message before the request has been handed over."""
    reply = jsi._fcr
    if not reply or jsi._fciseq - jsi._psub._pending_queue.qsize() < jsi._fcd:
        return
    jsi._fcr = None
    jsi._fcd = 0
    try:
        await jsi._conn.publish(reply)
    except Exception as exc:  # as nats-py: the server asks again
        log.debug("flow control reply: %s", exc)


def _state(sub: Any) -> Any:
    """The subscription's JetStream state: nats-py keeps it on the plain subscription that
    its push subscription wraps."""
    inner = getattr(sub, "_sub", None)
    return getattr(inner, "_jsi", None) or getattr(sub, "_jsi", None)


def adopt(sub: Any) -> bool:
    """Answer `sub`'s flow control from the shared task instead of its own."""
    jsi = _state(sub)
    if jsi is None or not all(hasattr(jsi, name) for name in _FIELDS):
        return False
    own = jsi._fctask
    if not isinstance(own, asyncio.Task):
        return False
    own.cancel()
    jsi._fctask = None
    answerer = _answerer()
    answerer.subs[sub] = jsi
    if answerer.task is None or answerer.task.done():
        answerer.task = asyncio.create_task(answerer.run(), name="flow-control replies")
    return True


async def release(sub: Any) -> None:
    """Stop answering for `sub` (before unsubscribing it); the task ends with the last one."""
    answerer = _ANSWERERS.get(asyncio.get_running_loop())
    if answerer is None or sub not in answerer.subs:
        return
    del answerer.subs[sub]
    if answerer.subs or answerer.task is None:
        return
    task, answerer.task = answerer.task, None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def retire(sub: Any) -> None:
    """Unsubscribe an ordered consumer for good. nats-py's heartbeat monitor resets the
    consumer (a new subscription id for the same subscription) when the process has not read
    its heartbeats in time, which a busy process stopping many watches at once does not. A
    reset while the subscription was being unsubscribed left the new id registered with
    nothing reading it, and draining the connection waited for it until the drain timed out.
    The monitor stops first, and an id that a reset left behind is removed as well."""
    await release(sub)
    jsi = _state(sub)
    monitor = getattr(jsi, "_hbtask", None)
    if isinstance(monitor, asyncio.Task) and not monitor.done():
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await monitor
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
    await _drop_left(sub)


async def _drop_left(sub: Any) -> None:
    conn = getattr(sub, "_conn", None)
    registered = getattr(conn, "_subs", None)
    if conn is None or not isinstance(registered, dict):
        return
    inner = getattr(sub, "_sub", sub)
    for sid in {getattr(sub, "_id", None), getattr(inner, "_id", None)}:
        held = registered.get(sid)
        if held is not inner and held is not sub:
            continue
        log.debug("removing subscription %s left by a consumer reset", sid)
        registered.pop(sid, None)
        with contextlib.suppress(Exception):
            held._stop_processing()
        if not (conn.is_closed or conn.is_draining or conn.is_reconnecting):
            with contextlib.suppress(Exception):
                await conn._send_unsubscribe(sid)
