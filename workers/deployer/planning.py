"""Pure: turn (desired spec, current assignments, replica states) into intents."""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from corral.schemas.state import (
    LIVE_STATES,
    Assignment,
    ReplicaState,
    ReplicaStatus,
    ServiceRecord,
    Template,
)

_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def new_replica_ids(service: str, count: int, taken: set[str]) -> list[str]:
    """`count` fresh ids, none in `taken` and none twice.

    Two replicas sharing an id would share a status key, so one of them would never be seen
    (with five random letters that happened in about 3% of 10,000-replica deploys).
    """
    ids: list[str] = []
    seen = set(taken)
    while len(ids) < count:
        # one read of the OS's randomness for the whole batch (a choice per letter cost a
        # system call each); a byte modulo 27 makes some letters 10/256 likely and others
        # 9/256, which leaves about 37 bits of randomness per id: plenty to avoid collisions
        noise = secrets.token_bytes(8 * (count - len(ids)))
        for start in range(0, len(noise), 8):
            letters = "".join(_ALPHABET[b % len(_ALPHABET)] for b in noise[start : start + 8])
            candidate = f"{service}-{letters}"
            if candidate not in seen:
                seen.add(candidate)
                ids.append(candidate)
    return ids


@dataclass(frozen=True)
class Plan:
    drain: list[Assignment] = field(default_factory=list)
    """replicas to stop: marked draining, so their agent stops them and says so"""
    forget: list[Assignment] = field(default_factory=list)
    """draining replicas that have stopped (or whose node is gone): delete the assignment"""
    lost: list[Assignment] = field(default_factory=list)
    """active replicas on a lost node: delete the assignment, and place a replacement"""
    add: int = 0
    template: Template | None = None
    ready: int = 0
    """replicas of the current template that are ready (min_healthy not required)"""
    old: int = 0
    """active replicas of an older template still to be replaced"""
    recheck_after: float | None = None
    """seconds until a new replica's min_healthy window ends and the rollout can move on"""
    failure: str = ""
    """the rollout of the current template has failed, and why; the plan then holds"""
    paused: bool = False
    """a canary is ready and waits for promote or rollback"""

    @property
    def empty(self) -> bool:
        return not self.drain and not self.forget and not self.lost and self.add == 0


def _removal_order(
    assignment: Assignment,
    statuses: dict[str, ReplicaStatus],
    per_node: Counter[str],
) -> tuple[int, int, str]:
    """Who goes first on scale-in: replicas not running, then those running but not ready,
    then the most crowded nodes, then the newest."""
    status = statuses.get(assignment.replica)
    live = status is not None and status.state in LIVE_STATES
    rank = 2 if _is_ready(status) else 1 if live else 0
    return (rank, -per_node[assignment.node], _neg_time(assignment))


def _neg_time(assignment: Assignment) -> str:
    # newest first: invert the ISO timestamp's ordering through its complement
    stamp = assignment.assigned_at.isoformat()
    return "".join(chr(0x7F - ord(c)) for c in stamp)


def _is_ready(status: ReplicaStatus | None) -> bool:
    return status is not None and status.ready and status.state in LIVE_STATES


def _crashed(status: ReplicaStatus | None) -> str:
    """Why a new replica counts as crashed during a rollout, or ''."""
    if status is None:
        return ""
    if status.state in (ReplicaState.FAILED, ReplicaState.EXITED) or status.restarts > 0:
        detail = status.message or (
            f"exit code {status.exit_code}" if status.exit_code is not None else status.state
        )
        return f"replica {status.replica} crashed ({detail})"
    return ""


def _scale_in(
    replicas: list[Assignment],
    surplus: int,
    statuses: dict[str, ReplicaStatus],
    prefer: list[str] | None = None,
) -> list[Assignment]:
    """The `surplus` replicas to stop. Those in `prefer` (the least busy first, as the scale
    command named them) go before the others, in that order. A replica that is not running,
    and then one running but not ready, goes before any of them: neither serves anything.
    This is the order of Kubernetes' ReplicaSet controller, with `prefer` in the place of the
    `pod-deletion-cost` annotation."""
    if surplus <= 0:
        return []
    per_node = Counter(a.node for a in replicas)
    rank = {replica: index for index, replica in enumerate(prefer or [])}
    unranked = len(rank)

    def order(a: Assignment) -> tuple[int, int, int, str]:
        live, crowding, newest = _removal_order(a, statuses, per_node)
        return (live, rank.get(a.replica, unranked), crowding, newest)

    return sorted(replicas, key=order)[:surplus]


