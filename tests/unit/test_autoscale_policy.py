"""The autoscale policy against the HPA rules in Kubernetes' documentation ("Horizontal Pod
Autoscaling", algorithm details and configurable scaling behavior), and KEDA-style scale to and
from zero. Every case states the rule it checks."""

from __future__ import annotations

from typing import Any

import pytest

from corral.schemas.autoscale import Autoscale
from corral.workers.autoscaler.policy import (
    History,
    Inputs,
    Reading,
    evaluate,
    least_busy,
    stabilize,
)


def policy(**fields: Any) -> Autoscale:
    base: dict[str, Any] = {
        "min": 1,
        "max": 100,
        "metrics": [{"type": "metric", "name": "load", "target": 100}],
    }
    base.update(fields)
    return Autoscale.model_validate(base)


FAST = {
    "scale_up": {"policies": [{"type": "percent", "value": 1000, "period": 1}]},
    "scale_down": {
        "stabilization_window": 0,
        "policies": [{"type": "percent", "value": 100, "period": 1}],
    },
}
"""no stabilisation, no rate limit: the formula alone"""


def replicas(n: int) -> tuple[str, ...]:
    return tuple(f"r{i}" for i in range(n))


def samples(*values: float) -> Reading:
    return Reading(per_replica={f"r{i}": v for i, v in enumerate(values)})


def inputs(current: int, *readings: Reading, live: int | None = None, **extra: Any) -> Inputs:
    count = current if live is None else live
    return Inputs(
        current=current, replicas=replicas(count), ready=count, readings=readings, **extra
    )


def once(p: Autoscale, i: Inputs, history: History | None = None, now: float = 1000.0) -> Any:
    decision, _ = evaluate(p, i, history or History(), now)
    return decision


# --- the formula: desired = ceil(current x value / target) ----------------------------------


def test_double_the_target_doubles_the_replicas() -> None:
    # "if the current metric value is 200m, and the desired value is 100m, the number of
    # replicas will be doubled"
    decision = once(policy(behavior=FAST), inputs(3, samples(200, 200, 200)))
    assert (decision.current, decision.desired, decision.action) == (3, 6, "scale_up")
    [proposal] = decision.proposals
    assert proposal.value == 200
    assert proposal.ratio == pytest.approx(2.0)
    assert proposal.formula == "ceil(200 / 100 x 3) = 6"
    assert decision.code == "scale_up"
    assert "ceil(200 / 100 x 3) = 6" in decision.reason


def test_half_the_target_halves_the_replicas() -> None:
    # "If the current value is instead 50m, you'll halve the number of replicas"
    decision = once(policy(behavior=FAST), inputs(4, samples(50, 50, 50, 50)))
    assert decision.desired == 2
    assert decision.action == "scale_down"


def test_the_average_over_replicas_is_what_counts() -> None:
    decision = once(policy(behavior=FAST), inputs(3, samples(0, 100, 500)))
    assert decision.proposals[0].value == pytest.approx(200)
    assert decision.desired == 6


def test_rounding_is_up_and_free_of_float_noise() -> None:
    decision = once(policy(behavior=FAST), inputs(3, samples(130, 130, 130)))
    assert decision.desired == 4  # ceil(1.3 x 3) = ceil(3.9)
    # 0.3 / 0.1 x 1 is 2.9999999999999996 in floats, 3 exactly in arithmetic
    p = policy(behavior=FAST, metrics=[{"type": "metric", "name": "load", "target": 0.1}])
    assert once(p, inputs(1, samples(0.3))).desired == 3


# --- tolerance ------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "changes"), [(109, False), (110, False), (111, True)])
def test_within_the_tolerance_of_10_percent_nothing_changes(value: float, changes: bool) -> None:
    # "The control plane skips any scaling action if the ratio is sufficiently close to 1.0
    # (within a globally-configurable tolerance, 0.1 by default)"
    decision = once(policy(behavior=FAST), inputs(10, samples(*[value] * 10)))
    assert (decision.desired != 10) is changes
    if not changes:
        assert decision.code == "tolerance"
        assert "within tolerance" in decision.proposals[0].note


def test_tolerance_holds_downwards_too() -> None:
    decision = once(policy(behavior=FAST), inputs(10, samples(*[91] * 10)))
    assert decision.desired == 10
    assert decision.code == "tolerance"


