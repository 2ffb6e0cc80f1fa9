"""Corral's one error tree. Each class says what happens to the message that caused it.

    CorralError
     ├── RejectedError          permanent: a `…rejected` event, a dead letter, and an ack
     │    ├── InvalidInput      the payload or envelope does not validate
     │    ├── UnknownCommand    no handler for this subject or type
     │    └── NotFound          the command names something that does not exist
     ├── ConflictError          a compare-and-set lost: read again and decide again
     └── TemporaryError        retryable: the message is nacked with `delay` seconds

Only the bus edge (`corral.bus.edge`) turns these into ack, nack-with-delay or dead letter.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class CorralError(Exception):
    """Base of every error Corral raises on purpose."""


@dataclass(frozen=True)
class FieldError:
    """One validation failure: where (a dotted path) and why."""

    loc: str
    msg: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.msg}" if self.loc else self.msg


class RejectedError(CorralError):
    """The input can never succeed as sent. It is rejected, dead-lettered and acked."""

    reason_code = "rejected"

    def __init__(self, reason: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errors: list[FieldError] = errors or []


class InvalidInput(RejectedError):
    reason_code = "invalid"


class UnknownCommand(RejectedError):
    reason_code = "unknown"


class NotFound(RejectedError):
    reason_code = "not_found"


class ConflictError(CorralError):
    """A compare-and-set write lost the race; the caller reads again and decides again."""


@dataclass
class TemporaryError(CorralError):
    """Try again later: the edge nacks the message with this delay."""

    reason: str
    delay: float = 1.0
    details: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.reason


def field_errors_from_pydantic(exc: Exception) -> list[FieldError]:
    """Flatten a pydantic ValidationError into dotted paths and messages."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return [FieldError("", str(exc))]
    out: list[FieldError] = []
    for err in errors():
        loc = ".".join(str(part) for part in err.get("loc", ()))
        out.append(FieldError(loc, str(err.get("msg", "invalid"))))
    return out
