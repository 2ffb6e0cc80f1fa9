"""`behavior.smoothing`: what each metric feeds the HPA rules. `off` (the default) feeds every
reading as it comes; `two_speed` feeds an exponential average plus a noise headroom, and a
burst's reading at once; the scale-down window records only the average's recommendation."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError

from corral.schemas.autoscale import Autoscale, Smoothing
from corral.schemas.spec import ServiceSpec
from corral.workers.autoscaler.policy import History, Inputs, Reading, evaluate, stabilize
from corral.workers.autoscaler.smoothing import (
    MIN_POINTS,
    NOISE_POINTS,
    Track,
    feed,
    noise,
)

TWO_SPEED = {"mode": "two_speed"}
GAP = 0.954  # the median |x - y| of two normal draws, in deviations


def policy(smoothing: dict[str, Any] | None = None, **fields: Any) -> Autoscale:
    base: dict[str, Any] = {
        "min": 1,
        "max": 100,
        "metrics": [{"type": "metric", "name": "load", "target": 10}],
        "behavior": {"smoothing": smoothing if smoothing is not None else TWO_SPEED},
    }
    base.update(fields)
    return Autoscale.model_validate(base)


def at(current: int, per_replica: float, *, reporting: int | None = None) -> Inputs:
    """`current` replicas running and ready, the first `reporting` of them sending the value."""
    names = tuple(f"r{i}" for i in range(current))
    sending = names[: current if reporting is None else reporting]
    return Inputs(
        current=current,
        replicas=names,
        ready=current,
        readings=(Reading(per_replica=dict.fromkeys(sending, per_replica)),),
    )


def noisy(p: Autoscale, current: int, seconds: int, start: float = 0.0) -> tuple[History, float]:
    """`seconds` of readings at 1 s: 8 per replica, then 7 and 9 in turn (demand 0.8 x
    current, +- 0.1 x current), applying no decision: a history with a measured noise."""
    h = History()
    t = start
    for i in range(seconds):
        value = 8.0 if i == 0 else 7.0 if i % 2 else 9.0
        _, h = evaluate(p, at(current, value), h, t)
        t += 1.0
    return h, t


# --- the schema ---------------------------------------------------------------------------------


def test_smoothing_is_off_by_default_and_two_speed_has_its_settings() -> None:
    spec = ServiceSpec.model_validate(
        {
            "name": "web",
            "command": ["serve"],
            "autoscale": {"max": 5, "metrics": [{"type": "metric", "name": "cpu", "target": 1}]},
        }
    )
    assert spec.autoscale is not None
    smoothing = spec.autoscale.behavior.smoothing
    assert smoothing.mode == "off"
    assert (smoothing.window, smoothing.burst, smoothing.discount) == (150, 3, 1)
    assert (smoothing.headroom, smoothing.hold) == (1, 120)
    two = policy({"mode": "two_speed", "window": "2m", "hold": "30s"}).behavior.smoothing
    assert (two.mode, two.window, two.hold) == ("two_speed", 120, 30)


@pytest.mark.parametrize(
    ("smoothing", "message"),
    [
        ({"mode": "fast"}, "'off' or 'two_speed'"),
        ({"mode": "two_speed", "window": 0}, "greater than 0"),
        ({"mode": "two_speed", "burst": 0}, "greater than 0"),
        ({"mode": "two_speed", "discount": -1}, "greater than or equal to 0"),
        ({"mode": "two_speed", "headroom": -0.5}, "greater than or equal to 0"),
        ({"mode": "two_speed", "hold": "forever"}, "hold"),
        ({"mode": "two_speed", "average": 3}, "Extra inputs are not permitted"),
    ],
)
def test_bad_smoothing_is_refused_with_a_reason(smoothing: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        policy(smoothing)
    assert message in str(info.value)


def test_the_json_schema_documents_smoothing() -> None:
    schema = Autoscale.model_json_schema()
    fields = schema["$defs"]["Smoothing"]["properties"]
    assert set(fields) == {"mode", "window", "burst", "discount", "headroom", "hold"}
    assert fields["mode"]["enum"] == ["off", "two_speed"]
    assert Smoothing.model_json_schema()["properties"]["mode"]["default"] == "off"


# --- the noise and the average -----------------------------------------------------------------


def test_the_noise_is_the_median_gap_between_neighbours() -> None:
    alternating = tuple(4.5 if i % 2 else 3.5 for i in range(20))
    assert noise(alternating) == pytest.approx(1.0 / GAP)
    assert noise(alternating[: MIN_POINTS - 1]) == 0.0  # too few readings to tell
    assert noise((4.0,) * 30) == 0.0


def test_a_ramp_barely_moves_the_noise_and_old_readings_leave_it() -> None:
    base = [4.5 if i % 2 else 3.5 for i in range(NOISE_POINTS - 10)]
    ramp = [4.0 + 3.0 * i for i in range(10)]  # ten readings climbing 3 replicas a second
    assert noise(tuple(base + ramp)) == pytest.approx(1.0 / GAP)
    quiet = tuple(base + [4.0] * NOISE_POINTS)  # the noisy minute has left the window
    assert noise(quiet) == 0.0


def test_the_average_moves_by_the_time_elapsed() -> None:
    rules = Smoothing(mode="two_speed", window=100)
    first = feed(None, "metric load", 4.0, 0.0, rules)
    assert first.track.level == 4.0
    assert first.burst is None
    # a minute of readings 4 +- 0.5: a noise of 1 / 0.954, so 2.0 is no drop
    noisy = replace(first.track, points=tuple(4.5 if i % 2 else 3.5 for i in range(60)))
    later = feed(noisy, "metric load", 2.0, 100.0, rules)  # one window later
    assert not later.drop
    assert later.track.level == pytest.approx(4.0 - 2.0 * (1 - math.exp(-1)))
    # several evaluations in between move it as one of the same total time
    step = noisy
    for i in range(1, 11):
        step = feed(step, "metric load", 2.0, 10.0 * i, rules).track
    assert step.level == pytest.approx(later.track.level)


def test_a_drop_moves_the_average_at_once() -> None:
    rules = Smoothing(mode="two_speed")
    track = Track(
        metric="metric load",
        level=4.0,
        at=0.0,
        points=tuple(4.5 if i % 2 else 3.5 for i in range(60)),
        point_at=0.0,
    )
    fell = feed(track, "metric load", 0.5, 1.0, rules)  # 3.5 below: beyond 3 x 1.05
    assert fell.drop
    assert fell.track.level == pytest.approx(0.5 + 1.0 / GAP)


def test_readings_closer_than_a_second_add_no_noise_point() -> None:
    rules = Smoothing(mode="two_speed")
    track: Track | None = None
    for i in range(10):
        track = feed(track, "metric load", 4.0 + i, i * 0.25, rules).track
    assert track is not None
    assert len(track.points) == 3  # at 0, 1 and 2 s
    # a poll re-evaluating the same reading adds nothing: only new readings measure the noise
    again = feed(track, "metric load", track.points[-1], 10.0, rules).track
    assert again.points == track.points
    assert feed(again, "metric load", 1.0, 11.0, rules).track.points[-1] == 1.0


def test_stabilize_records_the_smoothed_value_and_honours_a_hold() -> None:
    behavior = policy().behavior
    # a burst's 8 acts now, but the windows keep the average's 4
    result, _, _, kept = stabilize(8, 5, (), behavior, 0.0, recorded=4, held=None)
    assert (result, kept) == (8, ((0.0, 4),))
    # later, asked for 3: the window's 4 and a burst still held at 5 keep it at 5
    result, _, down, kept = stabilize(3, 6, kept, behavior, 10.0, recorded=3, held=5)
    assert (result, down) == (5, 5)
    assert kept == ((0.0, 4), (10.0, 3))


# --- two speeds in the policy ------------------------------------------------------------------


def test_a_noise_peak_does_not_scale_up() -> None:
    p = policy()
    h, t = noisy(p, 5, 60)
    # a reading 15 % over the target: the HPA's rule alone would go to 6
    decision, _ = evaluate(p, at(5, 11.5), h, t)
    assert (decision.desired, decision.action, decision.code) == (5, "none", "tolerance")
    [proposal] = decision.proposals
    assert proposal.path == "smoothed"
    assert proposal.demand == pytest.approx(5.75)
    # the first readings, before the noise could be told, moved it a little
    assert proposal.level is not None
    assert 3.5 <= proposal.level <= 4.0
    assert proposal.noise == pytest.approx(1.0 / GAP)
    assert "smoothed: average" in proposal.note
    assert "within tolerance of 5" in proposal.note
    assert "the reading alone: ceil(11.5 / 10 x 5) = 6" in proposal.note
    off = policy({"mode": "off"})
    h_off, t_off = noisy(off, 5, 60)
    raw, _ = evaluate(off, at(5, 11.5), h_off, t_off)
    assert (raw.desired, raw.action) == (6, "scale_up")


def test_a_burst_scales_up_at_once() -> None:
    p = policy()
    h, t = noisy(p, 5, 60)
    decision, h = evaluate(p, at(5, 30.0), h, t)  # demand 15: far beyond 3 deviations
    [proposal] = decision.proposals
    assert proposal.path == "burst"
    expected = math.ceil(15.0 - 1.0 / GAP)
    assert proposal.replicas == expected == 14
    assert decision.recommended == 14
    # the HPA's scale-up limit still applies: max(100 %, 4) from 5
    assert (decision.desired, decision.action, decision.limited_by) == (
        10,
        "scale_up",
        "scale_up_limit",
    )
    assert "burst: 15.00 replicas is above the average" in decision.reason
    assert f"= {expected}" in decision.reason


def test_the_window_holds_the_smoothed_value_and_a_burst_only_for_its_hold() -> None:
    p = policy({"mode": "two_speed", "hold": "15s"})
    h, t = noisy(p, 5, 60)
    burst, h = evaluate(p, at(5, 30.0), h, t)
    assert burst.desired == 10
    # the down window recorded what the average asked for, not the burst's 14
    assert max(value for _, value in h.recommendations) < 10
    # back to the baseline (demand 4 +- 0.5) on the 10 replicas
    during, h = evaluate(p, at(10, 4.5), h, t + 10)
    assert (during.desired, during.code) == (10, "stabilized")
    assert "a burst's recommendation of 14 holds for 5s more" in during.reason
    assert during.recheck_after == pytest.approx(5.0)
    after, h = evaluate(p, at(10, 3.5), h, t + 16)
    window = max(value for _, value in h.recommendations)
    assert after.desired == window < 10
    assert after.action == "scale_down"
    assert after.reason.startswith("metric load: smoothed: ceil(average")


def test_a_burst_is_held_no_longer_than_the_scale_down_window() -> None:
    p = policy(behavior={"smoothing": TWO_SPEED, "scale_down": {"stabilization_window": 5}})
    h, t = noisy(p, 5, 150)
    burst, h = evaluate(p, at(5, 30.0), h, t)
    assert burst.desired == 10
    during, h = evaluate(p, at(10, 4.5), h, t + 3)
    assert during.desired == 10
    assert "a burst's recommendation of 14 holds for 2s more" in during.reason
    after, _ = evaluate(p, at(10, 3.5), h, t + 6)  # not the 120 s `hold`: the 5 s window
    assert after.action == "scale_down"
    assert after.desired < 10


def test_a_sustained_burst_enters_the_window_through_the_average() -> None:
    p = policy()
    h, t = noisy(p, 5, 60)
    current = 5
    for i in range(900):  # 15 minutes at a demand of 15 +- 1: the average catches up
        demand = 16.0 if i % 2 else 14.0
        d, h = evaluate(p, at(current, demand * 10 / current), h, t)
        current, t = d.desired, t + 1
    assert current >= 15
    held_at = current
    for i in range(120):  # two minutes back at the baseline
        d, h = evaluate(p, at(current, (4.5 if i % 2 else 3.5) * 10 / current), h, t)
        current, t = d.desired, t + 1
    assert current >= 15  # the 300 s window holds the average's recommendation
    assert current <= held_at
    assert d.code == "stabilized"
    assert "the highest recommendation of the last 300s" in d.reason


def test_a_drop_scales_down_at_once_without_a_window() -> None:
    p = policy(behavior={"smoothing": TWO_SPEED, "scale_down": {"stabilization_window": 0}})
    # long enough for the holds of the first readings (each rise is a burst until the noise
    # is known) to have ended
    h, t = noisy(p, 5, 150)
    decision, h = evaluate(p, at(5, 0.0), h, t)  # idle: beyond 3 deviations below
    [proposal] = decision.proposals
    assert proposal.path == "smoothed"
    assert "drop: 0.00 replicas is below the average" in proposal.note
    # the average moved to 0 + 1 deviation; the headroom is 1 replica at most
    assert (decision.desired, decision.action) == (math.ceil(1.0 / GAP + 1.0), "scale_down")
    assert decision.desired == 3


def test_constant_readings_give_the_hpa_formula() -> None:
    p = policy()
    h = History()
    for t in range(5):
        d, h = evaluate(p, at(3, 20.0), h, float(t))
        if t == 0:
            assert (d.desired, d.recommended) == (6, 6)  # as the HPA: double the target
            [proposal] = d.proposals
            assert proposal.path == "smoothed"
            assert proposal.noise == 0.0
            assert proposal.formula == "smoothed: ceil(average 6.00 + headroom 0.00) = 6"
    # a step of constant readings has no noise: it is a burst, acted on at once
    step, _ = evaluate(p, at(6, 40.0), h, 5.0)
    assert (step.recommended, step.proposals[0].path) == (24, "burst")


def test_a_partial_reading_is_not_averaged() -> None:
    p = policy()
    h, t = noisy(p, 5, 20)
    [before] = h.tracks
    decision, h2 = evaluate(p, at(5, 30.0, reporting=3), h, t)  # 2 replicas sent nothing yet
    [proposal] = decision.proposals
    assert proposal.path == "partial"
    assert "2 of 5 replicas sent no sample" in proposal.note
    assert h2.tracks == (before,)
    # the HPA's rule for missing samples applies as it is: counted as 0 going up
    assert decision.recommended == 9  # ceil(90 / 10)


def test_an_unreadable_metric_keeps_its_average() -> None:
    p = policy()
    h, t = noisy(p, 5, 20)
    [before] = h.tracks
    empty = Inputs(current=5, replicas=tuple(f"r{i}" for i in range(5)), ready=5)
    decision, h2 = evaluate(p, empty, h, t)
    assert decision.code == "missing_metrics"
    assert h2.tracks == (before,)


def test_cooldown_to_zero_forgets_the_averages() -> None:
    p = policy(
        min=0,
        cooldown=60,
        metrics=[{"type": "queue", "stream": "JOBS", "consumer": "w", "target": 10}],
    )
    h = History()
    d, h = evaluate(
        p, Inputs(current=1, replicas=("r0",), ready=1, readings=(Reading(value=0.0),)), h, 0.0
    )
    assert h.tracks
    d, h = evaluate(
        p, Inputs(current=1, replicas=("r0",), ready=1, readings=(Reading(value=0.0),)), h, 60.0
    )
    assert (d.desired, d.code) == (0, "cooldown")
    assert h.tracks == ()
    assert h.burst == 0


def test_with_several_metrics_the_window_keeps_the_largest_smoothed_recommendation() -> None:
    p = policy(
        metrics=[
            {"type": "metric", "name": "load", "target": 10},
            {"type": "queue", "stream": "JOBS", "consumer": "w", "target": 10},
        ]
    )
    h = History()
    t = 0.0
    for i in range(60):  # load 0.8 x target per replica +- 0.1; a backlog of 30 +- 6
        readings = (
            Reading(per_replica={f"r{n}": 7.0 if i % 2 else 9.0 for n in range(5)}),
            Reading(value=24.0 if i % 2 else 36.0),
        )
        names = tuple(f"r{n}" for n in range(5))
        _, h = evaluate(p, Inputs(current=5, replicas=names, ready=5, readings=readings), h, t)
        t += 1.0
    names = tuple(f"r{n}" for n in range(5))
    burst = (Reading(per_replica=dict.fromkeys(names, 8.0)), Reading(value=200.0))
    d, h = evaluate(p, Inputs(current=5, replicas=names, ready=5, readings=burst), h, t)
    load, queue = d.proposals
    assert queue.path == "burst"  # a backlog of 200 against 30 +- 6: ceil(20 - 1 x 6 / 0.954)
    assert queue.replicas == math.ceil(20.0 - 1.2 / GAP)
    assert load.path == "smoothed"
    assert d.recommended == queue.replicas
    assert d.desired == 10  # max(100 %, 4) from 5
    # the window keeps the larger of the two averages' recommendations, not the burst's
    assert h.recommendations[-1][1] < 10


def test_a_queue_backlog_is_averaged_as_a_total() -> None:
    p = policy(metrics=[{"type": "queue", "stream": "JOBS", "consumer": "w", "target": 10}])
    h = History()
    names = ("r0", "r1", "r2")
    for i in range(30):  # a backlog of 25 +- 5: 2.5 replicas of work on 3
        reading = (Reading(value=20.0 if i % 2 else 30.0),)
        d, h = evaluate(p, Inputs(current=3, replicas=names, ready=3, readings=reading), h, i)
    [proposal] = d.proposals
    assert proposal.path == "smoothed"
    assert proposal.noise == pytest.approx(1.0 / GAP)
    # a backlog of 30 alone asks ceil(30 / 10) = 3; the average and its headroom agree
    assert d.desired == 3
