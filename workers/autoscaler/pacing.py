"""Pure: stabilisation windows and rate policies (steps 3 and 4 of the HPA algorithm; see
`policy`), as `horizontal.go` has them: `stabilizeRecommendationWithBehaviors`,
`calculateScaleUpLimitWithScalingRules` and `calculateScaleDownLimitWithBehaviors`."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from corral.schemas.autoscale import Autoscale, Behavior, ScaleDownRules, ScaleUpRules
from corral.workers.autoscaler.smoothing import Track

Events = tuple[tuple[float, int], ...]


@dataclass(frozen=True)
class History:
    """What the policy remembers between evaluations of one service."""

    recommendations: Events = ()
    """(time, recommendation) within the longest stabilisation window"""
    ups: Events = ()
    """(time, replicas added) within the longest scale-up period"""
    downs: Events = ()
    """(time, replicas removed)"""
    active_at: float | None = None
    """the last time there was work to do"""
    zeroed_at: float | None = None
    """when the policy last scaled the service to zero"""
    seeded: bool = False
    tracks: tuple[Track, ...] = ()
    """with `smoothing: two_speed`: each metric's average demand"""
    burst: int = 0
    """with `smoothing: two_speed`: the recommendation of the last burst, which holds off a
    scale-down until `burst_until`"""
    burst_until: float = -math.inf


def stabilize(
    desired: int,
    current: int,
    recommendations: Events,
    behavior: Behavior,
    now: float,
    *,
    recorded: int | None = None,
    held: int | None = None,
) -> tuple[int, int, int, Events]:
    """(stabilised, lowest of the up window, highest of the down window, new history).

    `recorded`: what the windows keep of this evaluation, when not `desired` (the smoothed
    recommendation under a burst's); `held`: a recommendation that still holds off a
    scale-down (a burst's), as if it were in the down window."""
    up_cut = now - behavior.scale_up.stabilization_window
    down_cut = now - behavior.scale_down.stabilization_window
    up, down = desired, max(desired, held if held is not None else desired)
    for at, value in recommendations:
        if at > up_cut:
            up = min(up, value)
        if at > down_cut:
            down = max(down, value)
    result = current
    result = max(result, up)
    result = min(result, down)
    oldest = min(up_cut, down_cut)
    kept = [(at, value) for at, value in recommendations if at > oldest]
    keep = desired if recorded is None else recorded
    # a newer equal value outlives an older one in any trailing window: keep only the newer
    if kept and kept[-1][1] == keep:
        kept[-1] = (now, keep)
    else:
        kept.append((now, keep))
    return result, up, down, tuple(kept)


def _changed_within(period: float, events: Events, now: float) -> int:
    return sum(count for at, count in events if at > now - period)


def _count_before(current: int, history: History, period: float, now: float) -> int:
    """The replica count at the start of the policy's period: changes within it undone."""
    return (
        current
        - _changed_within(period, history.ups, now)
        + _changed_within(period, history.downs, now)
    )


def scale_up_limit(current: int, history: History, rules: ScaleUpRules, now: float) -> int:
    if rules.select_policy == "disabled":
        return current
    proposals = []
    for policy in rules.policies:
        start = _count_before(current, history, policy.period, now)
        if policy.type == "pods":
            proposals.append(start + policy.value)
        else:
            proposals.append(-(-start * (100 + policy.value) // 100))
    return max(proposals) if rules.select_policy == "max" else min(proposals)


def scale_down_limit(current: int, history: History, rules: ScaleDownRules, now: float) -> int:
    if rules.select_policy == "disabled":
        return current
    proposals = []
    for policy in rules.policies:
        start = _count_before(current, history, policy.period, now)
        if policy.type == "pods":
            proposals.append(start - policy.value)
        else:
            proposals.append(int(start * (100 - policy.value) / 100))
    return min(proposals) if rules.select_policy == "max" else max(proposals)


def limit(
    desired: int, current: int, history: History, policy: Autoscale, floor: int, now: float
) -> tuple[int, str, str]:
    """Apply the rate policies, then min and max: (desired, what limited it, how)."""
    behavior = policy.behavior
    if desired > current:
        ceiling = max(scale_up_limit(current, history, behavior.scale_up, now), current)
        if policy.max > ceiling:
            allowed, why = ceiling, "scale_up_limit"
            how = f"scale-up policies allow {ceiling} now ({_describe(behavior.scale_up)})"
        else:
            allowed, why, how = policy.max, "too_many_replicas", f"max is {policy.max}"
        if desired > allowed:
            return allowed, why, how
    elif desired < current:
        bottom = min(scale_down_limit(current, history, behavior.scale_down, now), current)
        if floor < bottom:
            allowed, why = bottom, "scale_down_limit"
            how = f"scale-down policies allow {bottom} now ({_describe(behavior.scale_down)})"
        else:
            allowed, why, how = floor, "too_few_replicas", f"min is {floor}"
        if desired < allowed:
            return allowed, why, how
    return desired, "", ""


def _describe(rules: ScaleUpRules | ScaleDownRules) -> str:
    if rules.select_policy == "disabled":
        return "disabled"
    parts = [
        f"{p.value}{'%' if p.type == 'percent' else ' replicas'} per {p.period:g}s"
        for p in rules.policies
    ]
    return f"{rules.select_policy} of " + ", ".join(parts)


def record(history: History, current: int, desired: int, policy: Autoscale, now: float) -> History:
    """Remember a scale event, and forget those older than every policy's period."""
    behavior = policy.behavior
    longest = max(p.period for p in [*behavior.scale_up.policies, *behavior.scale_down.policies])
    ups = tuple(e for e in history.ups if e[0] > now - longest)
    downs = tuple(e for e in history.downs if e[0] > now - longest)
    if desired > current:
        ups += ((now, desired - current),)
    elif desired < current:
        downs += ((now, current - desired),)
    return replace(history, ups=ups, downs=downs)


def stabilization_ends(
    recommended: int, stabilized: int, history: History, behavior: Behavior, now: float
) -> float | None:
    """Seconds until a recommendation that holds the count back leaves its window."""
    if stabilized == recommended:
        return None
    if stabilized > recommended:
        window = behavior.scale_down.stabilization_window
        holding = [at for at, value in history.recommendations if value > recommended]
    else:
        window = behavior.scale_up.stabilization_window
        holding = [at for at, value in history.recommendations if value < recommended]
    ends = [at + window - now for at in holding if at + window > now]
    return min(ends) if ends else None


def limit_ends(limited_by: str, history: History, policy: Autoscale, now: float) -> float | None:
    """Seconds until a scale event leaves its policy's period, allowing more change."""
    if limited_by not in ("scale_up_limit", "scale_down_limit"):
        return None
    behavior = policy.behavior
    rules = behavior.scale_up if limited_by == "scale_up_limit" else behavior.scale_down
    ends = [
        at + p.period - now
        for p in rules.policies
        for at, _ in (*history.ups, *history.downs)
        if at + p.period > now
    ]
    return min(ends) if ends else None
