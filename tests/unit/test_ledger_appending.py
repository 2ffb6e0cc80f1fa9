"""A ledger's JSON extended by appending bookings reads back as the ledger `book` builds, and
is refused where appending would be wrong."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from corral.schemas.state import Booking, NodeLedger
from corral.workers.scheduler.accounting import book, grown

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ODD = 'abc"\\é'
"""letters for replica ids, with some that JSON must escape"""


def booking(service: str, cpu: float, age: float = 0.0) -> Booking:
    return Booking(
        service=service, resources={"cpu": cpu, "memory": 1 << 27}, at=NOW - timedelta(age)
    )


def raw_of(value: Booking) -> bytes:
    return value.model_dump_json().encode()


@pytest.mark.parametrize("seed", range(20))
def test_appended_bookings_read_back_as_the_ledger_book_builds(seed: int) -> None:
    rng = random.Random(seed)
    ledger: NodeLedger | None = None
    raw = b""
    for round_ in range(rng.randint(1, 8)):
        services = [booking(f"s{round_}-{k}", rng.choice([0.1, 0.25, 2.0]), k) for k in range(3)]
        added = {
            f"r{round_}-{i}-{rng.choice(ODD)}": rng.choice(services)
            for i in range(rng.randint(1, 20))
        }
        after = book(ledger, "n7", added.items())
        if ledger is None:
            raw = after.model_dump_json().encode()
        else:
            longer = grown(raw, ledger, {r: raw_of(b) for r, b in added.items()}, "n7")
            assert longer is not None
            raw = longer
        ledger = after
        assert NodeLedger.model_validate_json(raw) == ledger


def test_an_empty_ledger_grows_too() -> None:
    empty = NodeLedger(node="n1")
    raw = grown(empty.model_dump_json().encode(), empty, {"a": raw_of(booking("web", 1))})
    assert raw is not None
    assert NodeLedger.model_validate_json(raw) == book(empty, "n1", [("a", booking("web", 1))])


def test_appending_is_refused_where_it_would_be_wrong() -> None:
    ledger = book(None, "n1", [("a", booking("web", 1))])
    raw = ledger.model_dump_json().encode()
    again = {"a": raw_of(booking("web", 2))}
    assert grown(raw, ledger, again) is None  # a replica booked again: encode it whole
    assert grown(raw, ledger, {}) is None
    assert grown(raw, ledger, {"b": raw_of(booking("web", 1))}, node="n2") is None
    assert grown(raw + b" ", ledger, {"b": raw_of(booking("web", 1))}) is None
