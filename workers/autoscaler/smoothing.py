"""Pure: what each metric feeds the HPA rules with `behavior.smoothing.mode: two_speed`.

Each metric's demand (the replicas its reading asks for, before rounding and the tolerance)
is averaged exponentially over `window` seconds, on the clock: an evaluation `dt` after the
last moves the average by 1 - exp(-dt / window) of the way. Its noise is measured from the
readings: the median absolute difference of consecutive readings (taken at least 1 s apart,
and only when the reading changed: evaluations also come from polls and timers) over the last
`NOISE_POINTS`, divided by 0.954 (the median |x - y| of two normal draws of deviation s is
0.954 s), so a ramp of a few readings barely moves it; with fewer than `MIN_POINTS` readings
the noise is 0.

- A reading more than `burst` deviations above the average is a **burst**: the rules get the
  reading less `discount` deviations at once.
- A reading more than `burst` deviations below the average is a **drop**: the average moves
  to the reading plus `discount` deviations at once (a fall is no noise either).
- Otherwise the rules get the average plus a headroom of `burst` deviations, at most
  `headroom` replicas (the **smoothed** value); with no noise, the average itself.

The smoothed value's recommendation is what the scale-down window records; a burst's
recommendation holds off a scale-down for `hold` seconds after the last burst reading (see
`policy`). A reading that lacks some running replicas' samples (just after a scale, say) is
not averaged: the HPA's rule for missing samples applies to it as it came. Times are seconds
on one monotonic clock, passed in.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from corral.schemas.autoscale import Smoothing
from corral.workers.autoscaler.proposals import Proposal

NOISE_POINTS = 60
"""readings the noise is measured over"""
NOISE_SPACING = 1.0
"""seconds between two readings kept for the noise (evaluations come with every sample)"""
MIN_POINTS = 6
_NORMAL_MEDIAN_GAP = 0.954
_EPSILON = 1e-9


@dataclass(frozen=True)
class Track:
    """One metric's average demand and recent readings."""

    metric: str
    level: float
    at: float
    points: tuple[float, ...] = ()
    """demands at least NOISE_SPACING apart, the newest last"""
    point_at: float = -math.inf


@dataclass(frozen=True)
class Fed:
    track: Track
    level: float
    """the average before this reading"""
    noise: float
    smoothed: float
    """the average (with this reading) plus the headroom"""
    burst: float | None
    """a burst: the value fed for it"""
    drop: bool = False
    """a drop: the average moved to the reading"""