def test_tolerance_can_be_set_per_service() -> None:
    p = policy(behavior={**FAST, "tolerance": 0.3})
    assert once(p, inputs(10, samples(*[125] * 10))).desired == 10
    assert once(p, inputs(10, samples(*[135] * 10))).desired == 14


# --- several metrics ------------------------------------------------------------------------


def test_with_several_metrics_the_largest_proposal_wins() -> None:
    # "this calculation is done for each metric, and then the largest of the desired replica
    # counts is chosen"
    p = policy(
        behavior=FAST,
        metrics=[
            {"type": "metric", "name": "cpu", "target": 0.5},
            {"type": "queue", "stream": "JOBS", "consumer": "work", "target": 10},
        ],
    )
    decision = once(p, inputs(2, samples(0.5, 0.5), Reading(value=70)))
    assert [x.replicas for x in decision.proposals] == [2, 7]
    assert decision.desired == 7
    assert decision.reason.startswith("queue JOBS/work: ceil(70 / 10) = 7")


def test_several_metrics_all_asking_for_less_scale_down_to_the_largest() -> None:
    p = policy(
        behavior=FAST,
        metrics=[
            {"type": "metric", "name": "cpu", "target": 1},
            {"type": "metric", "name": "load", "target": 100},
        ],
    )
    decision = once(p, inputs(8, samples(*[0.25] * 8), samples(*[50] * 8)))
    assert [x.replicas for x in decision.proposals] == [2, 4]
    assert decision.desired == 4


# --- missing metrics ------------------------------------------------------------------------


def test_no_readable_metric_changes_nothing() -> None:
    decision = once(policy(behavior=FAST), inputs(3, Reading(per_replica={})))
    assert decision.desired == 3
    assert decision.code == "missing_metrics"
    assert "no sample newer than 30s from any of 3 running replicas" in decision.reason


def test_a_missing_metric_blocks_a_scale_down_suggested_by_the_others() -> None:
    # "If any of these metrics cannot be converted into a desired replica count ... and a
    # scale down is suggested by the metrics which can be fetched, scaling is skipped"
    p = policy(
        behavior=FAST,
        metrics=[
            {"type": "metric", "name": "load", "target": 100},
            {"type": "prometheus", "query": "sum(rate(x[1m]))", "target": 5},
        ],
    )
    decision = once(p, inputs(4, samples(10, 10, 10, 10), Reading(error="connection refused")))
    assert decision.desired == 4
    assert decision.code == "missing_metrics"
    assert "prometheus sum(rate(x[1m])) could not be read" in decision.reason
    assert decision.proposals[1].note == "connection refused"


def test_a_missing_metric_does_not_block_a_scale_up() -> None:
    # "the HPA is still capable of scaling up if one or more metrics give a desiredReplicas
    # greater than the current value"
    p = policy(
        behavior=FAST,
        metrics=[
            {"type": "metric", "name": "load", "target": 100},
            {"type": "prometheus", "query": "up", "target": 5},
        ],
    )
    decision = once(p, inputs(2, samples(300, 300), Reading(error="timeout")))
    assert decision.desired == 6


def test_replicas_without_samples_count_as_zero_on_a_scale_up() -> None:
    # "assuming those pods were consuming ... 0% in case of a scale up"
    decision = once(policy(behavior=FAST), inputs(4, samples(400, 400), live=4))
    # measured ratio 4.0 over 2 replicas; with the two silent ones at 0: 800 / 4 / 100 = 2.0
    proposal = decision.proposals[0]
    assert decision.desired == 8
    assert "2 of 4 replicas sent no sample, counted as 0" in proposal.note
    assert proposal.formula == "ceil(2.000 x 4) = 8"


def test_replicas_without_samples_count_as_the_target_on_a_scale_down() -> None:
    # "assuming those pods were consuming 100% of the desired value in case of a scale down"
    decision = once(policy(behavior=FAST), inputs(4, samples(0, 0), live=4))
    # (0 + 0 + 100 + 100) / 4 / 100 = 0.5 -> ceil(0.5 x 4) = 2
    assert decision.desired == 2
    assert "counted as the target" in decision.proposals[0].note


