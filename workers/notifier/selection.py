"""Pure: which events become chat messages, and what they say."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = {
    "rollout_complete": ("service", "rollout_complete"),
    "rollout_failed": ("service", "rollout_failed"),
    "degraded": ("service", "degraded"),
    "recovered": ("service", "recovered"),
    "run_failed": ("run", "failed"),
    "run_succeeded": ("run", "succeeded"),
    "approval_needed": ("run", "approval_needed"),
    "node_lost": ("node", "lost"),
    "rule_notify": ("rule", "notify"),
}
"""kind -> (resource, what) of the events `<prefix>.evt.<resource>.*.<what>`"""
DEFAULT_KINDS = (
    "rollout_complete",
    "rollout_failed",
    "degraded",
    "run_failed",
    "approval_needed",
    "rule_notify",
)


def parse_kinds(text: str | None) -> tuple[str, ...]:
    if not text or not text.strip():
        return DEFAULT_KINDS
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    return kinds


def subjects(prefix: str, kinds: tuple[str, ...]) -> list[str]:
    return [f"{prefix}.evt.{KINDS[k][0]}.*.{KINDS[k][1]}" for k in kinds]


@dataclass(frozen=True)
class Notice:
    kind: str
    key: str
    """what repeats of the same news share (the rate limiter folds them)"""
    text: str
    channel: str | None = None


def notice(subject: str, data: Any, kinds: tuple[str, ...]) -> Notice | None:
    """`subject` without `<prefix>.evt.`, e.g. `service.web.rollout_failed`."""
    parts = subject.split(".")
    if len(parts) != 3:
        return None
    resource, name, what = parts
    kind = next((k for k in kinds if KINDS[k] == (resource, what)), None)
    if kind is None:
        return None
    data = data if isinstance(data, dict) else {}
    text = _text(kind, name, data)
    if text is None:
        return None
    channel = data.get("channel") if kind == "rule_notify" else None
    return Notice(kind, f"{kind}:{name}", text, channel if isinstance(channel, str) else None)


def _text(kind: str, name: str, data: dict[str, Any]) -> str | None:
    reason = str(data.get("reason") or "")
    if kind == "rollout_complete":
        return f":white_check_mark: *{name}*: revision {data.get('revision')} rolled out"
    if kind == "rollout_failed":
        return f":x: *{name}*: the rollout of revision {data.get('revision')} failed: {reason}"
    if kind == "degraded":
        return f":rotating_light: *{name}* is degraded: {reason}"
    if kind == "recovered":
        return f":green_heart: *{name}* recovered: {reason}"
    if kind == "node_lost":
        return f":warning: node *{name}* lost: {reason}"
    pipeline = data.get("pipeline") or "?"
    if kind == "run_failed":
        jobs = data.get("jobs")
        detail = f": {json.dumps(jobs, default=str)[:600]}" if jobs else ""
        return f":x: pipeline *{pipeline}* run `{name}` failed{detail}"
    if kind == "run_succeeded":
        return f":white_check_mark: pipeline *{pipeline}* run `{name}` succeeded"
    if kind == "approval_needed":
        job = data.get("job") or "?"
        approvers = ", ".join(str(a) for a in data.get("approvers") or []) or "anyone allowed"
        return (
            f":raised_hand: pipeline *{pipeline}* run `{name}`: job `{job}` needs approval by "
            f"{approvers}: `/corral approve {name} {job}`"
        )
    text = data.get("text")
    return str(text) if text else None
