"""What to say while the first connection to NATS keeps failing: which failed attempts are
worth a warning (the first, then at most one every `WARN_EVERY` seconds, so a retry every half
second does not flood the log), the address without its credentials, and the error a process
gives up with. Pure: the caller passes the time in."""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.schemas.errors import CorralError

WARN_EVERY = 5.0
"""seconds between two warnings about the same unreachable NATS"""


class NatsUnreachableError(CorralError, ConnectionError):
    """The first connection to NATS did not succeed within `connect_timeout`: the process
    stops (the CLI exits 1). Once connected, a process never gives up on NATS."""

    exit_code = 1

    def __init__(self, url: str, message: str) -> None:
        super().__init__(message)
        self.url = url


class InvalidNatsUrl(NatsUnreachableError):
    """The address is not one nats-py can use: a mistake in the setting (the CLI exits 2)."""

    exit_code = 2


def redact_url(url: str) -> str:
    """`url` with its credentials hidden: `nats://user:pw@host` becomes `nats://user:***@host`
    and a token (`nats://tok@host`) becomes `***`. The address is worth printing; a secret
    is not."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon and user else "***"
    return f"{scheme}{sep}{shown}@{host}"


def _seconds(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


@dataclass
class Attempts:
    """The failed attempts at one first connection. `failed` records one and says whether to
    warn now; `gave_up` is the error once the deadline has passed."""

    url: str
    """the address as it may be shown (see `redact_url`)"""
    started: float
    within: float
    warn_every: float = WARN_EVERY
    count: int = 0
    last_error: str = ""
    _warned_at: float | None = field(default=None, repr=False)

    def failed(self, error: str, now: float) -> str | None:
        """Record a failed attempt at `now`; the warning to log, or None when one was logged
        less than `warn_every` seconds ago."""
        self.count += 1
        self.last_error = error
        if self._warned_at is not None and now - self._warned_at < self.warn_every:
            return None
        self._warned_at = now
        elapsed = max(0.0, now - self.started)
        left = max(0.0, self.started + self.within - now)
        tries = "1 failed attempt" if self.count == 1 else f"{self.count} failed attempts"
        return (
            f"cannot reach NATS at {self.url} yet: {error} ({tries} in {_seconds(elapsed)} s; "
            f"retrying for up to {_seconds(left)} s more)"
        )

    def gave_up(self) -> NatsUnreachableError:
        if self.count:
            tries = "1 attempt" if self.count == 1 else f"{self.count} attempts"
            why = f"{tries}; last error: {self.last_error}"
        else:
            why = "no attempt finished: nothing answers there, or something other than NATS"
        return NatsUnreachableError(
            self.url,
            f"cannot reach NATS at {self.url} within {_seconds(self.within)} s ({why}). "
            "Check that a NATS server runs there (`corral up` starts one) and that "
            "CORRAL_NATS_URL, or the nats.url a `corral up` wrote into the data directory, "
            "names it; CORRAL_CONNECT_TIMEOUT sets how long to wait.",
        )


def jetstream_missing(url: str, exc: BaseException) -> NatsUnreachableError:
    """NATS answers at `url`, but its JetStream does not: a server started without `-js`."""
    return NatsUnreachableError(
        url,
        f"NATS at {url} answers, but its JetStream does not ({describe_error(exc)}). Corral "
        "keeps its commands, events and state in JetStream: run nats-server with JetStream "
        "on (`-js`, or `jetstream {}` in its configuration), or point CORRAL_NATS_URL at one "
        "that has it.",
    )


def describe_error(exc: BaseException) -> str:
    """An attempt's error as one line: nats-py's own errors often have an empty message."""
    text = str(exc).strip()
    name = type(exc).__name__
    if not text:
        return name
    return text if isinstance(exc, OSError) or name in text else f"{name}: {text}"