def test_missing_samples_that_bring_the_ratio_within_tolerance_change_nothing() -> None:
    # "If the new ratio ... is within the tolerance, the controller doesn't take any action"
    decision = once(policy(behavior=FAST), inputs(10, samples(50), live=10))
    # (50 + 9 x 100) / 10 / 100 = 0.95
    assert decision.desired == 10
    assert decision.code == "tolerance"


def test_missing_samples_that_reverse_the_direction_change_nothing() -> None:
    # "If the new ratio reverses the scale direction ... the controller doesn't take any
    # scaling action". A ratio under 1 with the silent replicas at the target can only rise
    # towards 1, so the reversal shows through the replica count: 3 reporting at 0.9 and 7
    # silent give a ratio of 0.97, within tolerance, which already holds. Here the count of
    # the new proposal would be above the current one on a downward ratio.
    decision = once(
        policy(behavior={**FAST, "tolerance": 0.0}),
        inputs(3, Reading(per_replica={"r0": 10}), live=5),
    )
    # ratio 0.1 over 1; with 4 silent at 100: 410 / 5 / 100 = 0.82 -> ceil(0.82 x 5) = 5 > 3
    assert decision.desired == 3
    assert "the direction would change" in decision.proposals[0].note


def test_samples_of_replicas_that_no_longer_run_are_ignored() -> None:
    reading = Reading(per_replica={"r0": 200, "gone": 10_000})
    decision = once(policy(behavior=FAST), inputs(1, reading))
    assert decision.proposals[0].value == 200
    assert decision.desired == 2


# --- totals and values ----------------------------------------------------------------------


def test_a_queue_backlog_is_spread_over_the_replicas() -> None:
    # an AverageValue target: desired = ceil(total / target per replica)
    p = policy(
        behavior=FAST, metrics=[{"type": "queue", "stream": "S", "consumer": "c", "target": 10}]
    )
    decision = once(p, inputs(3, Reading(value=95)))
    assert decision.desired == 10
    assert decision.proposals[0].ratio == pytest.approx(95 / 30)


def test_a_total_within_tolerance_changes_nothing() -> None:
    p = policy(
        behavior=FAST, metrics=[{"type": "queue", "stream": "S", "consumer": "c", "target": 10}]
    )
    assert once(p, inputs(3, Reading(value=32))).code == "tolerance"


def test_an_empty_queue_scales_down_to_min() -> None:
    p = policy(
        min=2,
        behavior=FAST,
        metrics=[{"type": "queue", "stream": "S", "consumer": "c", "target": 10}],
    )
    decision = once(p, inputs(6, Reading(value=0)))
    assert decision.desired == 2
    assert decision.limited_by == "too_few_replicas"


def test_a_prometheus_value_target_scales_the_ready_replicas() -> None:
    # a Value target: desired = ceil(value / target x ready replicas)
    p = policy(
        behavior=FAST,
        metrics=[{"type": "prometheus", "query": "latency", "target": 0.2, "per_replica": False}],
    )
    decision = once(
        p, Inputs(current=4, replicas=replicas(4), ready=2, readings=(Reading(value=0.5),))
    )
    assert decision.desired == 5  # ceil(2.5 x 2)


# --- bounds ---------------------------------------------------------------------------------


def test_the_result_is_clamped_to_max_and_says_so() -> None:
    decision = once(policy(max=5, behavior=FAST), inputs(2, samples(1000, 1000)))
    assert decision.desired == 5
    assert decision.limited_by == "too_many_replicas"
    assert "max is 5" in decision.reason


def test_at_max_nothing_changes_and_the_reason_says_why() -> None:
    decision = once(policy(max=3, behavior=FAST), inputs(3, samples(500, 500, 500)))
    assert decision.desired == 3
    assert decision.code == "at_max"


def test_at_min_nothing_changes_and_the_reason_says_why() -> None:
    decision = once(policy(min=3, behavior=FAST), inputs(3, samples(1, 1, 1)))
    assert decision.code == "at_min"


def test_a_count_above_max_goes_straight_to_max() -> None:
    # "Current number of replicas above Spec.MaxReplicas": no metrics, no rate limit
    decision = once(policy(max=4), inputs(9, Reading()))
    assert (decision.desired, decision.code) == (4, "above_max")


