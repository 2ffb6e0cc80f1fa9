"""The notifier's pure parts: which events speak, what they say, and the rate limit."""

from __future__ import annotations

import pytest

from corral.workers.notifier.selection import DEFAULT_KINDS, notice, parse_kinds, subjects
from corral.workers.notifier.throttle import Throttle, with_folded


def test_default_selection() -> None:
    failed = notice("service.web.rollout_failed", {"revision": 3, "reason": "boom"}, DEFAULT_KINDS)
    assert failed is not None
    assert failed.text == ":x: *web*: the rollout of revision 3 failed: boom"
    assert failed.key == "rollout_failed:web"
    assert notice("service.web.rollout_complete", {"revision": 2}, DEFAULT_KINDS) is not None
    assert notice("service.web.degraded", {"reason": "loop"}, DEFAULT_KINDS) is not None
    assert notice("service.web.recovered", {}, DEFAULT_KINDS) is None  # not by default
    assert notice("replica.web.started", {}, DEFAULT_KINDS) is None
    run = notice("run.r-1.failed", {"pipeline": "ci", "jobs": [{"job": "t"}]}, DEFAULT_KINDS)
    assert run is not None
    assert run.text.startswith(":x: pipeline *ci* run `r-1` failed")
    approval = notice(
        "run.r-1.approval_needed",
        {"pipeline": "ci", "job": "prod", "approvers": ["a"]},
        DEFAULT_KINDS,
    )
    assert approval is not None
    assert approval.text.endswith("`/corral approve r-1 prod`")
    rule = notice("rule.x.notify", {"text": "hi", "channel": "#ops"}, DEFAULT_KINDS)
    assert rule is not None
    assert (rule.text, rule.channel) == ("hi", "#ops")
    assert notice("rule.x.notify", {}, DEFAULT_KINDS) is None
    assert notice("nonsense", {}, DEFAULT_KINDS) is None


def test_kinds_and_subjects() -> None:
    assert parse_kinds(None) == DEFAULT_KINDS
    assert parse_kinds("degraded, node_lost") == ("degraded", "node_lost")
    with pytest.raises(ValueError, match="unknown kind"):
        parse_kinds("degraded,explosions")
    assert subjects("corral", ("degraded", "run_failed")) == [
        "corral.evt.service.*.degraded",
        "corral.evt.run.*.failed",
    ]
    only = parse_kinds("recovered")
    assert notice("service.web.recovered", {"reason": "ok"}, only) is not None
    assert notice("service.web.degraded", {"reason": "x"}, only) is None


def test_throttle_folds_repeats_and_bursts() -> None:
    throttle = Throttle(per_minute=6, burst=2, repeat=30)  # a token every 10 s
    assert throttle.admit("a", 0.0) == (True, 0)
    assert throttle.admit("a", 1.0) == (False, 0)  # the same news again: folded
    assert throttle.admit("b", 1.0) == (True, 1)  # and reported with the next one
    assert throttle.admit("c", 1.0) == (False, 0)  # the burst is spent
    assert throttle.admit("c", 5.0) == (False, 0)
    assert throttle.admit("c", 10.5) == (True, 2)  # a token back after 10 s
    assert throttle.admit("a", 31.0) == (True, 0)  # the repeat window passed


def test_folded_note() -> None:
    assert with_folded("x", 0) == "x"
    assert "3 more notification(s)" in with_folded("x", 3)
