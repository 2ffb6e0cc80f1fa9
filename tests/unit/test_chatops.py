"""Chat-ops' pure parts: Slack signatures (cross-checked with Slack's own SDK), the command
grammar, and RBAC."""

from __future__ import annotations

import pytest
from slack_sdk.signature import Clock, SignatureVerifier

from corral.schemas.errors import InvalidInput
from corral.services.chatops import grammar
from corral.services.chatops.rbac import decide, parse_policy, visible
from corral.services.chatops.signing import slack_problem, slack_signature, token_ok

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
    b"&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url="
    b"https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
)


class FixedClock(Clock):
    def __init__(self, now: float) -> None:
        self.at = now

    def now(self) -> float:
        return self.at


def test_our_signature_is_slacks() -> None:
    timestamp = "1531420618"
    sdk = SignatureVerifier(SECRET, clock=FixedClock(1531420618.0))
    ours = slack_signature(SECRET.encode(), timestamp, BODY)
    assert ours == sdk.generate_signature(timestamp=timestamp, body=BODY)
    assert sdk.is_valid(BODY, timestamp, ours)
    assert slack_problem(SECRET.encode(), timestamp, ours, BODY, 1531420618.0) is None


@pytest.mark.parametrize(
    ("timestamp", "signature", "body", "now", "problem"),
    [
        ("1531420618", None, BODY, 1531420618.0, "missing"),
        (None, "v0=00", BODY, 1531420618.0, "missing"),
        ("soon", "v0=00", BODY, 1531420618.0, "not a number"),
        ("1531420618", "v0=00", BODY, 1531420618.0 + 301, "replayed"),
        ("1531420618", "v0=00", BODY, 1531420618.0 - 301, "replayed"),
        ("1531420618", "v0=00", BODY, 1531420618.0, "wrong X-Slack-Signature"),
        ("1531420618", "good", BODY + b"&x=1", 1531420618.0, "wrong X-Slack-Signature"),
    ],
)
def test_refusals(timestamp, signature, body, now, problem) -> None:
    if signature == "good":
        signature = slack_signature(SECRET.encode(), timestamp, BODY)
    found = slack_problem(SECRET.encode(), timestamp, signature, body, now)
    assert found is not None
    assert problem in found
    sdk = SignatureVerifier(SECRET, clock=FixedClock(now))
    if timestamp and timestamp.isdigit():
        assert not sdk.is_valid(body, timestamp, signature or "")


def test_the_edge_of_the_window_is_inside() -> None:
    signature = slack_signature(SECRET.encode(), "1000", BODY)
    assert slack_problem(SECRET.encode(), "1000", signature, BODY, 1300.0) is None
    assert slack_problem(b"", "1000", signature, BODY, 1000.0) == "no signing secret is configured"


def test_mattermost_tokens() -> None:
    assert token_ok([b"a", b"b"], "b")
    assert not token_ok([b"a"], "b")
    assert not token_ok([b"a"], None)
    assert not token_ok([b""], "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", grammar.Request("help")),
        ("help", grammar.Request("help")),
        ("scale web 5", grammar.Request("scale", name="web", replicas=5)),
        ("SCALE web 0", grammar.Request("scale", name="web", replicas=0)),
        ("status", grammar.Request("status")),
        ("status web", grammar.Request("status", name="web")),
        ("rollback web", grammar.Request("rollback", name="web")),
        ("rollback web --to 3", grammar.Request("rollback", name="web", revision=3)),
        ("rollback --to=2 web", grammar.Request("rollback", name="web", revision=2)),
        ("events", grammar.Request("events")),
        ("events web -n 5", grammar.Request("events", name="web", count=5)),
        ("deploy web", grammar.Request("deploy", name="web")),
        ("deploy {name: web}", grammar.Request("deploy", document="{name: web}")),
        (
            "deploy ```yaml\nname: web\nreplicas: 2\n```",
            grammar.Request("deploy", document="name: web\nreplicas: 2"),
        ),
        (
            "pipeline run release ref=main -v sha=abc",
            grammar.Request("pipeline", name="release", variables={"ref": "main", "sha": "abc"}),
        ),
        (
            "pipeline run ci 'msg=a b'",
            grammar.Request("pipeline", name="ci", variables={"msg": "a b"}),
        ),
        ("approve r-1 prod", grammar.Request("approve", name="r-1", job="prod")),
        ("pipeline approve r-1 prod", grammar.Request("approve", name="r-1", job="prod")),
    ],
)
def test_grammar(text, expected) -> None:
    assert grammar.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("launch", "unknown command 'launch'"),
        ("scale web", "Usage: `scale NAME REPLICAS`"),
        ("scale web many", "whole number"),
        ("scale Web 2", "not a valid name"),
        ("scale web -1", "whole number"),
        ("status a b", "at most one"),
        ("rollback", "needs a service name"),
        ("rollback web --to x", "revision number"),
        ("events -n 500", "between 1 and 50"),
        ("deploy", "needs a spec name"),
        ("deploy a b", "one spec name"),
        ("pipeline", "takes `run`"),
        ("pipeline run", "needs a pipeline name"),
        ("pipeline run ci notavar", "KEY=VALUE"),
        ("approve r-1", "a run id and a job"),
        ("scale web 'unbalanced", "cannot read"),
    ],
)
def test_grammar_refusals_say_how(text, message) -> None:
    with pytest.raises(grammar.Usage, match=message):
        grammar.parse(text)