def test_a_count_below_min_goes_straight_to_min() -> None:
    decision = once(policy(min=3), inputs(1, Reading()))
    assert (decision.desired, decision.code) == (3, "below_min")


def test_zero_replicas_with_min_above_zero_disables_autoscaling() -> None:
    # the HPA: "scaling is disabled since the replica count of the target is zero"
    decision = once(policy(min=1), inputs(0, Reading()))
    assert (decision.desired, decision.code) == (0, "disabled")


# --- scale-up policies: max(100%, 4 replicas) per 15 s ---------------------------------------


def test_default_scale_up_from_one_is_at_most_four_more() -> None:
    decision = once(policy(), inputs(1, samples(10_000)))
    assert decision.recommended == 100
    assert decision.desired == 5  # max(1 x 2, 1 + 4)
    assert decision.limited_by == "scale_up_limit"
    assert "scale-up policies allow 5 now (max of 100% per 15s, 4 replicas per 15s)" in (
        decision.reason
    )


def test_default_scale_up_from_ten_is_at_most_double() -> None:
    decision = once(policy(), inputs(10, samples(*[10_000] * 10)))
    assert decision.desired == 20  # max(10 x 2, 10 + 4)


def test_scale_up_events_within_the_period_count_against_the_next_step() -> None:
    p = policy()
    decision, history = evaluate(p, inputs(10, samples(*[10_000] * 10)), History(), 1000.0)
    assert decision.desired == 20
    # the scale applied; 5 s later the budget of this period is spent: the period started at 10
    later, history = evaluate(p, inputs(20, samples(*[10_000] * 20)), history, 1005.0)
    assert later.desired == 20
    assert later.code == "limited"
    assert later.limited_by == "scale_up_limit"
    assert later.recheck_after == pytest.approx(10.0)
    # once the period has passed, it may double again
    after, _ = evaluate(p, inputs(20, samples(*[10_000] * 20)), history, 1015.5)
    assert after.desired == 40


def test_select_policy_min_takes_the_least_change() -> None:
    p = policy(
        behavior={
            "scale_up": {
                "select_policy": "min",
                "policies": [
                    {"type": "percent", "value": 100, "period": 15},
                    {"type": "pods", "value": 4, "period": 15},
                ],
            }
        }
    )
    assert once(p, inputs(10, samples(*[10_000] * 10))).desired == 14


def test_scale_up_disabled_never_scales_up() -> None:
    p = policy(behavior={"scale_up": {"select_policy": "disabled"}})
    decision = once(p, inputs(2, samples(1000, 1000)))
    assert decision.desired == 2
    assert decision.code == "limited"


def test_a_scale_up_stabilisation_window_uses_the_lowest_recommendation() -> None:
    p = policy(behavior={**FAST, "scale_up": {"stabilization_window": 60}})
    seeded = History(seeded=True, active_at=0.0)
    _, history = evaluate(p, inputs(2, samples(150, 150)), seeded, 1000.0)  # asks 3
    decision, _ = evaluate(p, inputs(2, samples(400, 400)), history, 1010.0)  # asks 8
    assert decision.recommended == 8
    assert decision.desired == 3
    assert "the lowest recommendation of the last 60s was 3" in decision.reason


# --- scale-down: stabilisation (300 s) and policies -----------------------------------------


def test_scale_down_waits_for_the_stabilisation_window() -> None:
    # "the algorithm looks into previously computed desired states, and uses the highest value
    # from the specified interval"
    p = policy()
    d1, h = evaluate(p, inputs(6, samples(*[100] * 6)), History(), 0.0)
    assert d1.code == "tolerance"
    d2, h = evaluate(p, inputs(6, samples(*[20] * 6)), h, 60.0)
    assert d2.recommended == 2
    assert d2.desired == 6
    assert d2.code == "stabilized"
    assert "the highest recommendation of the last 300s was 6" in d2.reason
    assert d2.recheck_after == pytest.approx(240.0)
    d3, h = evaluate(p, inputs(6, samples(*[20] * 6)), h, 301.0)
    assert d3.desired == 2
    assert d3.action == "scale_down"


