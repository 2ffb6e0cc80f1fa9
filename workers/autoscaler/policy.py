"""Pure: (autoscale policy, readings, recent history, now) -> a decision that explains itself.

The algorithm is the Kubernetes HorizontalPodAutoscaler's (pkg/controller/podautoscaler,
`replica_calculator.go` and `horizontal.go`), step by step:

1. Each metric proposes a replica count:
   - a per-replica metric (pushed samples): ratio = average / target, desired =
     ceil(ratio x replicas with samples); within the tolerance, the current count. Replicas
     without a fresh sample count as 0 when scaling up and as the target when scaling down;
     if that changes the direction, or lands within the tolerance, nothing changes;
   - a total (a queue backlog, a Prometheus total): desired = ceil(total / target), unless
     total / (target x current) is within the tolerance;
   - a value (Prometheus, `per_replica: false`): desired = ceil(value / target x ready).
   With `behavior.smoothing.mode: two_speed` each metric's rule is fed its demand's average
   plus a noise headroom, or a burst's reading at once (`smoothing`); the scale-down window
   then records the average's recommendation, and a burst's holds off a scale-down for
   `hold` seconds (at most the window).
2. The largest proposal wins. No readable metric: nothing changes. Some missing and the rest
   would scale down: nothing changes.
3. Stabilisation: the result is held between the lowest recommendation of the scale-up window
   and the highest of the scale-down window.
4. Rate policies: at most so many replicas (or percent) of change per period, counted from
   the scale events inside that period; the `select_policy` picks the most (max) or least
   (min) permissive policy, or forbids the direction (disabled). Then min and max.

A current count above max or below min goes straight to the bound. A count of 0 with
`min` > 0 means someone scaled the service to zero by hand: autoscaling is off, as with the
HPA. KEDA's scale to zero sits on top: with `min: 0` the HPA works with a minimum of 1, an
activation (or a metric above its `active_above`) wakes a service at zero to 1 at once, and
`cooldown` seconds without either scale it to 0.

Times are seconds on one monotonic clock, passed in; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from corral.schemas.autoscale import Autoscale
from corral.schemas.commands import MAX_PREFER_REMOVE
from corral.schemas.events import AutoscaleDecision
from corral.workers.autoscaler.pacing import (
    History,
    limit,
    limit_ends,
    record,
    stabilization_ends,
    stabilize,
)
from corral.workers.autoscaler.proposals import Inputs, Reading, propose
from corral.workers.autoscaler.smoothing import smooth

__all__ = ["History", "Inputs", "Reading", "evaluate", "least_busy", "stabilize"]


def least_busy(busy: Mapping[str, float], replicas: tuple[str, ...]) -> list[str]:
    """Running replicas that reported how busy they are, the least busy first."""
    live = set(replicas)
    known = sorted((value, replica) for replica, value in busy.items() if replica in live)
    return [replica for _, replica in known][:MAX_PREFER_REMOVE]


def evaluate(
    policy: Autoscale, inputs: Inputs, history: History, now: float
) -> tuple[AutoscaleDecision, History]:
    """Decide the replica count; return the decision and the history to keep."""
    current = inputs.current
    behavior = policy.behavior
    if not history.seeded:
        # as the HPA after a restart: what runs now is a recent recommendation, so nothing
        # scales down before a whole stabilisation window has been seen
        history = History(recommendations=((now, current),), active_at=now, seeded=True)
    found = [
        propose(metric, reading, inputs, behavior.tolerance)
        for metric, reading in zip(policy.metrics, _pad(inputs.readings, policy), strict=True)
    ]
    smoothed: list[int | None] | None = None
    if behavior.smoothing.mode == "two_speed" and current > 0:
        found, tracks, smoothed = smooth(
            found, history.tracks, current, behavior.tolerance, behavior.smoothing, now
        )
        history = replace(history, tracks=tracks)
    proposals = [p.proposal for p in found]
    busy_metrics = [
        p.metric
        for p, metric in zip(proposals, policy.metrics, strict=True)
        if p.value is not None and p.value > metric.active_above
    ]
    active_at = history.active_at
    if busy_metrics:
        active_at = now
    signal = inputs.activity_at
    if signal is not None and (active_at is None or signal > active_at):
        active_at = min(signal, now)
    history = replace(history, active_at=active_at)

    def decide(
        kept: History,
        desired: int,
        code: str,
        reason: str,
        *,
        recommended: int | None = None,
        stabilized: int | None = None,
        limited_by: str = "",
        recheck_after: float | None = None,
    ) -> tuple[AutoscaleDecision, History]:
        action = "none"
        if desired > current:
            action = "scale_up"
        elif desired < current:
            action = "scale_down"
        prefer = least_busy(inputs.busy, inputs.replicas) if 0 < desired < current else []
        decision = AutoscaleDecision(
            current=current,
            desired=desired,
            action=action,
            code=code,
            reason=reason,
            recommended=recommended,
            stabilized=stabilized,
            limited_by=limited_by,
            proposals=proposals,
            replicas=len(inputs.replicas),
            ready=inputs.ready,
            prefer_remove=prefer,
            recheck_after=recheck_after,
        )
        return decision, kept

    floor = max(1, policy.min)
    cooldown_left: float | None = None
    if current == 0:
        if policy.min > 0:
            return decide(
                history,
                0,
                "disabled",
                "scaled to 0 by hand; autoscaling is off until the service runs again "
                "(as with the HPA); `min: 0` lets it scale from zero",
            )
        fresh = signal is not None and (history.zeroed_at is None or signal > history.zeroed_at)
        if fresh or busy_metrics:
            cause = inputs.activity if fresh and inputs.activity else ", ".join(busy_metrics)
            woken = replace(record(history, 0, 1, policy, now), active_at=now)
            return decide(woken, 1, "activated", f"woken from zero by {cause or 'activity'}")
        return decide(history, 0, "idle", "at zero, waiting for activation")
    if policy.min == 0:
        idle = now - (active_at if active_at is not None else now)
        if idle >= policy.cooldown:
            zeroed = replace(
                record(history, current, 0, policy, now),
                zeroed_at=now,
                recommendations=(),
                tracks=(),
                burst=0,
            )
            return decide(
                zeroed,
                0,
                "cooldown",
                f"nothing to do for {idle:.1f}s (cooldown {policy.cooldown:g}s): to zero",
            )
        cooldown_left = policy.cooldown - idle
    if current > policy.max:
        return decide(
            record(history, current, policy.max, policy, now),
            policy.max,
            "above_max",
            f"{current} replicas is above max {policy.max}",
        )
    if current < floor:
        return decide(
            record(history, current, floor, policy, now),
            floor,
            "below_min",
            f"{current} replicas is below min {floor}",
        )
    if not policy.metrics:
        return decide(
            history,
            current,
            "steady",
            "no metrics: only activation and cooldown change the count",
            recheck_after=_soonest(cooldown_left),
        )
    valid = [p for p in proposals if p.replicas is not None]
    if not valid:
        why = "; ".join(f"{p.metric}: {p.note}" for p in proposals)
        return decide(
            history,
            current,
            "missing_metrics",
            f"no metric could be read ({why})",
            recheck_after=_soonest(cooldown_left),
        )
    top = max(valid, key=lambda p: p.replicas or 0)
    recommended = top.replicas or 0
    if len(valid) < len(proposals) and recommended < current:
        missing = ", ".join(p.metric for p in proposals if p.replicas is None)
        return decide(
            history,
            current,
            "missing_metrics",
            f"would scale down to {recommended}, but {missing} could not be read: holding "
            "(as the HPA does)",
            recommended=recommended,
            recheck_after=_soonest(cooldown_left),
        )
    recorded: int | None = None
    held: int | None = None
    if smoothed is not None:
        # two-speed: the window records what the averages ask for; a burst's recommendation
        # holds off a scale-down for `hold` seconds (at most the window) after its last burst
        # reading
        recorded = max(
            (
                r
                for r, p in zip(smoothed, proposals, strict=True)
                if r is not None and p.replicas is not None
            ),
            default=recommended,
        )
        if recommended > recorded:
            still = history.burst if now < history.burst_until else 0
            # never longer than the scale-down window
            until = now + min(behavior.smoothing.hold, behavior.scale_down.stabilization_window)
            history = replace(history, burst=max(recommended, still), burst_until=until)
        if now < history.burst_until:
            held = history.burst
    down_cut = now - behavior.scale_down.stabilization_window
    in_window = max((v for at, v in history.recommendations if at > down_cut), default=0)
    stabilized, up, down, recommendations = stabilize(
        recommended,
        current,
        history.recommendations,
        behavior,
        now,
        recorded=recorded,
        held=held,
    )
    history = replace(history, recommendations=recommendations)
    desired, limited_by, how = limit(stabilized, current, history, policy, floor, now)
    burst_holds = held is not None and stabilized > max(in_window, recorded or 0, recommended)
    recheck = _soonest(
        cooldown_left,
        stabilization_ends(recommended, stabilized, history, behavior, now),
        limit_ends(limited_by, history, policy, now),
        history.burst_until - now if burst_holds else None,
    )
    why = f"{top.metric}: {top.formula or top.note}"
    if stabilized != recommended:
        if recommended > current:
            window = (
                f"the lowest recommendation of the last "
                f"{behavior.scale_up.stabilization_window:g}s was {up}"
            )
        elif burst_holds:
            left = history.burst_until - now
            window = f"a burst's recommendation of {held} holds for {left:g}s more"
        else:
            window = (
                f"the highest recommendation of the last "
                f"{behavior.scale_down.stabilization_window:g}s was {down}"
            )
        why += f"; stabilised to {stabilized}: {window}"
    if limited_by:
        why += f"; limited to {desired}: {how}"
    if desired != current:
        code = "scale_up" if desired > current else "scale_down"
        history = record(history, current, desired, policy, now)
    elif recommended == current:
        held = any(p.held for p in found if p.proposal.replicas in (None, current))
        code = "tolerance" if held else "steady"
    elif stabilized == current:
        code = "stabilized"
    else:
        code = {"too_many_replicas": "at_max", "too_few_replicas": "at_min"}.get(
            limited_by, "limited"
        )
    return decide(
        history,
        desired,
        code,
        why,
        recommended=recommended,
        stabilized=stabilized,
        limited_by=limited_by,
        recheck_after=recheck,
    )


def _pad(readings: tuple[Reading, ...], policy: Autoscale) -> tuple[Reading, ...]:
    missing = len(policy.metrics) - len(readings)
    return readings[: len(policy.metrics)] + (Reading(error="no reading yet"),) * max(0, missing)


def _soonest(*delays: float | None) -> float | None:
    found = [d for d in delays if d is not None and d > 0]
    return min(found) if found else None
