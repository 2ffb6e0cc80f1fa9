"""The `autoscale:` part of a spec: defaults as the HPA's, and clear errors for what cannot
work. Changing it never rolls replicas."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from corral.schemas.autoscale import Autoscale, PrometheusMetric, PushMetric, QueueMetric
from corral.schemas.spec import ServiceSpec
from corral.schemas.state import Template

METRIC = {"type": "metric", "name": "cpu", "target": 0.5}


def spec(**autoscale: Any) -> ServiceSpec:
    return ServiceSpec.model_validate(
        {"name": "web", "command": ["serve"], "autoscale": {"max": 5, **autoscale}}
    )


def error(**autoscale: Any) -> str:
    with pytest.raises(ValidationError) as info:
        spec(**autoscale)
    return str(info.value)


def test_defaults_are_the_hpa_defaults() -> None:
    policy = spec(metrics=[METRIC]).autoscale
    assert policy is not None
    assert policy.min == 1
    assert policy.cooldown == 300
    assert policy.poll_interval is None
    assert policy.busy_metric == "inflight"
    behavior = policy.behavior
    assert behavior.tolerance == 0.1
    assert behavior.scale_up.stabilization_window == 0
    assert [(p.type, p.value, p.period) for p in behavior.scale_up.policies] == [
        ("percent", 100, 15),
        ("pods", 4, 15),
    ]
    assert behavior.scale_up.select_policy == "max"
    assert behavior.scale_down.stabilization_window == 300
    assert [(p.type, p.value, p.period) for p in behavior.scale_down.policies] == [
        ("percent", 100, 15)
    ]


def test_a_partial_behavior_keeps_the_other_defaults_of_its_direction() -> None:
    policy = spec(metrics=[METRIC], behavior={"scale_down": {"stabilization_window": "10s"}})
    assert policy.autoscale is not None
    down = policy.autoscale.behavior.scale_down
    assert down.stabilization_window == 10
    assert [(p.type, p.value) for p in down.policies] == [("percent", 100)]
    assert len(policy.autoscale.behavior.scale_up.policies) == 2


def test_each_metric_type_reads_its_own_fields() -> None:
    policy = spec(
        metrics=[
            METRIC,
            {"type": "prometheus", "query": "sum(rate(http_requests_total[1m]))", "target": 50},
            {"type": "queue", "stream": "JOBS", "consumer": "workers", "target": 10},
        ]
    ).autoscale
    assert policy is not None
    kinds = [type(m) for m in policy.metrics]
    assert kinds == [PushMetric, PrometheusMetric, QueueMetric]
    assert [m.label() for m in policy.metrics] == [
        "metric cpu",
        "prometheus sum(rate(http_requests_total[1m]))",
        "queue JOBS/workers",
    ]


@pytest.mark.parametrize(
    ("autoscale", "message"),
    [
        ({"min": 6, "metrics": [METRIC]}, "min (6) must not exceed max (5)"),
        ({"metrics": [{**METRIC, "target": 0}]}, "greater than 0"),
        ({"metrics": [{**METRIC, "target": -1}]}, "greater than 0"),
        ({"metrics": [{**METRIC, "target": float("inf")}]}, "finite number above 0"),
        ({"metrics": [{"type": "cpu", "target": 1}]}, "'metric', 'prometheus', 'queue'"),
        ({"metrics": [{"type": "metric", "target": 1}]}, "metrics.0.metric.name"),
        ({"metrics": [{"type": "prometheus", "target": 1}]}, "query"),
        ({"metrics": [{"type": "queue", "stream": "S", "target": 1}]}, "consumer"),
        ({"metrics": [{"type": "queue", "stream": "a.b", "consumer": "c", "target": 1}]}, "stream"),
        ({"metrics": [{**METRIC, "typo": 1}]}, "typo"),
        ({"metrics": [METRIC, METRIC]}, "each metric may appear once"),
        ({"metrics": []}, "at least one metric"),
        ({"metrics": [{**METRIC, "max_age": "soon"}]}, "cannot read duration"),
        (
            {"metrics": [{"type": "prometheus", "query": "up", "target": 1, "url": "ftp://x"}]},
            "url",
        ),
        ({"min": 0, "metrics": [METRIC]}, "nothing would wake the service"),
        (
            {"metrics": [METRIC], "activation": {"subject": "jobs.in"}},
            "an activation wakes a service from zero, so it needs `min: 0`",
        ),
        ({"min": 0, "activation": {}}, "activation needs a `subject`"),
        (
            {"min": 0, "activation": {"subject": "a", "stream": "S", "consumer": "c"}},
            "not both",
        ),
        ({"min": 0, "activation": {"stream": "S"}}, "needs both `stream` and `consumer`"),
        ({"min": 0, "activation": {"subject": "a b"}}, "is not a NATS subject"),
        ({"min": 0, "activation": {"subject": "a.>.b"}}, "is not a NATS subject"),
        ({"min": 0, "activation": {"subject": "a", "threshold": 3}}, "threshold"),
        ({"metrics": [METRIC], "behavior": {"tolerance": 1}}, "tolerance"),
        (
            {"metrics": [METRIC], "behavior": {"scale_up": {"policies": []}}},
            "at least 1 item",
        ),
        (
            {
                "metrics": [METRIC],
                "behavior": {
                    "scale_down": {"policies": [{"type": "pods", "value": 0, "period": 1}]}
                },
            },
            "greater than 0",
        ),
        (
            {
                "metrics": [METRIC],
                "behavior": {"scale_up": {"select_policy": "fastest"}},
            },
            "'max', 'min' or 'disabled'",
        ),
        ({"max": 0, "metrics": [METRIC]}, "greater than or equal to 1"),
    ],
)
def test_what_cannot_work_is_refused_with_a_reason(autoscale: dict[str, Any], message: str) -> None:
    assert message in error(**autoscale)


def test_scale_to_zero_with_an_activation_or_a_pulled_metric() -> None:
    assert spec(min=0, activation={"subject": "jobs.*"}).autoscale is not None
    assert spec(min=0, activation={"subject": "jobs.>"}).autoscale is not None
    stream = spec(min=0, activation={"stream": "JOBS", "consumer": "w", "threshold": 5})
    assert stream.autoscale is not None
    assert stream.autoscale.activation is not None
    assert stream.autoscale.activation.threshold == 5
    queue = spec(min=0, metrics=[{"type": "queue", "stream": "S", "consumer": "c", "target": 5}])
    assert queue.autoscale is not None


def test_the_policy_is_not_part_of_the_runtime_template() -> None:
    before = spec(metrics=[METRIC])
    after = spec(max=9, metrics=[METRIC], cooldown="1m")
    assert Template.from_spec(before) == Template.from_spec(after)
    assert "autoscale" not in before.runtime_fields()


def test_a_spec_without_autoscale_has_none() -> None:
    assert ServiceSpec.model_validate({"name": "web", "command": ["x"]}).autoscale is None


def test_durations_read_as_elsewhere() -> None:
    policy = Autoscale.model_validate(
        {"max": 3, "metrics": [METRIC], "cooldown": "1m30s", "poll_interval": "500ms"}
    )
    assert (policy.cooldown, policy.poll_interval) == (90, 0.5)


@pytest.mark.parametrize(
    "autoscale",
    [
        {"metrics": [METRIC]},
        {"min": 0, "activation": {"subject": "jobs.in"}, "cooldown": "2s"},
        {"min": 0, "activation": {"stream": "S", "consumer": "c", "threshold": 3}},
        {
            "metrics": [
                {"type": "prometheus", "query": "up", "target": 2, "url": "http://127.0.0.1:9090"},
                {"type": "queue", "stream": "S", "consumer": "c", "target": 10},
            ],
            "behavior": {"scale_up": {"select_policy": "min"}},
        },
    ],
)
def test_a_policy_survives_the_round_trip_through_kv(autoscale: dict[str, Any]) -> None:
    """What the api worker writes, every reader must read back (a stored spec carries every
    field, defaults included)."""
    original = spec(**autoscale)
    again = ServiceSpec.model_validate_json(original.model_dump_json())
    assert again == original