def test_stabilisation_applies_the_highest_recent_recommendation_not_the_latest() -> None:
    p = policy(behavior={"scale_down": {"stabilization_window": 100}})
    h = History()
    _, h = evaluate(p, inputs(10, samples(*[100] * 10)), h, 0.0)
    _, h = evaluate(p, inputs(10, samples(*[80] * 10)), h, 50.0)  # asks 8
    _, h = evaluate(p, inputs(10, samples(*[30] * 10)), h, 90.0)  # asks 3
    d, h = evaluate(p, inputs(10, samples(*[30] * 10)), h, 120.0)
    # the 10 of t=0 has left the window; 8 (t=50) is the highest left
    assert (d.recommended, d.stabilized, d.desired) == (3, 8, 8)
    d, _ = evaluate(p, inputs(8, samples(*[30] * 8)), h, 160.0)
    assert d.desired == 3


def test_a_fresh_history_holds_the_current_count_for_one_window() -> None:
    # as the HPA after a controller restart: the current count is a recent recommendation
    p = policy(behavior={"scale_down": {"stabilization_window": 30}})
    d, h = evaluate(p, inputs(5, samples(*[10] * 5)), History(), 0.0)
    assert d.code == "stabilized"
    d, _ = evaluate(p, inputs(5, samples(*[10] * 5)), h, 31.0)
    assert d.desired == 1


def test_scale_down_policies_the_documented_example() -> None:
    # docs: Pods 4 and Percent 10 per 60 s, select max: from 80 "during the first step 8
    # replicas will be reduced"; at 72, "10% of the pods is 7.2" -> 8 more
    p = policy(
        min=1,
        behavior={
            "scale_down": {
                "stabilization_window": 0,
                "policies": [
                    {"type": "pods", "value": 4, "period": 60},
                    {"type": "percent", "value": 10, "period": 60},
                ],
            }
        },
    )
    h = History(seeded=True, active_at=0.0)
    d, h = evaluate(p, inputs(80, samples(*[10] * 80)), h, 0.0)
    assert (d.desired, d.limited_by) == (72, "scale_down_limit")
    d, h = evaluate(p, inputs(72, samples(*[10] * 72)), h, 30.0)
    assert d.desired == 72  # the period's budget is spent
    d, h = evaluate(p, inputs(72, samples(*[10] * 72)), h, 61.0)
    assert d.desired == 64


def test_scale_down_disabled_never_scales_down() -> None:
    p = policy(behavior={"scale_down": {"stabilization_window": 0, "select_policy": "disabled"}})
    d = once(p, inputs(5, samples(*[1] * 5)))
    assert d.desired == 5


def test_stabilize_keeps_only_what_the_windows_need() -> None:
    p = policy(behavior={"scale_down": {"stabilization_window": 10}})
    behavior = p.behavior
    recs = ((0.0, 5), (5.0, 4))
    result, up, down, kept = stabilize(4, 5, recs, behavior, 12.0)
    assert (result, up, down) == (4, 4, 4)
    assert kept == ((12.0, 4),)  # (0, 5) left the window; the newer 4 replaces the older


# --- scale to zero and back -----------------------------------------------------------------

ZERO = {
    "min": 0,
    "max": 10,
    "cooldown": 60,
    "activation": {"subject": "jobs.in"},
    "metrics": [{"type": "metric", "name": "inflight", "target": 5}],
}


def test_cooldown_scales_to_zero_after_nothing_to_do() -> None:
    p = policy(**ZERO)
    d, h = evaluate(p, inputs(2, samples(0, 0)), History(), 0.0)
    assert d.desired != 0
    assert d.recheck_after == pytest.approx(60.0)
    d, h = evaluate(p, inputs(2, samples(0, 0)), h, 59.0)
    assert d.desired != 0
    d, h = evaluate(p, inputs(2, samples(0, 0)), h, 60.0)
    assert (d.desired, d.code, d.action) == (0, "cooldown", "scale_down")
    assert "nothing to do for 60.0s (cooldown 60s)" in d.reason
    assert h.zeroed_at == 60.0


def test_work_in_flight_keeps_a_min_zero_service_up() -> None:
    p = policy(**ZERO)
    d, h = evaluate(p, inputs(1, samples(1)), History(), 0.0)
    d, h = evaluate(p, inputs(1, samples(1)), h, 50.0)
    d, h = evaluate(p, inputs(1, samples(0)), h, 100.0)
    assert d.desired == 1  # busy until t=50: 50 s idle < 60 s
    d, h = evaluate(p, inputs(1, samples(0)), h, 110.0)
    assert d.desired == 0


