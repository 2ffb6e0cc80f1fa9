"""The `autoscale:` part of a service spec: bounds, metrics, HPA-style behaviour, scale to zero.

The defaults are those of the Kubernetes HorizontalPodAutoscaler (tolerance 0.1; scale up by
at most max(100%, 4 replicas) per 15 s; scale down through a 300 s stabilisation window, by
up to 100% per 15 s), and every one of them can be set per service. Changing the policy never
rolls replicas: it is not part of the runtime template.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from corral.schemas.quantities import parse_duration

MAX_REPLICAS = 10_000
Duration = Annotated[float, BeforeValidator(parse_duration)]
MetricName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")]
JsName = Annotated[
    str,
    Field(
        pattern=r"^[^\s.*>/\\]{1,255}$",
        description="a JetStream stream or consumer name (no spaces, '.', '*', '>')",
    ),
]
_TOKEN = re.compile(r"^[^\s.*>]+$")


def _finite_positive(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a finite number above 0")
    return value


Target = Annotated[float, Field(gt=0, description="the value to keep, per replica")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Metric(_Strict):
    target: Target
    active_above: float = Field(
        default=0.0,
        ge=0,
        description="a value above this counts as work to do, which keeps a `min: 0` service "
        "from cooling down to zero (KEDA's activation threshold)",
    )

    @field_validator("target")
    @classmethod
    def _target(cls, value: float) -> float:
        return _finite_positive(value)


class PushMetric(_Metric):
    """Samples `{name, value, replica}` published on `<prefix>.metrics.<service>` by the
    replicas themselves, or by the agents (`cpu` in cores, `memory` in bytes). The value is
    averaged over the replicas: the target is per replica, as a Kubernetes Pods metric."""

    type: Literal["metric"]
    name: MetricName
    max_age: Duration = Field(
        default=30.0, gt=0, le=3600, description="a sample older than this no longer counts"
    )

    def label(self) -> str:
        return f"metric {self.name}"


class PrometheusMetric(_Metric):
    """A PromQL query through a Prometheus server's HTTP API, polled."""

    type: Literal["prometheus"]
    query: str = Field(min_length=1, max_length=4096)
    url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="the server; by default the CORRAL_PROMETHEUS_URL setting",
    )
    per_replica: bool = Field(
        default=True,
        description="the query returns a total to spread over the replicas (the target is "
        "per replica, as a Kubernetes AverageValue); false: the value itself is held to the "
        "target (a Kubernetes Value, such as a latency)",
    )

    def label(self) -> str:
        return f"prometheus {self.query}"


class QueueMetric(_Metric):
    """Messages waiting for a JetStream consumer (num_pending + num_ack_pending, from consumer
    info), per replica."""

    type: Literal["queue"]
    stream: JsName
    consumer: JsName

    def label(self) -> str:
        return f"queue {self.stream}/{self.consumer}"


class AlertMetric(_Strict):
    """An Alertmanager alert, as the gateway publishes its webhook (one event per alert on
    `<prefix>.evt.ext.alertmanager.<firing|resolved>`): while an alert named `alertname`
    whose labels include every `match` label is firing, propose at least `replicas`. A
    resolved notification, or an `endsAt` that has passed, ends it; with `expire_after`, so
    does that long without a firing notification (set it above Alertmanager's
    `repeat_interval`, for receivers that do not send resolved alerts)."""

    type: Literal["alert"]
    alertname: str = Field(min_length=1, max_length=255)
    match: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")], str] = Field(
        default_factory=dict,
        max_length=20,
        description="labels the alert must carry, with these exact values (e.g. service: web)",
    )
    replicas: int = Field(ge=1, le=MAX_REPLICAS, description="at least this many while firing")
    expire_after: Duration | None = Field(
        default=None,
        gt=0,
        le=7 * 86400,
        description="a firing alert not notified again for this long no longer counts",
    )
    active_above: ClassVar[float] = 0.0
    """a firing alert is work to do: it keeps a `min: 0` service up, and wakes it"""

    @field_validator("match")
    @classmethod
    def _match(cls, value: dict[str, str]) -> dict[str, str]:
        if "alertname" in value:
            raise ValueError("put the alert's name in `alertname`, not in `match`")
        return value

    @property
    def target(self) -> float:
        return float(self.replicas)

    def label(self) -> str:
        labels = ",".join(f"{k}={v}" for k, v in sorted(self.match.items()))
        return f"alert {self.alertname}" + (f"{{{labels}}}" if labels else "")


Metric = Annotated[
    PushMetric | PrometheusMetric | QueueMetric | AlertMetric, Field(discriminator="type")
]


class ScalingPolicy(_Strict):
    """At most `value` replicas (`pods`) or `value` percent (`percent`) of change per
    `period`."""

    type: Literal["pods", "percent"]
    value: int = Field(gt=0, le=100 * MAX_REPLICAS)
    period: Duration = Field(gt=0, le=1800)


class _Rules(_Strict):
    stabilization_window: Duration = Field(ge=0, le=3600)
    select_policy: Literal["max", "min", "disabled"] = Field(
        default="max",
        description="max: the policy allowing the most change wins; min: the least; "
        "disabled: never scale in this direction",
    )
    policies: list[ScalingPolicy] = Field(min_length=1, max_length=10)


class ScaleUpRules(_Rules):
    stabilization_window: Duration = Field(default=0.0, ge=0, le=3600)
    policies: list[ScalingPolicy] = Field(
        default_factory=lambda: [
            ScalingPolicy(type="percent", value=100, period=15),
            ScalingPolicy(type="pods", value=4, period=15),
        ],
        min_length=1,
        max_length=10,
    )


