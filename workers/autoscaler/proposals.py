"""Pure: what one metric asks for (step 1 of the HPA algorithm; see `policy`).

- A per-replica metric (pushed samples): ratio = average / target, desired = ceil(ratio x
  replicas with samples); within the tolerance, the current count. Replicas without a fresh
  sample count as 0 when scaling up and as the target when scaling down; if that changes the
  direction, or lands within the tolerance, nothing changes (`replica_calculator.go`).
- A total (a queue backlog, a Prometheus total; an AverageValue target): desired =
  ceil(total / target), unless total / (target x current) is within the tolerance.
- A value (Prometheus with `per_replica: false`; a Value target): desired =
  ceil(value / target x ready replicas); from zero, ceil(value / target).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from corral.schemas.autoscale import AlertMetric, PrometheusMetric, PushMetric, QueueMetric
from corral.schemas.events import AutoscaleProposal
from corral.workers.autoscaler.alerts import FiringAlert
from corral.workers.autoscaler.alerts import propose as propose_alert

Metric = PushMetric | PrometheusMetric | QueueMetric | AlertMetric
_EPSILON = 1e-9
"""ceil(3.0000000000000004) is 4, and 110 / 100 is 1.1000000000000001: float noise must not
add a replica, nor step over the tolerance"""


@dataclass(frozen=True)
class Reading:
    """One metric's reading: `per_replica` fresh samples (push metrics), or a `value` (pulled
    sources), or neither and the `error` that says why."""

    per_replica: Mapping[str, float] | None = None
    value: float | None = None
    error: str = ""
    alerts: tuple[FiringAlert, ...] = ()
    """an alert metric: the alerts firing now that match it"""


@dataclass(frozen=True)
class Inputs:
    current: int
    """the spec's replica count"""
    replicas: tuple[str, ...] = ()
    """running replicas"""
    ready: int = 0
    readings: tuple[Reading, ...] = ()
    """one per metric of the policy, in its order"""
    activity_at: float | None = None
    """when the activation last fired (a message, or a backlog over its threshold)"""
    activity: str = ""
    busy: Mapping[str, float] = field(default_factory=dict)
    """how busy each replica says it is (the busy metric), for choosing who leaves"""


@dataclass(frozen=True)
class Proposal:
    proposal: AutoscaleProposal
    held: bool = False
    """the metric asked for the current count because of the tolerance"""
    demand: float | None = None
    """the replicas asked for before rounding and the tolerance (None: no reading)"""
    base: int = 0
    """the count the tolerance measures `demand` against"""
    partial: bool = False
    """some running replicas sent no sample: the HPA's rule for them applies to this reading
    as it is, and no other value fed changes it"""


def _ceil(value: float) -> int:
    return max(0, math.ceil(value - _EPSILON))


def _missing(metric: Metric, why: str) -> Proposal:
    return Proposal(AutoscaleProposal(metric=metric.label(), target=metric.target, note=why))


def propose(metric: Metric, reading: Reading, inputs: Inputs, tolerance: float) -> Proposal:
    """What one metric asks for (step 1)."""
    if isinstance(metric, AlertMetric):
        return Proposal(propose_alert(metric, reading.alerts, reading.error))
    if isinstance(metric, PushMetric):
        return _per_replica(metric, reading, inputs, tolerance)
    if reading.value is None:
        return _missing(metric, reading.error or "no reading yet")
    if isinstance(metric, PrometheusMetric) and not metric.per_replica:
        return _value(metric, reading.value, inputs, tolerance)
    return _total(metric, reading.value, inputs.current, tolerance)


