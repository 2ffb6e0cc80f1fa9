"""`corral.bus.unreachable`: which failed first attempts are warned about, how an address is
shown without its credentials, and the error a process gives up with."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.errors import NoServersError
from nats.js.errors import ServiceUnavailableError

from corral.bus.unreachable import (
    WARN_EVERY,
    Attempts,
    NatsUnreachableError,
    describe_error,
    jetstream_missing,
    redact_url,
)
from corral.schemas.errors import CorralError

URL = "nats://127.0.0.1:4222"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (URL, URL),
        ("nats://alice:s3cret@nats.example:4222", "nats://alice:***@nats.example:4222"),
        ("nats://tok3n@nats.example:4222", "nats://***@nats.example:4222"),
        ("tls://bob:p@ss@host:4443", "tls://bob:***@host:4443"),  # '@' in the password
        ("bob:pw@host:4222", "bob:***@host:4222"),  # no scheme: nats-py adds nats://
        ("nats://:pw@host", "nats://***@host"),  # no user: all of it is secret
        ("127.0.0.1:4222", "127.0.0.1:4222"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


secrets = st.text(st.characters(codec="ascii", exclude_characters="/?#"), min_size=4)


@given(user=st.from_regex(r"[a-z]{1,8}", fullmatch=True), password=secrets)
def test_a_password_is_never_shown(user: str, password: str) -> None:
    shown = redact_url(f"nats://{user}:{password}@host.example:4222")
    assert password not in shown.removeprefix(f"nats://{user}:")
    assert shown.endswith("@host.example:4222")


@given(token=st.text(st.characters(codec="ascii", exclude_characters="/?#:"), min_size=4))
def test_a_token_is_never_shown(token: str) -> None:
    shown = redact_url(f"nats://{token}@host.example:4222")
    assert shown == "nats://***@host.example:4222"


def test_the_first_failure_warns_then_the_warnings_are_spaced() -> None:
    attempts = Attempts(URL, started=100.0, within=30.0)
    first = attempts.failed("[Errno 111] Connect call failed", 100.2)
    assert first == (
        f"cannot reach NATS at {URL} yet: [Errno 111] Connect call failed "
        "(1 failed attempt in 0.2 s; retrying for up to 29.8 s more)"
    )
    # an attempt every half second: silent until WARN_EVERY has passed since the warning
    quiet = [attempts.failed("refused", 100.2 + 0.5 * i) for i in range(1, 10)]
    assert quiet == [None] * 9
    again = attempts.failed("refused", 100.2 + WARN_EVERY)
    assert again is not None
    assert "11 failed attempts in 5.2 s" in again
    assert "retrying for up to 24.8 s more" in again
    assert attempts.count == 11
    assert attempts.last_error == "refused"


def test_the_time_left_is_never_negative() -> None:
    attempts = Attempts(URL, started=0.0, within=2.0)
    warning = attempts.failed("refused", 7.0)
    assert warning is not None
    assert "retrying for up to 0 s more" in warning


@given(
    gaps=st.lists(st.floats(min_value=0, max_value=20, allow_nan=False), min_size=1, max_size=60),
    every=st.floats(min_value=0.1, max_value=10, allow_nan=False),
)
def test_warnings_are_at_least_warn_every_apart(gaps: list[float], every: float) -> None:
    attempts = Attempts(URL, started=0.0, within=1000.0, warn_every=every)
    now = 0.0
    warned: list[float] = []
    for i, gap in enumerate(gaps):
        now += gap
        warning = attempts.failed(f"error {i}", now)
        if warning is not None:
            assert f"error {i}" in warning
            warned.append(now)
        elif warned:  # a failure is only silent shortly after a warning
            assert now - warned[-1] < every
    assert warned[0] == gaps[0]  # the first failure always warns
    assert all(b - a >= every for a, b in itertools.pairwise(warned))
    assert attempts.count == len(gaps)


def test_giving_up_names_the_address_the_cause_and_the_setting() -> None:
    attempts = Attempts("nats://u:***@10.0.0.9:4222", started=0.0, within=2.0)
    attempts.failed("[Errno 111] Connect call failed", 0.1)
    attempts.failed("[Errno 113] No route to host", 0.7)
    error = attempts.gave_up()
    assert isinstance(error, NatsUnreachableError)
    assert isinstance(error, CorralError)
    assert isinstance(error, ConnectionError)  # callers catching OSError still catch it
    assert error.url == "nats://u:***@10.0.0.9:4222"
    text = str(error)
    assert text.startswith("cannot reach NATS at nats://u:***@10.0.0.9:4222 within 2 s")
    assert "2 attempts; last error: [Errno 113] No route to host" in text
    assert "CORRAL_NATS_URL" in text
    assert "CORRAL_CONNECT_TIMEOUT" in text


def test_giving_up_before_any_attempt_finished() -> None:
    error = Attempts(URL, started=0.0, within=1.5).gave_up()
    assert f"cannot reach NATS at {URL} within 1.5 s" in str(error)
    assert "no attempt finished" in str(error)


def test_giving_up_after_one_attempt() -> None:
    attempts = Attempts(URL, started=0.0, within=1.0)
    attempts.failed("refused", 0.1)
    assert "(1 attempt; last error: refused)" in str(attempts.gave_up())


def test_describe_error() -> None:
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
    assert describe_error(refused) == "[Errno 111] Connect call failed ('127.0.0.1', 1)"
    assert describe_error(TimeoutError()) == "TimeoutError"
    no_servers = "NoServersError: nats: no servers available for connection"
    assert describe_error(NoServersError()) == no_servers
    assert describe_error(ValueError("  ")) == "ValueError"
    named = "nats: ServiceUnavailableError: code=None"  # nats-py's JetStream errors say it
    assert describe_error(ServiceUnavailableError()).startswith(named)


def test_a_nats_without_jetstream() -> None:
    error = jetstream_missing(URL, NoServersError())
    assert isinstance(error, NatsUnreachableError)
    assert error.url == URL
    assert str(error).startswith(f"NATS at {URL} answers, but its JetStream does not (")
    assert "`-js`" in str(error)
    assert "CORRAL_NATS_URL" in str(error)