def noise(points: tuple[float, ...]) -> float:
    """One deviation of the readings' noise, from the median gap between neighbours."""
    recent = points[-NOISE_POINTS:]
    if len(recent) < MIN_POINTS:
        return 0.0
    gaps = sorted(abs(b - a) for a, b in itertools.pairwise(recent))
    return gaps[len(gaps) // 2] / _NORMAL_MEDIAN_GAP


def feed(track: Track | None, metric: str, demand: float, now: float, rules: Smoothing) -> Fed:
    """Take one reading's demand: the new track, and what the rules get."""
    if track is None or track.metric != metric:
        track = Track(metric=metric, level=demand, at=now)
    points, point_at = track.points, track.point_at
    # a point per new reading: evaluations also come from polls and timers, with the same one
    if now - point_at >= NOISE_SPACING and (not points or demand != points[-1]):
        points, point_at = (*points[-(NOISE_POINTS - 1) :], demand), now
    sigma = noise(points)
    before = track.level
    burst = demand - before > rules.burst * sigma + _EPSILON
    drop = before - demand > rules.burst * sigma + _EPSILON
    if drop:
        level = demand + rules.discount * sigma
    else:
        weight = 1 - math.exp(-max(0.0, now - track.at) / rules.window)
        level = before + weight * (demand - before)
    smoothed = level + min(rules.headroom, rules.burst * sigma)
    fed_burst = demand - rules.discount * sigma if burst else None
    moved = Track(metric=metric, level=level, at=now, points=points, point_at=point_at)
    return Fed(moved, before, sigma, smoothed, fed_burst, drop)


def rule(value: float, base: int, current: int, tolerance: float) -> tuple[int, bool]:
    """The HPA's proposal for a demand in replicas measured against `base` replicas:
    (replicas, held by the tolerance)."""
    if base <= 0 or abs(1 - value / base) <= tolerance + _EPSILON:
        return current, True
    return max(0, math.ceil(value - _EPSILON)), False


def smooth(
    found: list[Proposal],
    tracks: tuple[Track, ...],
    current: int,
    tolerance: float,
    rules: Smoothing,
    now: float,
) -> tuple[list[Proposal], tuple[Track, ...], list[int | None]]:
    """Feed each readable metric two-speed: (the proposals as fed, the tracks to keep, each
    metric's smoothed recommendation, which the scale-down window records)."""
    known = {t.metric: t for t in tracks}
    out: list[Proposal] = []
    slow: list[int | None] = []
    for p in found:
        asked = p.proposal
        if p.demand is None:
            out.append(p)
            slow.append(asked.replicas)
            continue
        if p.partial:  # not averaged: the samples missing would skew it
            track = known.get(asked.metric)
            level = track.level if track is not None else None
            noted = {"demand": p.demand, "level": level, "path": "partial"}
            out.append(replace(p, proposal=asked.model_copy(update=noted)))
            slow.append(asked.replicas)
            continue
        fed = feed(known.get(asked.metric), asked.metric, p.demand, now, rules)
        known[asked.metric] = fed.track
        level = fed.track.level
        shown = {"demand": p.demand, "level": level, "noise": fed.noise}
        alone = f"the reading alone: {asked.formula or asked.note}"
        smoothed, smoothed_held = rule(fed.smoothed, p.base, current, tolerance)
        slow.append(smoothed)
        if fed.burst is not None:
            bursting, burst_held = rule(fed.burst, p.base, current, tolerance)
            if bursting > smoothed:
                why = (
                    f"burst: {p.demand:.2f} replicas is above the average {fed.level:.2f} by "
                    f"more than {rules.burst:g} x noise {fed.noise:.2f}"
                )
                if burst_held:
                    formula = ""
                    note = (
                        f"{why}; {fed.burst:.2f} after {rules.discount:g} x noise is within "
                        f"tolerance of {p.base}; {alone}"
                    )
                else:
                    formula = (
                        f"{why}; ceil({p.demand:.2f} - {rules.discount:g} x {fed.noise:.2f}) "
                        f"= {bursting}"
                    )
                    note = alone
                update = {
                    **shown,
                    "path": "burst",
                    "replicas": bursting,
                    "formula": formula,
                    "note": note,
                }
                out.append(replace(p, proposal=asked.model_copy(update=update), held=burst_held))
                continue
        headroom = fed.smoothed - level
        value = f"average {level:.2f} + headroom {headroom:.2f}"
        if fed.drop:
            alone = (
                f"drop: {p.demand:.2f} replicas is below the average {fed.level:.2f} by more "
                f"than {rules.burst:g} x noise {fed.noise:.2f}, so the average moved to it "
                f"(+ {rules.discount:g} x noise); {alone}"
            )
        if smoothed_held:
            ratio = fed.smoothed / p.base if p.base else 0.0
            formula = ""
            note = (
                f"smoothed: {value} = {fed.smoothed:.2f} replicas, within tolerance of "
                f"{p.base}: |1 - {ratio:.3f}| <= {tolerance:g}; {alone}"
            )
        else:
            formula = f"smoothed: ceil({value}) = {smoothed}"
            note = alone
        update = {**shown, "path": "smoothed", "replicas": smoothed, "formula": formula}
        update["note"] = note
        out.append(replace(p, proposal=asked.model_copy(update=update), held=smoothed_held))
    kept = tuple(known[p.proposal.metric] for p in found if p.proposal.metric in known)
    return out, kept, slow