def _per_replica(
    metric: PushMetric, reading: Reading, inputs: Inputs, tolerance: float
) -> Proposal:
    live = inputs.replicas
    running = set(live)
    samples = {r: v for r, v in (reading.per_replica or {}).items() if r in running}
    if not samples:
        why = (
            reading.error
            or f"no sample newer than {metric.max_age:g}s from any of {len(live)} running replicas"
            if live
            else "no running replica to sample"
        )
        return _missing(metric, why)
    target, current = metric.target, inputs.current
    reporting = len(samples)
    total = sum(samples.values())
    average = total / reporting
    ratio = average / target
    base = AutoscaleProposal(
        metric=metric.label(), value=average, target=target, ratio=ratio, replicas=current
    )
    missing = [r for r in live if r not in samples]
    if not missing:
        demand, counts = ratio * reporting, reporting
        if abs(1 - ratio) <= tolerance + _EPSILON:
            note = f"within tolerance: |1 - {ratio:.3f}| <= {tolerance:g}"
            held = base.model_copy(update={"note": note})
            return Proposal(held, held=True, demand=demand, base=counts)
        wanted = _ceil(ratio * reporting)
        formula = f"ceil({average:g} / {target:g} x {reporting}) = {wanted}"
        asked = base.model_copy(update={"replicas": wanted, "formula": formula})
        return Proposal(asked, demand=demand, base=counts)
    # replicas without a sample: 0 on the way up, the target on the way down, then again
    if ratio < 1:
        fill, assumed = target, "the target"
    elif ratio > 1:
        fill, assumed = 0.0, "0"
    else:
        fill, assumed = None, ""
    counted = reporting + (len(missing) if fill is not None else 0)
    new_ratio = (total + (fill or 0.0) * len(missing) if fill is not None else total) / (
        counted * target
    )
    note = f"{len(missing)} of {len(live)} replicas sent no sample" + (
        f", counted as {assumed}: ratio {new_ratio:.3f}" if fill is not None else ""
    )
    flipped = (ratio < 1 < new_ratio) or (ratio > 1 > new_ratio)
    demand, counts = new_ratio * counted, counted
    if abs(1 - new_ratio) <= tolerance + _EPSILON or flipped:
        why = "within tolerance" if not flipped else "the direction would change"
        held = base.model_copy(update={"note": f"{note}; {why}"})
        return Proposal(held, held=True, partial=True, demand=demand, base=counts)
    wanted = _ceil(new_ratio * counted)
    if (new_ratio < 1 and wanted > current) or (new_ratio > 1 and wanted < current):
        note += "; the direction would change"
        held = base.model_copy(update={"note": note})
        return Proposal(held, held=True, partial=True, demand=demand, base=counts)
    formula = f"ceil({new_ratio:.3f} x {counted}) = {wanted}"
    update = {"replicas": wanted, "formula": formula, "note": note}
    return Proposal(base.model_copy(update=update), partial=True, demand=demand, base=counts)


def _total(metric: Metric, total: float, current: int, tolerance: float) -> Proposal:
    target = metric.target
    wanted = _ceil(total / target) if total > 0 else 0
    formula = f"ceil({total:g} / {target:g}) = {wanted}"
    if current == 0:
        proposal = AutoscaleProposal(
            metric=metric.label(), value=total, target=target, replicas=wanted, formula=formula
        )
        return Proposal(proposal)
    ratio = total / (target * current)
    base = AutoscaleProposal(
        metric=metric.label(), value=total, target=target, ratio=ratio, replicas=current
    )
    demand, counts = total / target, current
    if abs(1 - ratio) <= tolerance + _EPSILON:
        note = f"within tolerance: |1 - {total:g} / ({target:g} x {current})| <= {tolerance:g}"
        held = base.model_copy(update={"note": note})
        return Proposal(held, held=True, demand=demand, base=counts)
    asked = base.model_copy(update={"replicas": wanted, "formula": formula})
    return Proposal(asked, demand=demand, base=counts)


def _value(metric: Metric, value: float, inputs: Inputs, tolerance: float) -> Proposal:
    target, current = metric.target, inputs.current
    ratio = value / target
    base = AutoscaleProposal(
        metric=metric.label(), value=value, target=target, ratio=ratio, replicas=current
    )
    if current == 0:
        wanted = _ceil(ratio)
        formula = f"ceil({value:g} / {target:g}) = {wanted}"
        return Proposal(base.model_copy(update={"replicas": wanted, "formula": formula}))
    demand, counts = ratio * inputs.ready, inputs.ready
    if abs(1 - ratio) <= tolerance + _EPSILON:
        note = f"within tolerance: |1 - {ratio:.3f}| <= {tolerance:g}"
        held = base.model_copy(update={"note": note})
        return Proposal(held, held=True, demand=demand, base=counts)
    if inputs.ready == 0:
        return _missing(metric, "no ready replica to scale from yet")
    wanted = _ceil(ratio * inputs.ready)
    formula = f"ceil({value:g} / {target:g} x {inputs.ready} ready) = {wanted}"
    asked = base.model_copy(update={"replicas": wanted, "formula": formula})
    return Proposal(asked, demand=demand, base=counts)
