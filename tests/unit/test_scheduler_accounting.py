"""The scheduler's accounting: bookings and assignments counted once, ledgers folded in by
difference, and which bookings are stale."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from corral.schemas.spec import Resources
from corral.schemas.state import Booking, NodeLedger, NodeStatus
from corral.workers.scheduler.accounting import Accounts, Usage, book, release, stale

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def booking(service: str = "web", cpu: float = 1.0, age: float = 0.0) -> Booking:
    return Booking(service=service, resources={"cpu": cpu}, at=NOW - timedelta(seconds=age))


def test_a_replica_booked_and_assigned_counts_once() -> None:
    accounts = Accounts()
    accounts.set_ledger("n1", NodeLedger(node="n1", bookings={"r1": booking()}))
    accounts.set_assigned("n1.r1", Usage("web", "n1", {"cpu": 1.0}))
    assert accounts.allocated["n1"]["cpu"] == 1.0
    assert accounts.services["n1"] == {"web": 1}
    # the assignment goes: the booking still holds the room until it is released
    accounts.set_assigned("n1.r1", None)
    assert accounts.allocated["n1"]["cpu"] == 1.0
    accounts.set_ledger("n1", NodeLedger(node="n1"))
    assert accounts.allocated["n1"]["cpu"] == 0.0
    assert accounts.totals["n1"] == 0
    assert accounts.services["n1"] == {}


def test_ledger_changes_fold_in_by_difference() -> None:
    accounts = Accounts()
    accounts.set_ledger("n1", NodeLedger(node="n1", bookings={"a": booking(), "b": booking()}))
    accounts.set_ledger("n1", NodeLedger(node="n1", bookings={"b": booking(), "c": booking()}))
    assert set(accounts.booked) == {"n1.b", "n1.c"}
    assert accounts.totals["n1"] == 2
    accounts.set_ledger("n1", None)
    assert accounts.totals["n1"] == 0


def test_view_carries_capacity_allocations_and_services() -> None:
    accounts = Accounts()
    accounts.set_assigned("n1.r1", Usage("web", "n1", {"cpu": 0.5}))
    node = NodeStatus(
        id="n1",
        labels={"zone": "a"},
        capacity=Resources.model_validate({"cpu": 4, "memory": "1Gi", "gpu": 1}),
        drivers=["process"],
        heartbeat_at=NOW,
        started_at=NOW,
    )
    view = accounts.view(node, ready=True)
    assert view.capacity["gpu"] == 1.0
    assert view.allocated == {"cpu": 0.5}
    assert view.services == {"web": 1}
    assert view.total == 1


def test_book_release_and_stale() -> None:
    ledger = book(None, "n1", [("a", booking(age=100)), ("b", booking(age=1))])
    ledger = book(ledger, "n1", [("c", booking(age=100))])
    assert set(ledger.bookings) == {"a", "b", "c"}
    assert stale(ledger, {"n1.c"}, NOW, ttl=30) == ["a"]
    smaller = release(ledger, ["a", "zz"])
    assert smaller is not None
    assert set(smaller.bookings) == {"b", "c"}
    assert release(smaller, ["zz"]) is None
