"""The bus edge: the one place that decides what an error does to the message that caused it.

- `RejectedError` (invalid, unknown, not found): a `…rejected` event names the cause, a copy goes
  to the dead-letter stream with the reason in its headers, and the message is acked.
- `TemporaryError`: nacked with its delay, so JetStream redelivers it.
- Anything else: nacked with backoff; on the last allowed delivery it is dead-lettered as an
  internal error, so it is never silently lost and never retried forever.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg

from corral.bus.codec import CORRELATION
from corral.bus.connection import Bus
from corral.bus.events import Emitter
from corral.schemas.errors import RejectedError, TemporaryError
from corral.schemas.events import CommandRejected, ErrorDetail

log = logging.getLogger(__name__)


def headers_of(msg: Msg) -> dict[str, str]:
    return dict(msg.headers or {})


def deliveries(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1


class CommandEdge:
    """Runs a command handler on one message and settles the message by the outcome."""

    def __init__(self, bus: Bus, emitter: Emitter, *, max_deliver: int) -> None:
        self.bus = bus
        self.emitter = emitter
        self.max_deliver = max_deliver

    async def run(self, msg: Msg, handler: Callable[[Msg], Awaitable[None]]) -> None:
        try:
            await handler(msg)
            await msg.ack()
        except RejectedError as exc:
            await self.reject(msg, exc.reason_code, exc.reason, exc.errors)
            await msg.ack()
        except TemporaryError as exc:
            log.info("retrying %s in %.1fs: %s", msg.subject, exc.delay, exc.reason)
            await msg.nak(delay=exc.delay)
        except Exception as exc:
            attempt = deliveries(msg)
            if attempt >= self.max_deliver:
                log.exception("giving up on %s after %d attempts", msg.subject, attempt)
                await self.reject(
                    msg, "error", f"internal error after {attempt} attempts: {exc}", []
                )
                await msg.ack()
            else:
                log.exception("error on %s (attempt %d), will retry", msg.subject, attempt)
                await msg.nak(delay=min(30.0, 0.5 * 2 ** (attempt - 1)))

    async def reject(self, msg: Msg, code: str, reason: str, errors: list[Any]) -> None:
        headers = headers_of(msg)
        lowered = {k.lower(): v for k, v in headers.items()}
        parsed = self.bus.names.parse_cmd(msg.subject)
        resource, name, verb = parsed if parsed else ("command", "invalid", "unknown")
        if not _token_ok(resource) or not _token_ok(name):
            resource, name = "command", "invalid"
        command_id = lowered.get("ce-id", "")
        data = CommandRejected(
            command=verb,
            command_id=command_id,
            name=name,
            code=code,
            reason=reason,
            errors=[ErrorDetail(loc=e.loc, msg=e.msg) for e in errors],
        )
        await self.emitter.emit(resource, name, "rejected", data, correlation=command_id or None)
        dead = dict(headers)
        dead.pop("Nats-Msg-Id", None)
        dead.update(
            {
                "corral-reason": reason.replace("\r", " ").replace("\n", " ")[:1024],
                "corral-code": code,
                "corral-attempts": str(deliveries(msg)),
                "corral-original-subject": msg.subject,
            }
        )
        if command_id:
            dead.setdefault(CORRELATION, command_id)
        await self.bus.js.publish(
            self.bus.names.dlq(msg.subject),
            msg.data,
            headers=dead,
            stream=self.bus.names.dlq_stream,
        )
        log.info("rejected %s: %s", msg.subject, reason)


def _token_ok(token: str) -> bool:
    return bool(token) and all(c.isalnum() or c in "-_" for c in token)