def test_an_activation_message_resets_the_cooldown() -> None:
    p = policy(**ZERO)
    _, h = evaluate(p, inputs(1, samples(0)), History(), 0.0)
    d, h = evaluate(p, inputs(1, samples(0), activity_at=40.0), h, 70.0)
    assert d.desired == 1
    d, _ = evaluate(p, inputs(1, samples(0), activity_at=40.0), h, 100.0)
    assert d.desired == 0


def test_with_min_zero_the_hpa_works_with_a_minimum_of_one() -> None:
    p = policy(**{**ZERO, "behavior": FAST})
    d = once(p, inputs(3, samples(0, 0, 1)))
    assert d.desired == 1


def test_an_activation_wakes_a_service_at_zero_to_one_at_once() -> None:
    p = policy(**ZERO)
    h = History(seeded=True, active_at=0.0, zeroed_at=100.0)
    d, h = evaluate(p, inputs(0, activity_at=150.0, activity="a message on jobs.in"), h, 150.001)
    assert (d.desired, d.code, d.action) == (1, "activated", "scale_up")
    assert d.reason == "woken from zero by a message on jobs.in"
    # the cooldown starts again from the wake-up
    d, _ = evaluate(p, inputs(1, samples(0)), h, 200.0)
    assert d.desired == 1


def test_an_activation_from_before_the_scale_to_zero_does_not_wake_it() -> None:
    p = policy(**ZERO)
    h = History(seeded=True, active_at=0.0, zeroed_at=100.0)
    d, _ = evaluate(p, inputs(0, activity_at=30.0), h, 150.0)
    assert (d.desired, d.code) == (0, "idle")


def test_a_backlog_wakes_a_service_at_zero_through_its_queue_metric() -> None:
    p = policy(
        min=0,
        max=10,
        metrics=[{"type": "queue", "stream": "S", "consumer": "c", "target": 10}],
    )
    d = once(p, inputs(0, Reading(value=0)))
    assert d.code == "idle"
    d = once(p, inputs(0, Reading(value=3)))
    assert (d.desired, d.code) == (1, "activated")
    assert "queue S/c" in d.reason


def test_active_above_sets_the_activation_threshold_of_a_metric() -> None:
    p = policy(
        min=0,
        max=10,
        cooldown=10,
        metrics=[
            {"type": "queue", "stream": "S", "consumer": "c", "target": 10, "active_above": 5}
        ],
    )
    assert once(p, inputs(0, Reading(value=5))).code == "idle"
    assert once(p, inputs(0, Reading(value=6))).code == "activated"


# --- who leaves -----------------------------------------------------------------------------


def test_a_scale_down_names_the_least_busy_replicas_first() -> None:
    p = policy(behavior=FAST)
    busy = {"r0": 7.0, "r1": 0.0, "r2": 3.0, "r3": 1.0, "gone": 0.0}
    d = once(p, inputs(4, samples(10, 10, 10, 10), busy=busy))
    assert d.desired == 1
    assert d.prefer_remove == ["r1", "r3", "r2", "r0"]


def test_a_scale_up_names_nobody() -> None:
    d = once(policy(behavior=FAST), inputs(2, samples(300, 300), busy={"r0": 1.0}))
    assert d.prefer_remove == []


def test_least_busy_breaks_ties_by_id_and_skips_replicas_not_running() -> None:
    assert least_busy({"b": 1.0, "a": 1.0, "x": 0.0}, ("a", "b")) == ["a", "b"]


# --- history hygiene ------------------------------------------------------------------------


def test_scale_events_are_forgotten_after_the_longest_period() -> None:
    p = policy()
    _, h = evaluate(p, inputs(1, samples(10_000)), History(), 0.0)
    assert h.ups == ((0.0, 4),)
    _, h = evaluate(p, inputs(5, samples(*[10_000] * 5)), h, 100.0)
    assert [at for at, _ in h.ups] == [100.0]


def test_identical_recommendations_do_not_pile_up() -> None:
    p = policy()
    h = History()
    for t in range(1000):
        _, h = evaluate(p, inputs(3, samples(100, 100, 100)), h, float(t))
    assert len(h.recommendations) == 1
