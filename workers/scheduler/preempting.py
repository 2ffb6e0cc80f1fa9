"""The scheduler's preemption step, after the usual placement of a batch: for askers that
allow it (the deployer), replicas that still fit nowhere may take the room of running replicas
of strictly lower priority. The choice is pure (`preemption.py`); here the mirrors are read and
the preemptor's replicas are booked on the nodes' ledgers with compare-and-set, like any other
placement, so a concurrent scheduler never hands out the same freed room twice. The victims'
own bookings stay until their assignments go: the node reads as full (overbooked, even) until
then, so nothing else squeezes in. The asker evicts the victims, then writes the placements."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from corral.schemas.errors import ConflictError
from corral.schemas.placement import Eviction, Placed
from corral.schemas.state import Booking
from corral.workers.scheduler.placement import room_for
from corral.workers.scheduler.preemption import NodePlan, Preemption, Running, preempt_batch

if TYPE_CHECKING:
    from corral.workers.scheduler.worker import Ledgers, SchedulerWorker, _Asked

log = logging.getLogger(__name__)
ROUNDS = 5
"""how many times preemption is planned again after ledger conflicts"""


def running_below(
    worker: SchedulerWorker, priority: int, nodes: set[str] | None = None
) -> list[Running]:
    """Replicas assigned and not draining whose service's priority is below `priority` (on
    `nodes`, when given)."""
    priorities = {
        r.spec.name: r.spec.placement.priority
        for r in worker.services.values()
        if not r.deleted and r.spec.placement.priority < priority
    }
    if not priorities:
        return []
    out = []
    for key, item in worker.assignments.items.items():
        a = item.value
        found = priorities.get(a.service)
        if found is None or a.draining or (nodes is not None and a.node not in nodes):
            continue
        replica = key.partition(".")[2]
        out.append(Running(replica, a.service, a.node, found, a.template.resources.as_dict()))
    return out


async def preempt_left(worker: SchedulerWorker, batch: list[_Asked]) -> None:
    """Place what is left of the askers that allow preemption by evicting lower priorities."""
    before = {id(a): len(a.left) for a in batch}
    try:
        await _rounds(worker, batch)
    except Exception:
        # the usual placements of the batch stand: answer them, and leave the rest pending
        log.exception("preemption failed")
    finally:
        for asked in batch:
            gained = before[id(asked)] - len(asked.left)
            if gained and asked.left:
                asked.reason = still_unplaced(asked.reason, len(asked.left), gained)


def still_unplaced(reason: str, left: int, gained: int) -> str:
    """The usual solve's reason, recounted after preemption placed `gained` more."""
    head, sep, rest = reason.partition(" of ")
    if sep and head.isdigit():
        reason = f"{left} of {rest}"
    return f"{reason}; preemption placed {gained}, and no more lower-priority room fits"


async def _rounds(worker: SchedulerWorker, batch: list[_Asked]) -> None:
    for _ in range(ROUNDS):
        todo = [a for a in batch if a.left and a.request.preempt]
        if not todo:
            return
        lowest = min(
            (r.spec.placement.priority for r in worker.services.values() if not r.deleted),
            default=None,
        )
        if lowest is None or lowest >= max(a.request.rules().priority for a in todo):
            return  # nothing runs at a lower priority: the usual case, and cheap to tell
        classes = [(a.asking(), len(a.left)) for a in todo]
        table, seen = worker.planning([a.request.service for a in todo])
        # only nodes that pass a class's hard rules can hold victims worth reading
        eligible: set[str] = set()
        for request, _ in classes:
            mask = room_for(request, table, table.counts(request.service)) >= 0
            eligible.update(table.ids[i] for i in np.flatnonzero(mask))
        top = max(request.priority for request, _ in classes)
        running = running_below(worker, top, eligible) if eligible else []
        if not running:
            return
        done = preempt_batch(classes, table, running)
        if not await _book(worker, todo, done, seen):
            return


async def _book(
    worker: SchedulerWorker, todo: list[_Asked], done: list[Preemption], seen: Ledgers
) -> bool:
    """Book each node plan on its ledger; True when some node lost a race."""
    now = datetime.now(UTC)
    plans: list[tuple[_Asked, NodePlan, list[str]]] = []
    for asked, preemption in zip(todo, done, strict=True):
        for plan in preemption.plans:
            replicas, asked.left = asked.left[: plan.take], asked.left[plan.take :]
            plans.append((asked, plan, replicas))
    made: dict[int, tuple[Booking, bytes]] = {}
    results = await asyncio.gather(
        *(
            worker._book(plan.node, [(asked, r, plan.note) for r in replicas], now, made, seen)
            for asked, plan, replicas in plans
        ),
        return_exceptions=True,
    )
    again = False
    for (asked, plan, replicas), result in zip(plans, results, strict=True):
        if result is True:
            asked.placed.extend(
                Placed(replica=r, node=plan.node, reason=plan.note) for r in replicas
            )
            asked.evictions.extend(
                Eviction(
                    replica=v.replica,
                    service=v.service,
                    node=v.node,
                    priority=v.priority,
                    preemptor=asked.request.service,
                    preemptor_priority=asked.request.rules().priority,
                )
                for v in plan.victims
            )
            continue
        if not isinstance(result, ConflictError):
            log.warning("could not book a preemption on %s: %s", plan.node, result)
        again = True
        worker.conflicts += 1
        asked.left.extend(replicas)
    return again