class ScaleDownRules(_Rules):
    stabilization_window: Duration = Field(default=300.0, ge=0, le=3600)
    policies: list[ScalingPolicy] = Field(
        default_factory=lambda: [ScalingPolicy(type="percent", value=100, period=15)],
        min_length=1,
        max_length=10,
    )


class Smoothing(_Strict):
    """What each metric feeds the rules. `off`: every reading as it comes, as the HPA does at
    each sync. `two_speed`: each metric's demand (the replicas it asks for, before rounding)
    is averaged exponentially over `window`; a reading more than `burst` noise deviations
    above the average is a burst, fed at once (less `discount` deviations); otherwise the rules
    get the average plus a headroom of `burst` deviations, at most `headroom` replicas. The
    scale-down window records only what the average asks for; a burst's recommendation is held
    `hold` seconds (at most the scale-down window) after its last burst reading, then stays
    only as far as the average confirms it. The noise is measured from the readings
    themselves: the median difference of consecutive new readings (at least 1 s apart) over
    the last minute."""

    mode: Literal["off", "two_speed"] = Field(
        default="off",
        description="off: every reading as it comes (the HPA's behaviour); two_speed: an "
        "average, and bursts at once",
    )
    window: Duration = Field(
        default=150.0, gt=0, le=3600, description="two_speed: the average's time constant"
    )
    burst: float = Field(
        default=3.0,
        gt=0,
        le=20,
        description="two_speed: a reading this many noise deviations above the average is a "
        "burst; also the headroom, in deviations",
    )
    discount: float = Field(
        default=1.0,
        ge=0,
        le=20,
        description="two_speed: noise deviations taken off a burst's reading before it is fed",
    )
    headroom: float = Field(
        default=1.0,
        ge=0,
        le=MAX_REPLICAS,
        description="two_speed: the most headroom over the average, in replicas",
    )
    hold: Duration = Field(
        default=120.0,
        ge=0,
        le=3600,
        description="two_speed: how long a burst's recommendation holds off a scale-down "
        "(at most the scale-down window)",
    )


class Behavior(_Strict):
    tolerance: float = Field(
        default=0.1, ge=0, lt=1, description="no change while |1 - value/target| is within it"
    )
    scale_up: ScaleUpRules = Field(default_factory=ScaleUpRules)
    scale_down: ScaleDownRules = Field(default_factory=ScaleDownRules)
    smoothing: Smoothing = Field(default_factory=Smoothing)


def _subject_ok(subject: str) -> bool:
    tokens = subject.split(".")
    for index, token in enumerate(tokens):
        if token == ">" and index == len(tokens) - 1:
            continue
        if token != "*" and not _TOKEN.match(token):
            return False
    return True


class Activation(_Strict):
    """What wakes a service that has scaled to zero: a message on a NATS `subject`, or a
    backlog over `threshold` on a JetStream `stream`/`consumer`."""

    subject: str | None = Field(default=None, min_length=1, max_length=255)
    stream: JsName | None = None
    consumer: JsName | None = None
    threshold: int = Field(
        default=0, ge=0, description="a backlog above this activates (stream/consumer only)"
    )

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        if value is not None and not _subject_ok(value):
            raise ValueError(
                f"{value!r} is not a NATS subject: dot-separated tokens without spaces; "
                "'*' for one token, '>' only at the end"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Activation:
        queue = self.stream is not None or self.consumer is not None
        if self.subject is not None and queue:
            raise ValueError("activation takes a `subject`, or a `stream` and `consumer`, not both")
        if self.subject is None and not queue:
            raise ValueError("activation needs a `subject`, or a `stream` and `consumer`")
        if queue and (self.stream is None or self.consumer is None):
            raise ValueError("a stream activation needs both `stream` and `consumer`")
        if self.subject is not None and self.threshold != 0:
            raise ValueError("`threshold` applies to a stream/consumer activation only")
        return self

    def label(self) -> str:
        if self.subject is not None:
            return f"subject {self.subject}"
        return f"backlog on {self.stream}/{self.consumer} over {self.threshold}"


class Autoscale(_Strict):
    """HPA-style autoscaling between `min` and `max` replicas; `min: 0` scales to zero after
    `cooldown` with nothing to do, and back on `activation`."""

    min: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    max: int = Field(ge=1, le=MAX_REPLICAS)
    metrics: list[Metric] = Field(default_factory=list, max_length=10)
    behavior: Behavior = Field(default_factory=Behavior)
    activation: Activation | None = None
    cooldown: Duration = Field(
        default=300.0, ge=0, le=86400, description="with min 0: idle this long, scale to zero"
    )
    poll_interval: Duration | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="how often pulled sources (prometheus, queue, a stream activation) are "
        "read; by default the CORRAL_AUTOSCALE_POLL_INTERVAL setting (5 s)",
    )
    busy_metric: MetricName = Field(
        default="inflight",
        description="the push metric that says how busy a replica is; scale-in removes the "
        "least busy first (cpu when no replica reports it)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Autoscale:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        if not self.metrics and self.activation is None:
            raise ValueError("autoscale needs at least one metric, or (with min 0) an activation")
        if self.activation is not None and self.min > 0:
            raise ValueError("an activation wakes a service from zero, so it needs `min: 0`")
        if self.min == 0 and self.activation is None:
            pulled = [m for m in self.metrics if not isinstance(m, PushMetric)]
            if not pulled:
                raise ValueError(
                    "with `min: 0`, nothing would wake the service once at zero: add an "
                    "`activation`, or a queue, prometheus or alert metric"
                )
        labels = [m.label() for m in self.metrics]
        if len(set(labels)) != len(labels):
            raise ValueError("each metric may appear once")
        for m in self.metrics:
            if isinstance(m, AlertMetric) and m.replicas > self.max:
                raise ValueError(
                    f"{m.label()} asks for {m.replicas} replicas, above max {self.max}"
                )
        return self
