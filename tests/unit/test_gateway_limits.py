"""The token-bucket rate limiter, on a clock the test owns."""

from __future__ import annotations

import pytest

from corral.services.gateway.limits import RateLimiter, retry_after


def test_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.acquire("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a", 0.0) == pytest.approx(0.5)
    assert limiter.acquire("a", 0.25) == pytest.approx(0.25)
    assert limiter.acquire("a", 0.5) == 0.0  # one token refilled
    assert limiter.acquire("a", 0.5) > 0
    assert [limiter.acquire("a", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # capped at burst
    assert limiter.acquire("a", 100.0) > 0


def test_keys_are_independent_and_bounded() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=2)
    assert limiter.acquire("a", 0.0) == 0.0
    assert limiter.acquire("a", 0.0) > 0
    assert limiter.acquire("b", 0.0) == 0.0
    assert limiter.acquire("c", 0.0) == 0.0  # "a" is forgotten, the oldest
    assert limiter.acquire("a", 0.0) == 0.0


def test_zero_rate_is_off() -> None:
    limiter = RateLimiter(rate=0, burst=1)
    assert not limiter.enabled
    assert all(limiter.acquire("a", 0.0) == 0.0 for _ in range(1000))


def test_retry_after_is_whole_seconds() -> None:
    assert retry_after(0.01) == "1"
    assert retry_after(1.0) == "1"
    assert retry_after(1.2) == "2"


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(rate=1, burst=0)
