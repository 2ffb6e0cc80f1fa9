"""The deployer's preemption notes: how a victim's pending reason names the preemption."""

from __future__ import annotations

from corral.workers.deployer.evicting import carried_note, pending_reason


def test_pending_reason_puts_the_preemption_first() -> None:
    note = "preempted by web (priority 100)"
    reason = "2 of 2 replicas fit no node: 2 nodes lack cpu"
    assert pending_reason(note, reason) == f"{note}; {reason}"
    assert pending_reason(note, "") == note
    assert pending_reason("", reason) == reason


def test_pending_reason_never_repeats_the_note() -> None:
    note = "preempted by web (priority 100)"
    once = pending_reason(note, "1 of 1 replicas fit no node: 1 node lacks cpu")
    assert pending_reason(note, once) == once


def test_carried_note_reads_a_status_written_before() -> None:
    previous = "preempted by web (priority 100); 2 of 2 replicas fit no node: 2 nodes lack cpu"
    assert carried_note(previous) == "preempted by web (priority 100)"
    assert carried_note("2 of 2 replicas fit no node: 2 nodes lack cpu") == ""
    assert carried_note("") == ""
