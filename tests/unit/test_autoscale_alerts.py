"""Alertmanager alerts as an autoscale metric: the `type: alert` spec, reading the gateway's
alert events, the set of firing alerts, matching, the proposal, and how the policy treats it
beside other metrics (the largest proposal wins; the behaviour rules still apply)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from corral.schemas.autoscale import AlertMetric, Autoscale
from corral.schemas.spec import ServiceSpec
from corral.workers.autoscaler import alerts
from corral.workers.autoscaler.alerts import AlertError, Firing, FiringAlert, parse, propose
from corral.workers.autoscaler.policy import History, Inputs, Reading, evaluate
from corral.workers.autoscaler.worker import named_trigger

T0 = datetime(2026, 11, 27, 6, 0, tzinfo=UTC)


def metric(**fields: Any) -> AlertMetric:
    base: dict[str, Any] = {
        "type": "alert",
        "alertname": "HighLatency",
        "match": {"service": "web"},
        "replicas": 4,
    }
    base.update(fields)
    return AlertMetric.model_validate(base)


def data(status: str = "firing", fingerprint: str = "abc", **labels: str) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": "HighLatency", "service": "web", **labels},
        "annotations": {"summary": "p99 over 500ms"},
        "startsAt": "2026-11-27T05:55:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus/graph",
        "fingerprint": fingerprint,
        "receiver": "corral",
        "groupKey": '{}:{alertname="HighLatency"}',
    }


def alert(fingerprint: str = "abc", at: datetime = T0, **labels: str) -> FiringAlert:
    return parse("firing", data(fingerprint=fingerprint, **labels), at).alert


# the spec ---------------------------------------------------------------------------------
def test_an_alert_metric_is_one_of_the_metrics_discriminated_by_type() -> None:
    policy = Autoscale.model_validate(
        {"max": 10, "metrics": [{"type": "alert", "alertname": "HighLatency", "replicas": 4}]}
    )
    [m] = policy.metrics
    assert isinstance(m, AlertMetric)
    assert m.match == {}
    assert m.label() == "alert HighLatency"
    assert m.target == 4.0
    assert m.active_above == 0.0


def test_the_label_names_the_match_labels_sorted() -> None:
    m = metric(match={"service": "web", "env": "prod"})
    assert m.label() == "alert HighLatency{env=prod,service=web}"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"replicas": 0}, "greater than or equal to 1"),
        ({"replicas": 10_001}, "less than or equal to 10000"),
        ({"alertname": ""}, "at least 1 character"),
        ({"match": {"alertname": "Other"}}, "not in `match`"),
        ({"match": {"bad-label": "x"}}, "pattern"),
        ({"target": 3}, "Extra inputs are not permitted"),
        ({"expire_after": "0s"}, "greater than 0"),
        ({"expire_after": 8 * 86400}, "less than or equal to"),
    ],
)
def test_bad_alert_metrics_are_refused_with_the_reason(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        metric(**fields)


def test_an_alert_asking_for_more_than_max_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"asks for 12 replicas, above max 10"):
        Autoscale.model_validate(
            {"max": 10, "metrics": [{"type": "alert", "alertname": "A", "replicas": 12}]}
        )


def test_the_same_alert_twice_is_refused_but_other_labels_make_another_metric() -> None:
    one = {"type": "alert", "alertname": "A", "replicas": 2, "match": {"service": "web"}}
    with pytest.raises(ValidationError, match="each metric may appear once"):
        Autoscale.model_validate({"max": 10, "metrics": [one, {**one, "replicas": 3}]})
    other = {**one, "match": {"service": "api"}}
    assert len(Autoscale.model_validate({"max": 10, "metrics": [one, other]}).metrics) == 2


def test_an_alert_metric_can_wake_a_service_at_zero() -> None:
    policy = Autoscale.model_validate(
        {"min": 0, "max": 5, "metrics": [{"type": "alert", "alertname": "A", "replicas": 2}]}
    )
    assert policy.min == 0


def test_expire_after_reads_a_duration() -> None:
    assert metric(expire_after="6h").expire_after == 6 * 3600


# reading an event -------------------------------------------------------------------------
def test_a_firing_event_reads_the_alert() -> None:
    change = parse("firing", data(), T0)
    assert change.status == "firing"
    a = change.alert
    assert (a.fingerprint, a.name, a.labels["service"]) == ("abc", "HighLatency", "web")
    assert a.notified_at == T0
    assert a.starts_at == datetime(2026, 11, 27, 5, 55, tzinfo=UTC)
    assert a.ends_at is None  # Alertmanager's zero time: not known


def test_a_resolved_event_reads_its_end() -> None:
    body = {**data("resolved"), "endsAt": "2026-11-27T06:01:00Z"}
    change = parse("resolved", body, T0)
    assert change.status == "resolved"
    assert change.alert.ends_at == datetime(2026, 11, 27, 6, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        ("pending", data(), "unknown alert status 'pending'"),
        ("firing", ["not", "an", "alert"], "not an alert object but list"),
        ("firing", None, "not an alert object but NoneType"),
        ("firing", data("resolved"), "says 'resolved' on the 'firing' subject"),
        ("firing", {**data(), "fingerprint": ""}, "fingerprint"),
        ("firing", {k: v for k, v in data().items() if k != "fingerprint"}, "fingerprint"),
        ("firing", {**data(), "labels": {"service": "web"}}, "no alertname label"),
        ("firing", {**data(), "labels": {"alertname": 3}}, "labels"),
        ("firing", {**data(), "startsAt": "yesterday"}, "startsAt"),
        ("firing", {**data(), "endsAt": "2026-11-27T06:01:00"}, "without a time zone"),
        ("firing", {**data(), "status": "broken"}, "status"),
    ],
)
def test_bad_alert_events_are_refused_with_the_reason(kind: str, body: Any, message: str) -> None:
    with pytest.raises(AlertError, match=message):
        parse(kind, body, T0)


# the firing set ---------------------------------------------------------------------------
def test_firing_adds_and_resolved_removes_by_fingerprint() -> None:
    firing = Firing()
    assert firing.apply(parse("firing", data(fingerprint="a"), T0))
    assert firing.apply(parse("firing", data(fingerprint="b"), T0))
    assert len(firing) == 2
    later = T0 + timedelta(minutes=1)
    assert firing.apply(parse("resolved", data("resolved", fingerprint="a"), later))
    assert [a.fingerprint for a in firing.matching(metric(), later)] == ["b"]
    # resolving an alert never seen is harmless
    assert firing.apply(parse("resolved", data("resolved", fingerprint="zzz"), later))
    assert len(firing) == 1


def test_an_older_notification_changes_nothing() -> None:
    firing = Firing()
    firing.apply(parse("firing", data(), T0 + timedelta(minutes=5)))
    # a late resolved sent before the firing now known (a replay out of order)
    assert not firing.apply(parse("resolved", data("resolved"), T0))
    assert len(firing) == 1


def test_a_repeated_firing_notification_refreshes_the_alert() -> None:
    firing = Firing()
    firing.apply(parse("firing", data(), T0))
    later = T0 + timedelta(hours=4)
    firing.apply(parse("firing", data(), later))
    [a] = firing.matching(metric(), later)
    assert a.notified_at == later


def test_an_alert_whose_end_has_passed_no_longer_counts_and_is_pruned() -> None:
    firing = Firing()
    ends = T0 + timedelta(minutes=5)
    firing.apply(parse("firing", {**data(), "endsAt": ends.isoformat()}, T0))
    assert len(firing.matching(metric(), ends - timedelta(seconds=1))) == 1
    assert firing.matching(metric(), ends) == ()
    assert firing.prune(ends - timedelta(seconds=1)) == []
    [gone] = firing.prune(ends)
    assert gone.fingerprint == "abc"
    assert len(firing) == 0


def test_expire_after_drops_an_alert_not_notified_again() -> None:
    firing = Firing()
    firing.apply(parse("firing", data(), T0))
    m = metric(expire_after=3600)
    assert len(firing.matching(m, T0 + timedelta(seconds=3600))) == 1
    assert firing.matching(m, T0 + timedelta(seconds=3601)) == ()
    # without expire_after, it fires until resolved
    assert len(firing.matching(metric(), T0 + timedelta(days=3))) == 1


def test_matching_needs_the_name_and_every_match_label() -> None:
    firing = Firing()
    firing.apply(parse("firing", data(fingerprint="web"), T0))
    firing.apply(parse("firing", data(fingerprint="api", service="api"), T0))
    other = {**data(fingerprint="disk"), "labels": {"alertname": "DiskFull", "service": "web"}}
    firing.apply(parse("firing", other, T0))
    assert [a.fingerprint for a in firing.matching(metric(), T0)] == ["web"]
    both = metric(match={})
    assert [a.fingerprint for a in firing.matching(both, T0)] == ["api", "web"]
    prod = metric(match={"service": "web", "env": "prod"})
    assert firing.matching(prod, T0) == ()
    assert alerts.matches(prod, {"alertname": "HighLatency", "service": "web", "env": "prod"})
    assert not alerts.matches(prod, {"alertname": "highlatency", "service": "web", "env": "prod"})


def test_the_longest_firing_comes_first() -> None:
    early = {**data(fingerprint="z"), "startsAt": "2026-11-27T05:00:00Z"}
    firing = Firing()
    firing.apply(parse("firing", data(fingerprint="a"), T0))
    firing.apply(parse("firing", early, T0))
    assert [a.fingerprint for a in firing.matching(metric(), T0)] == ["z", "a"]


# the proposal -----------------------------------------------------------------------------
def test_a_firing_alert_proposes_its_replicas_and_names_itself() -> None:
    p = propose(metric(), [alert("abc")])
    assert p.replicas == 4
    assert p.value == 1.0
    assert p.metric == "alert HighLatency{service=web}"
    assert p.formula == "alert HighLatency firing (fingerprint abc): at least 4"


def test_several_firing_alerts_are_named_up_to_a_few() -> None:
    found = [alert(f"f{i}", service="web", instance=f"i{i}") for i in range(5)]
    p = propose(metric(), found)
    assert p.replicas == 4
    assert p.value == 5.0
    assert p.formula == (
        "alert HighLatency firing (fingerprints f0, f1, f2 and 2 more): at least 4"
    )


def test_no_matching_alert_proposes_zero_never_a_missing_reading() -> None:
    p = propose(metric(), [alert("api", service="api")])
    assert p.replicas == 0
    assert p.value == 0.0
    assert p.note == "alert HighLatency not firing"


# in the policy ----------------------------------------------------------------------------
PUSH = {"type": "metric", "name": "load", "target": 100}
ALERT = {"type": "alert", "alertname": "HighLatency", "match": {"service": "web"}, "replicas": 4}


def policy(*metrics: dict[str, Any], **fields: Any) -> Autoscale:
    base: dict[str, Any] = {"min": 1, "max": 10, "metrics": list(metrics)}
    base.update(fields)
    return Autoscale.model_validate(base)


def load(current: int, value: float) -> Reading:
    return Reading(per_replica={f"r{i}": value for i in range(current)})


def state(current: int, *readings: Reading) -> Inputs:
    names = tuple(f"r{i}" for i in range(current))
    return Inputs(current=current, replicas=names, ready=current, readings=readings)


def firing(*found: FiringAlert) -> Reading:
    return Reading(alerts=tuple(found))


def test_a_firing_alert_scales_up_to_its_floor_and_the_decision_says_which() -> None:
    p = policy(PUSH, ALERT)
    decision, _ = evaluate(p, state(2, load(2, 100), firing(alert("abc"))), History(), 1000.0)
    assert (decision.current, decision.desired, decision.code) == (2, 4, "scale_up")
    assert decision.recommended == 4
    assert "alert HighLatency firing (fingerprint abc): at least 4" in decision.reason
    assert [pr.metric for pr in decision.proposals] == [
        "metric load",
        "alert HighLatency{service=web}",
    ]


def test_the_largest_proposal_wins() -> None:
    p = policy(PUSH, ALERT)
    decision, _ = evaluate(p, state(2, load(2, 400), firing(alert())), History(), 1000.0)
    assert decision.recommended == 8  # ceil(400 / 100 x 2) beats the alert's 4
    assert decision.desired == 6  # at most +4 pods per 15 s
    assert decision.reason.startswith("metric load:")


def test_the_scale_up_rate_policy_still_applies() -> None:
    slow = {"scale_up": {"policies": [{"type": "pods", "value": 1, "period": 60}]}}
    p = policy(ALERT, behavior=slow)
    decision, _ = evaluate(p, state(1, firing(alert())), History(), 1000.0)
    assert (decision.recommended, decision.desired) == (4, 2)
    assert decision.limited_by


def test_a_resolved_alert_scales_down_only_through_the_window() -> None:
    p = policy(PUSH, ALERT)
    history = History()
    up, history = evaluate(p, state(2, load(2, 100), firing(alert())), history, 1000.0)
    assert up.desired == 4
    # resolved: the alert proposes 0, the load 4 x 50 / 100 = 2; the 300 s window holds 4
    held, history = evaluate(p, state(4, load(4, 50), firing()), history, 1010.0)
    assert (held.recommended, held.desired, held.code) == (2, 4, "stabilized")
    assert held.proposals[1].note == "alert HighLatency not firing"
    assert held.recheck_after is not None
    down, _ = evaluate(p, state(4, load(4, 50), firing()), history, 1000.0 + 301)
    assert (down.desired, down.code) == (2, "scale_down")


def test_an_alert_alone_not_firing_goes_down_to_min_and_never_reads_as_missing() -> None:
    p = policy(ALERT, min=2, behavior={"scale_down": {"stabilization_window": 0}})
    seeded = History(seeded=True)
    decision, _ = evaluate(p, state(4, firing()), seeded, 1000.0)
    assert decision.code != "missing_metrics"
    assert (decision.recommended, decision.desired) == (0, 2)


def test_a_quiet_alert_does_not_hold_other_metrics_scale_down() -> None:
    p = policy(PUSH, ALERT, behavior={"scale_down": {"stabilization_window": 0}})
    seeded = History(seeded=True)
    decision, _ = evaluate(p, state(6, load(6, 20), firing()), seeded, 1000.0)
    assert (decision.desired, decision.code) == (2, "scale_down")


def test_a_firing_alert_wakes_a_service_at_zero_and_keeps_it_from_cooling_down() -> None:
    p = policy(ALERT, min=0, cooldown=60)
    zeroed = History(seeded=True, zeroed_at=500.0)
    woken, history = evaluate(p, state(0, firing(alert())), zeroed, 1000.0)
    assert (woken.desired, woken.code) == (1, "activated")
    assert "alert HighLatency{service=web}" in woken.reason
    # 10 minutes later, still firing: no cooldown
    later, _ = evaluate(p, state(4, firing(alert())), history, 1600.0)
    assert later.desired == 4
    assert later.code != "cooldown"
    quiet, _ = evaluate(p, state(0, firing()), zeroed, 1000.0)
    assert (quiet.desired, quiet.code) == (0, "idle")


def test_two_speed_smoothing_passes_the_alert_through_as_it_is() -> None:
    p = policy(PUSH, ALERT, behavior={"smoothing": {"mode": "two_speed"}})
    decision, _ = evaluate(p, state(2, load(2, 100), firing(alert())), History(), 1000.0)
    alert_proposal = decision.proposals[1]
    assert alert_proposal.replicas == 4
    assert alert_proposal.path == ""
    assert decision.desired == 4


def test_an_alert_not_notified_for_a_week_is_forgotten() -> None:
    firing = Firing()
    firing.apply(parse("firing", data(fingerprint="old"), T0))
    firing.apply(parse("firing", data(fingerprint="new"), T0 + timedelta(days=6)))
    assert firing.prune(T0 + timedelta(days=7)) == []
    [gone] = firing.prune(T0 + timedelta(days=7, seconds=1))
    assert gone.fingerprint == "old"
    assert [a.fingerprint for a in firing.matching(metric(), T0 + timedelta(days=8))] == ["new"]


def test_alerts_not_known_yet_are_a_missing_metric_that_holds_a_scale_down() -> None:
    unknown = Reading(error="the stored alert events are still being read")
    p = propose(metric(), [alert()], unknown.error)
    assert p.replicas is None
    assert p.note == "the stored alert events are still being read"
    both = policy(PUSH, ALERT, behavior={"scale_down": {"stabilization_window": 0}})
    seeded = History(seeded=True)
    held, _ = evaluate(both, state(4, load(4, 20), unknown), seeded, 1000.0)
    assert (held.desired, held.code) == (4, "missing_metrics")
    # a scale-up on the other metric still goes ahead
    up, _ = evaluate(both, state(2, load(2, 300), unknown), seeded, 1000.0)
    assert (up.desired, up.code) == (6, "scale_up")


def test_a_trigger_that_names_a_change_wins_over_a_routine_poll() -> None:
    """A poll, then a resolved alert, before the evaluation runs: the decision names the
    alert. The first change named is kept; a poll or timer never replaces one."""
    assert named_trigger(None, "poll") == "poll"
    assert named_trigger("poll", "alert HighLatency resolved") == "alert HighLatency resolved"
    assert named_trigger("timer", "sample rps") == "sample rps"
    assert named_trigger("alert HighLatency resolved", "poll") == "alert HighLatency resolved"
    assert named_trigger("alert HighLatency firing", "sample rps") == "alert HighLatency firing"
    assert named_trigger("poll", "timer") == "poll"


def test_the_example_spec_reads() -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / "autoscale-alert.yaml"
    raw = yaml.safe_load(path.read_text())
    autoscale = ServiceSpec.model_validate(raw).autoscale
    assert autoscale is not None
    [_, m] = autoscale.metrics
    assert isinstance(m, AlertMetric)
    assert (m.alertname, m.match, m.replicas, m.expire_after) == (
        "HighLatency",
        {"service": "web"},
        6,
        5 * 3600,
    )
