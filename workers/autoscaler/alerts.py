"""Pure: Alertmanager alerts as an autoscale metric (`type: alert`).

The gateway publishes one CloudEvent per alert of an Alertmanager webhook, on
`<prefix>.evt.ext.alertmanager.<firing|resolved>`, with the alert as its data (status,
labels, annotations, startsAt, endsAt, fingerprint, and the webhook's receiver and
groupKey). `Firing` keeps the alerts firing now, by fingerprint: a firing event adds (or
refreshes) one, a resolved event removes it. An alert also stops counting once its `endsAt`
has passed, or, for a metric with `expire_after`, that long after its last firing
notification.

An alert metric matches an alert whose `alertname` label is the metric's and whose labels
carry every `match` label with the same value. While at least one matching alert fires, the
metric proposes its `replicas` (a floor: the largest proposal of all the metrics wins, as
with the HPA's several metrics); otherwise it proposes 0, so that it never holds a
scale-down (the others decide, through the scale-down window as usual). Until the alert events
stored before the autoscaler started are read, it proposes nothing: a missing metric, which
holds a scale-down (as the HPA does) but not a scale-up on the other metrics.

Times are wall-clock datetimes (alerts carry RFC 3339 times), passed in; nothing here reads a
clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.schemas.autoscale import AlertMetric
from corral.schemas.events import AutoscaleProposal

SOURCE = "alertmanager"
"""the gateway's source token for Alertmanager: `<prefix>.evt.ext.alertmanager.<status>`"""
EXT = "ext"
STATUSES = ("firing", "resolved")
MAX_SHOWN = 3
"""fingerprints named in a proposal's formula"""
FORGET_AFTER = 7 * 86400.0
"""a firing alert not notified again for this long is forgotten: the events stream keeps a
week, so an autoscaler started now would not know it either"""
_UNSET_YEAR = 1
"""Alertmanager sends `0001-01-01T00:00:00Z` for an endsAt it does not know"""


class AlertError(ValueError):
    """An event that is not an Alertmanager alert the autoscaler can use."""


@dataclass(frozen=True)
class FiringAlert:
    fingerprint: str
    labels: Mapping[str, str]
    notified_at: datetime
    """when the last firing notification for it was sent (the event's time)"""
    starts_at: datetime | None = None
    ends_at: datetime | None = None

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "")

    def ended(self, now: datetime, expire_after: float | None = None) -> bool:
        if self.ends_at is not None and self.ends_at <= now:
            return True
        if expire_after is not None:
            return now - self.notified_at > timedelta(seconds=expire_after)
        return False


@dataclass(frozen=True)
class AlertChange:
    status: str
    """firing or resolved"""
    alert: FiringAlert


class _AlertData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: str = Field(pattern=r"^(firing|resolved)$")
    fingerprint: str = Field(min_length=1, max_length=256)
    labels: dict[str, str] = Field(default_factory=dict)
    startsAt: datetime | None = None  # Alertmanager's field names
    endsAt: datetime | None = None

    @field_validator("startsAt", "endsAt", mode="after")
    @classmethod
    def _unset(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.year <= _UNSET_YEAR:
            return None
        if value is not None and value.tzinfo is None:
            raise ValueError("a time without a time zone")
        return value


def parse(kind: str, data: Any, sent_at: datetime) -> AlertChange:
    """One alert event (`kind` the subject's last token, `data` the event's data, `sent_at`
    its time) -> the change; AlertError with the reason when it is not usable."""
    if kind not in STATUSES:
        raise AlertError(f"unknown alert status {kind!r} (firing or resolved)")
    if not isinstance(data, dict):
        raise AlertError(f"the event's data is not an alert object but {type(data).__name__}")
    try:
        parsed = _AlertData.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "data"
        raise AlertError(f"not an Alertmanager alert: {where}: {first['msg']}") from exc
    if parsed.status != kind:
        raise AlertError(f"the alert says {parsed.status!r} on the {kind!r} subject")
    if not parsed.labels.get("alertname"):
        raise AlertError("the alert has no alertname label")
    alert = FiringAlert(
        fingerprint=parsed.fingerprint,
        labels=dict(parsed.labels),
        notified_at=sent_at,
        starts_at=parsed.startsAt,
        ends_at=parsed.endsAt,
    )
    return AlertChange(kind, alert)


class Firing:
    """The alerts firing now, by fingerprint."""

    def __init__(self) -> None:
        self._alerts: dict[str, FiringAlert] = {}

    def __len__(self) -> int:
        return len(self._alerts)

    def apply(self, change: AlertChange) -> bool:
        """Fold one change in; False when it is older than what is known of that alert (a
        replayed or late notification changes nothing)."""
        alert = change.alert
        known = self._alerts.get(alert.fingerprint)
        if known is not None and alert.notified_at < known.notified_at:
            return False
        if change.status == "resolved":
            self._alerts.pop(alert.fingerprint, None)
        else:
            self._alerts[alert.fingerprint] = alert
        return True

    def prune(self, now: datetime, forget_after: float = FORGET_AFTER) -> list[FiringAlert]:
        """Drop the alerts whose endsAt has passed, or not notified for `forget_after`
        seconds; return them."""
        gone = [a for a in self._alerts.values() if a.ended(now, forget_after)]
        for alert in gone:
            del self._alerts[alert.fingerprint]
        return gone

    def matching(self, metric: AlertMetric, now: datetime) -> tuple[FiringAlert, ...]:
        """The alerts that count for `metric` now, the longest firing first."""
        return select(metric, self._alerts.values(), now)


def matches(metric: AlertMetric, labels: Mapping[str, str]) -> bool:
    if labels.get("alertname") != metric.alertname:
        return False
    return all(labels.get(name) == value for name, value in metric.match.items())


def select(
    metric: AlertMetric, alerts: Iterable[FiringAlert], now: datetime
) -> tuple[FiringAlert, ...]:
    """Of `alerts`, those that match `metric` and still count at `now`, the longest firing
    first (then by fingerprint)."""
    found = [
        a for a in alerts if matches(metric, a.labels) and not a.ended(now, metric.expire_after)
    ]
    found.sort(key=lambda a: (a.starts_at or a.notified_at, a.fingerprint))
    return tuple(found)


def propose(
    metric: AlertMetric, firing: Iterable[FiringAlert], error: str = ""
) -> AutoscaleProposal:
    """What an alert metric asks for: its `replicas` while a matching alert fires (of
    `firing`, the alerts that count now: see `select`), else 0. The value is the number of
    matching alerts. With an `error` (the alerts are not known yet), no proposal: a missing
    metric, which holds any scale-down."""
    label = metric.label()
    if error:
        return AutoscaleProposal(metric=label, target=metric.target, note=error)
    found = [a for a in firing if matches(metric, a.labels)]
    if not found:
        return AutoscaleProposal(
            metric=label,
            value=0.0,
            target=metric.target,
            replicas=0,
            note=f"alert {metric.alertname} not firing",
        )
    shown = ", ".join(a.fingerprint for a in found[:MAX_SHOWN])
    more = len(found) - MAX_SHOWN
    if more > 0:
        shown += f" and {more} more"
    plural = "s" if len(found) > 1 else ""
    formula = (
        f"alert {metric.alertname} firing (fingerprint{plural} {shown}): at least {metric.replicas}"
    )
    return AutoscaleProposal(
        metric=label,
        value=float(len(found)),
        target=metric.target,
        replicas=metric.replicas,
        formula=formula,
    )