def test_help_lists_every_command() -> None:
    text = grammar.help_text("/corral")
    for verb in ("deploy", "scale", "status", "rollback", "events", "pipeline run", "approve"):
        assert f"/corral {verb}" in text


POLICY = parse_policy(
    {
        "users": {"U1": ["release-managers"], "bob": ["developers"]},
        "default_roles": ["viewers"],
        "roles": {
            "viewers": [{"verbs": ["status"]}],
            "developers": [
                {"verbs": ["status", "events"]},
                {"verbs": ["deploy", "scale"], "labels": {"env": "staging"}},
                {"verbs": ["rollback"], "services": ["web-*"]},
                {"verbs": ["pipeline"], "pipelines": ["ci-*"]},
            ],
            "release-managers": [{"verbs": ["*"]}],
        },
    }
)


def test_rbac_by_labels_names_and_pipelines() -> None:
    bob = ["U2", "bob"]
    assert decide(POLICY, bob, "scale", service="api", labels={"env": "staging"}).allowed
    denied = decide(POLICY, bob, "scale", service="api", labels={"env": "prod"})
    assert not denied.allowed
    assert denied.reason == (
        "bob (roles: developers) may not scale api (labels env=prod): allowed only "
        "deploy,scale on labels env=staging"
    )
    assert decide(POLICY, bob, "rollback", service="web-eu").allowed
    assert not decide(POLICY, bob, "rollback", service="api").allowed
    assert decide(POLICY, bob, "pipeline", pipeline="ci-unit").allowed
    assert not decide(POLICY, bob, "pipeline", pipeline="release").allowed
    nope = decide(POLICY, bob, "approve")
    assert nope.reason == "bob (roles: developers) may not approve anything"
    assert decide(POLICY, ["U1", "alice"], "deploy", service="x", labels={"env": "prod"}).allowed
    assert decide(POLICY, ["U1"], "approve").roles == ["release-managers"]


def test_rbac_defaults_and_strangers() -> None:
    carol = ["U3", "carol"]
    assert decide(POLICY, carol, "status", service="x").allowed
    assert not decide(POLICY, carol, "scale", service="x").allowed
    strict = parse_policy({"roles": {"ops": [{"verbs": ["*"]}]}, "users": {"U1": ["ops"]}})
    eve = decide(strict, ["U9", "eve"], "status")
    assert not eve.allowed
    assert "eve has no chat-ops role" in eve.reason
    assert decide(strict, ["U9"], "help").allowed


def test_unrestricted_reads_need_an_unrestricted_grant() -> None:
    scoped = parse_policy(
        {"users": {"u": ["r"]}, "roles": {"r": [{"verbs": ["events"], "labels": {"team": "a"}}]}}
    )
    assert not decide(scoped, ["u"], "events").allowed
    assert decide(scoped, ["u"], "events", service="x", labels={"team": "a"}).allowed
    pairs = [("a1", {"team": "a"}), ("b1", {"team": "b"})]
    assert visible(scoped, ["u"], "events", pairs) == ["a1"]


def test_bad_policies_are_refused() -> None:
    with pytest.raises(InvalidInput, match="not defined: ghosts"):
        parse_policy({"users": {"u": ["ghosts"]}, "roles": {}})
    with pytest.raises(InvalidInput, match="invalid chat-ops RBAC"):
        parse_policy({"roles": {"r": [{"verbs": ["destroy"]}]}})
    with pytest.raises(InvalidInput):
        parse_policy(["not", "a", "mapping"])
