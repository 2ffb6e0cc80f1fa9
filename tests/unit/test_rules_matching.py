"""The rules' pure parts: matching, loop marks, cooldown and rate limit, command checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from corral.schemas.envelope import CloudEvent
from corral.schemas.rules import Firing, Rule, RuleState
from corral.workers.rules import actions, limits
from corral.workers.rules.matching import (
    MISSING,
    caused_by,
    event_document,
    fires,
    lookup,
    rules_marked,
    value_matches,
    when_matches,
)
from corral.workers.rules.templating import Rendered, TemplateFailure

PUSH = event_document(
    CloudEvent(
        id="github-d1",
        source="https://github.com/octo/shop",
        type="io.corral.ext.github.push",
        subject="octo/shop",
        data={"ref": "refs/heads/main", "commits": [{"id": "a1"}], "forced": False, "size": 2},
    )
)


def rule(**fields) -> Rule:
    fields.setdefault("name", "r")
    fields.setdefault("then", {"notify": {"text": "hi"}})
    return Rule.model_validate(fields)


def test_lookup_walks_dicts_and_lists() -> None:
    assert lookup(PUSH, "data.ref") == "refs/heads/main"
    assert lookup(PUSH, "data.commits.0.id") == "a1"
    assert lookup(PUSH, "data.commits.1.id") is MISSING
    assert lookup(PUSH, "data.ref.x") is MISSING
    assert lookup(PUSH, "subject") == "octo/shop"


@pytest.mark.parametrize(
    ("actual", "expected", "result"),
    [
        ("refs/heads/main", "refs/heads/main", True),
        ("refs/heads/main", "refs/heads/dev", False),
        ("refs/heads/main", "/^refs/heads/(main|master)$/", True),
        ("refs/heads/mainline", "/^refs/heads/main$/", False),
        ("refs/heads/main", "/heads/", True),  # searched, not anchored
        ("refs/heads/main", ["dev", "refs/heads/main"], True),
        ("x", ["a", "/^b/"], False),
        (2, 2, True),
        (2, 2.0, True),
        (2, "2", True),  # label values are text: 500 matches "500"
        ("2", 2, True),
        ("2.5", 2, False),
        (False, False, True),
        (0, False, False),  # a bool is not a number here
        (None, None, True),
        (MISSING, None, False),
        (MISSING, "/.*/", False),
        ({"a": 1}, "/a/", False),
        (True, "/^true$/", True),
    ],
)
def test_value_matches(actual, expected, result) -> None:
    assert value_matches(actual, expected) is result


def test_when_globs_type_and_subject() -> None:
    assert when_matches(rule().when, "ext.github.push", PUSH)
    assert when_matches(rule(when={"type": "io.corral.ext.github.*"}).when, "ext.github.push", PUSH)
    assert not when_matches(rule(when={"type": "io.corral.ext.gitlab.*"}).when, "x", PUSH)
    assert when_matches(rule(when={"subject": "ext.*.push"}).when, "ext.github.push", PUSH)
    assert not when_matches(rule(when={"subject": "service.*"}).when, "ext.github.push", PUSH)
    main = rule(when={"match": {"data.ref": "refs/heads/main", "data.size": 2}})
    assert when_matches(main.when, "ext.github.push", PUSH)
    missing = rule(when={"match": {"data.nope": "/.*/"}})
    assert not when_matches(missing.when, "ext.github.push", PUSH)


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValidationError, match="bad regex"):
        rule(when={"match": {"data.x": "/[/"}})
    with pytest.raises(ValidationError, match="dotted names"):
        rule(when={"match": {"data..x": 1}})
    with pytest.raises(ValidationError, match="scalars"):
        rule(when={"match": {"data.x": {"a": 1}}})
    with pytest.raises(ValidationError, match="either a command"):
        rule(then={"resource": "service", "name": "w", "verb": "scale", "notify": {"text": "x"}})
    with pytest.raises(ValidationError, match="needs resource, name and verb"):
        rule(then={"resource": "service", "name": "w"})
    with pytest.raises(ValidationError):
        rule(name="Not A Name")
    assert rule(cooldown="5m").cooldown == 300


def test_a_rule_never_fires_on_what_it_caused() -> None:
    assert caused_by("r", "rule.r.fired", {})
    assert not caused_by("r", "rule.other.fired", {})
    accepted = {"id": "e1.rule.r.accepted", "correlation": "e1.rule.r"}
    assert caused_by("r", "service.web.accepted", accepted)
    assert not caused_by("s", "service.web.accepted", accepted)
    chain = {"id": "z", "correlation": "e1.rule.r.accepted.rule.s"}
    assert caused_by("r", "x", chain)
    assert caused_by("s", "x", chain)
    assert rules_marked("e1.rule.a.accepted.rule.b") == ["a", "b"]
    assert rules_marked(None) == []
    assert not fires(rule(), "rule.r.notify", PUSH)
    assert fires(rule(), "ext.github.push", PUSH)
    assert not fires(rule(enabled=False), "ext.github.push", PUSH)


def test_cooldown() -> None:
    r = rule(cooldown=60)
    state = RuleState()
    assert limits.decide(r, state, "e1", 1000.0).fire
    state = limits.record(r, state, "e1", 1000.0, "e1.rule.r")
    held = limits.decide(r, state, "e2", 1030.0)
    assert not held.fire
    assert held.retry_after == pytest.approx(30.0)
    assert held.reason == "cooldown: fired 30.0s ago, cooldown is 60s"
    assert limits.decide(r, state, "e3", 1060.0).fire
    repeat = limits.decide(r, state, "e1", 1010.0)  # a redelivery of the trigger
    assert repeat.fire
    assert repeat.repeat == Firing(trigger="e1", at=1000.0, command_id="e1.rule.r")


def test_rate_limit_is_a_sliding_window() -> None:
    r = rule(rate_limit={"count": 3, "per": 100})
    state = RuleState()
    for i, at in enumerate((0.0, 10.0, 20.0)):
        assert limits.decide(r, state, f"e{i}", at).fire
        state = limits.record(r, state, f"e{i}", at, f"c{i}")
    held = limits.decide(r, state, "e9", 50.0)
    assert not held.fire
    assert held.reason == "rate limit: 3 firings in the last 100s (limit 3)"
    assert held.retry_after == pytest.approx(50.0)  # the oldest leaves the window at 100
    assert limits.decide(r, state, "e9", 100.5).fire


def test_state_keeps_what_limits_and_dedupe_need() -> None:
    r = rule(rate_limit={"count": 500, "per": 1000})
    state = RuleState()
    for i in range(200):
        state = limits.record(r, state, f"e{i}", float(i), "")
    assert len(state.firings) == 200  # all inside the window
    plain = rule()
    state = RuleState()
    for i in range(200):
        state = limits.record(plain, state, f"e{i}", float(i), "")
    assert len(state.firings) == 64
    assert state.firings[-1].trigger == "e199"


def test_command_ids_carry_the_mark_and_stay_short() -> None:
    assert actions.command_id("github-d1", "deploy") == "github-d1.rule.deploy"
    long = "x" * 300 + ".rule.a"
    made = actions.command_id(long, "b")
    assert len(made) <= 240
    assert rules_marked(made) == ["a", "b"]


def test_commands_are_checked_against_their_schema() -> None:
    scale = Rendered("service", "web", "scale", {"replicas": 5})
    assert actions.command_data("r", scale) == {"replicas": 5}
    with pytest.raises(TemplateFailure, match=r"then\.data\.replicas"):
        actions.command_data("r", Rendered("service", "web", "scale", {"replicas": -1}))
    with pytest.raises(TemplateFailure, match="has no 'explode'"):
        actions.command_data("r", Rendered("service", "web", "explode", {}))
    with pytest.raises(TemplateFailure, match="unknown 'spaceship'"):
        actions.command_data("r", Rendered("spaceship", "x", "go", {}))
    with pytest.raises(TemplateFailure, match=r"then\.name"):
        actions.command_data("r", Rendered("service", "web app", "scale", {"replicas": 1}))
    run = Rendered("pipeline", "release", "run", {"variables": {"n": 3, "ok": True}})
    assert actions.command_data("r", run) == {
        "variables": {"n": "3", "ok": "true"},
        "spec": None,
        "requested_by": "rule:r",
    }
    cancel = Rendered("run", "r-1", "cancel", {})
    assert actions.command_data("r", cancel) == {"requested_by": "rule:r"}


def test_rules_and_chat_are_in_the_exported_schemas() -> None:
    from corral.services.cli.schema import catalogue

    models = catalogue()
    assert models["spec.rule"] is Rule
    assert {"io.corral.rule.fired", "io.corral.rule.failed", "io.corral.chat.denied"} <= set(models)