def plan(
    record: ServiceRecord | None,
    assignments: list[Assignment],
    statuses: dict[str, ReplicaStatus],
    live_nodes: set[str] | None = None,
    *,
    now: datetime | None = None,
    rollout_started: datetime | None = None,
    check_deadline: bool = True,
) -> Plan:
    """`record` None means the service is gone: drain everything. `live_nodes`, when given,
    names the nodes still alive: a replica on any other node is forgotten at once (and, if it
    was active, replaced). `rollout_started`, given while a rollout of the current revision
    is under way, is when it began: a replica assigned since then that crashes fails it, and
    with `check_deadline` so does its progress deadline. Without it nothing fails."""
    now = now or datetime.now(UTC)
    gone = [a for a in assignments if a.node not in live_nodes] if live_nodes is not None else []
    gone_keys = {id(a) for a in gone}
    present = [a for a in assignments if id(a) not in gone_keys]
    lost = [a for a in gone if not a.draining]
    draining = [a for a in present if a.draining]
    forget = [a for a in gone if a.draining] + [
        a
        for a in draining
        if a.replica not in statuses or statuses[a.replica].state == ReplicaState.STOPPED
    ]
    active = [a for a in present if not a.draining]
    if record is None:
        return Plan(drain=active, forget=forget, lost=lost)
    spec = record.spec
    template = Template.from_spec(spec)
    current = [a for a in active if a.template == template]
    old = [a for a in active if a.template != template]
    desired = spec.replicas
    update = spec.update
    ready_now = [a for a in current if _is_ready(statuses.get(a.replica))]

    # new replicas count toward the rollout once they have been ready for min_healthy
    settled: set[str] = set()
    recheck: float | None = None
    for assignment in ready_now:
        ready_at = statuses[assignment.replica].ready_at
        waited = (now - ready_at).total_seconds() if ready_at is not None else 0.0
        if waited >= update.min_healthy:
            settled.add(assignment.replica)
        else:
            left = update.min_healthy - waited
            recheck = left if recheck is None else min(recheck, left)

    base = Plan(forget=forget, lost=lost, template=template, ready=len(ready_now), old=len(old))
    # a rollout under way fails when a replica it started crashes, or on its deadline; only
    # replicas this rollout started count: one that restarted before it says nothing about
    # the revision being rolled out now (as when rolling back to old replicas)
    failure = ""
    if rollout_started is not None:
        fresh = [a for a in current if a.assigned_at >= rollout_started]
        failure = next((why for a in fresh if (why := _crashed(statuses.get(a.replica)))), "")
        elapsed = (now - rollout_started).total_seconds()
        done = not old and len(ready_now) >= desired
        if not failure and check_deadline and not done and elapsed > update.progress_deadline:
            failure = (
                f"not ready within the progress deadline of {update.progress_deadline:g}s "
                f"({len(ready_now)} of {desired} new replicas ready)"
            )
    if failure:
        return replace(base, failure=failure)

    if not old:
        drain = _scale_in(current, len(current) - desired, statuses, record.prefer_remove)
        return replace(base, drain=drain, add=max(0, desired - len(current)))

    old_ready = [a for a in old if _is_ready(statuses.get(a.replica))]
    old_unready = [a for a in old if not _is_ready(statuses.get(a.replica))]
    canary = update.canary > 0 and record.promoted_revision != record.revision
    if canary and not record.rollback_of:
        target = min(update.canary, desired)
        drain = _scale_in(current, len(current) - target, statuses, record.prefer_remove)
        drain += _scale_in(old, len(old) - desired, statuses, record.prefer_remove)
        add = max(0, target - len(current))
        paused = add == 0 and len(settled) >= target
        return replace(base, drain=drain, add=add, recheck_after=recheck, paused=paused)

    surge, unavailable = update.steps(desired)
    drain = _scale_in(current, len(current) - desired, statuses, record.prefer_remove)
    kept = min(len(current), desired)
    add = max(0, min(desired - kept, desired + surge - kept - len(old)))
    leaving = {a.replica for a in drain}
    available = len(old_ready) + len(settled - leaving)
    may_stop = max(0, available - (desired - unavailable))
    per_node = Counter(a.node for a in old)
    old_ready.sort(key=lambda a: _removal_order(a, statuses, per_node))
    drain += old_unready + old_ready[:may_stop]
    return replace(base, drain=drain, add=add, recheck_after=recheck)


def pinned_nodes(record: ServiceRecord, assignments: list[Assignment]) -> list[str]:
    """The nodes the record's scale-out still asks its new replicas to go to: its `place_on`,
    less one pin for each replica of this generation already on that node, so that a pin is
    used once (a pin whose node no longer fitted stays, and is checked again if this
    generation adds another replica)."""
    made = Counter(a.node for a in assignments if a.generation == record.generation)
    left = []
    for node in record.place_on:
        if made[node] > 0:
            made[node] -= 1
        else:
            left.append(node)
    return left
