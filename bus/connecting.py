"""The first connection to NATS, bounded by `connect_timeout`.

With unlimited reconnects nats-py retries its first connection forever (its server pool never
runs dry), so a process pointed at a wrong or dead address waited silently for ever. Here the
first connection is retried (NATS may be starting at the same time) until the deadline, with a
warning every few seconds, then fails with `NatsUnreachableError`, the half-made client closed
so that none of its tasks or sockets outlive the attempt. Once connected, nats-py reconnects
without limit as before: a NATS restart must not stop a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.errors import Error as NatsError

from corral.bus.client import Client
from corral.bus.unreachable import Attempts, InvalidNatsUrl, describe_error, redact_url

log = logging.getLogger(__name__)
ATTEMPT_TIMEOUT = 5
"""seconds nats-py gives one attempt's TCP connect, and then the server's INFO"""
RETRY_WAIT = 0.5
"""seconds between two attempts at the same server (nats-py's `reconnect_time_wait`)"""


class _ErrorLog:
    """nats-py's error callback. Until the first connection, failed attempts are counted and
    warned about at most every few seconds (`Attempts`); afterwards every error is logged."""

    def __init__(self, attempts: Attempts) -> None:
        self.attempts = attempts
        self.connected = False

    async def report(self, exc: Exception) -> None:
        if self.connected:
            log.warning("nats: %s", exc)
            return
        warning = self.attempts.failed(describe_error(exc), time.monotonic())
        if warning is not None:
            log.warning("%s", warning)


async def connect_first(url: str, *, name: str, within: float) -> Client:
    """A connected client, or `NatsUnreachableError` after `within` seconds of failed
    attempts. Cancelling it (Ctrl-C) closes the half-made client too."""
    if within <= 0:
        raise ValueError(f"within must be > 0, got {within}")
    shown = redact_url(url)
    errors = _ErrorLog(Attempts(shown, time.monotonic(), within))
    nc = Client()
    try:
        async with asyncio.timeout(within):
            await nc.connect(
                url,
                name=name,
                connect_timeout=ATTEMPT_TIMEOUT,
                max_reconnect_attempts=-1,
                reconnect_time_wait=RETRY_WAIT,  # type: ignore[arg-type]  # nats-py says int
                error_cb=errors.report,  # nats-py wants a coroutine function
            )
    except TimeoutError:
        await _discard(nc)
        raise errors.attempts.gave_up() from None
    except NatsError as exc:
        # attempts never raise (they are retried), so this is the address itself
        await _discard(nc)
        raise InvalidNatsUrl(shown, f"cannot use NATS URL {shown!r}: {exc}") from None
    except BaseException:
        await _discard(nc)
        raise
    errors.connected = True
    return nc


async def _discard(nc: Client) -> None:
    """Close a client whose first connection did not complete (its reader, flusher and
    pinger tasks, if the handshake got that far, and its socket)."""
    with contextlib.suppress(Exception):
        await nc.close()
