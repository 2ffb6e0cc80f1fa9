"""The deployer's side of preemption. The scheduler answers a placement with the running
replicas it chose to evict; the deployer, which owns the assignments, marks each one draining
(its agent stops it within its grace period, then the key goes and its room is freed), says so
with a `replica.<service>.preempted` event, and only then writes the preemptor's assignments.
A node where an eviction could not be written gets none of them: those replicas stay pending
and their booking lapses. The victims' services keep their desired count and show pending, with
the preemption named in front of the usual reason, until room appears."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from corral.schemas.envelope import utcnow
from corral.schemas.errors import ConflictError
from corral.schemas.events import ReplicaPreempted
from corral.schemas.placement import Eviction

if TYPE_CHECKING:
    from corral.workers.deployer.worker import DeployerWorker

log = logging.getLogger(__name__)
PREFIX = "preempted by "
MARKED, LEAVING, FAILED = "marked", "leaving", "failed"


def pending_reason(note: str, reason: str) -> str:
    """A pending reason with the preemption that caused it in front."""
    if not note or reason.startswith(note):
        return reason
    return f"{note}; {reason}" if reason else note


def carried_note(previous_reason: str) -> str:
    """The preemption named in a status written earlier (by this deployer or the one before
    it), so that the note outlives a change of leader."""
    if not previous_reason.startswith(PREFIX):
        return ""
    return previous_reason.split("; ", 1)[0]


async def evict(worker: DeployerWorker, evictions: list[Eviction], correlation: str) -> set[str]:
    """Carry out the evictions; returns the nodes where one could not be written."""
    failed: set[str] = set()
    for eviction in evictions:
        try:
            done = await _drain(worker, eviction)
        except Exception as exc:
            log.warning("could not evict %s on %s: %s", eviction.replica, eviction.node, exc)
            done = FAILED
        if done == FAILED:
            failed.add(eviction.node)
        if done != MARKED:
            continue  # already leaving: its room comes free without a preemption
        worker.preempted[eviction.service] = eviction.note
        worker.mark(eviction.service)
        data = ReplicaPreempted(
            replica=eviction.replica,
            service=eviction.service,
            node=eviction.node,
            priority=eviction.priority,
            preemptor=eviction.preemptor,
            preemptor_priority=eviction.preemptor_priority,
            message=f"{eviction.note} on {eviction.node}; stopping, to be placed again "
            f"when room appears",
            at=utcnow(),
        )
        try:
            await worker.emitter.emit(
                "replica",
                eviction.service,
                "preempted",
                data,
                correlation=correlation or None,
                event_id=f"{eviction.replica}.preempted",
            )
        except Exception as exc:
            # the eviction stands (its assignment says why): failing here would leave the
            # preemptor's room booked but unwritten, and evict again on the next try
            log.warning("could not announce the preemption of %s: %s", eviction.replica, exc)
    return failed


async def _drain(worker: DeployerWorker, eviction: Eviction) -> str:
    """Mark the victim's assignment draining, with the preemption as its reason: MARKED, or
    LEAVING when it was already draining or gone, or FAILED."""
    key = f"{eviction.node}.{eviction.replica}"
    for _ in range(3):
        item = worker.assignments.items.get(key)
        if item is None:
            fresh = await worker.bus.buckets.assignments.get(key)
            if fresh is None:
                return LEAVING
            item = fresh
        if item.value.draining:
            return LEAVING
        marked = item.value.model_copy(update={"draining": True, "reason": eviction.note})
        try:
            await worker._drain_one(key, marked, item.revision)
        except ConflictError:
            fresh = await worker.bus.buckets.assignments.get(key)
            if fresh is None:
                return LEAVING
            worker.assignments.note_written(key, fresh.value, fresh.revision)
            continue
        return MARKED
    return FAILED


def with_preemption(
    worker: DeployerWorker, name: str, previous_reason: str, pending: int, reason: str
) -> str:
    """The pending reason to report for `name`: a preempted service keeps the preemption in
    front until all its replicas are placed again."""
    if not pending:
        worker.preempted.pop(name, None)
        return reason
    note = worker.preempted.get(name) or carried_note(previous_reason)
    if note:
        worker.preempted[name] = note
    return pending_reason(note, reason)
