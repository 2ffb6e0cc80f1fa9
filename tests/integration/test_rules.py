"""The rules worker against a real nats-server: rules applied as commands, webhooks through the
real gateway firing them into the api worker, template errors, cooldowns, rate limits, and no
loops."""

from __future__ import annotations

import json

import pytest
from gateway_payloads import ALERTMANAGER
from gateway_support import ALERTMANAGER_TOKEN, GITHUB_SECRET, auth, record, running_gateway
from pipeline_support import pipeline_host, send
from rules_support import apply_rule, deploy, replicas_of
from support import eventually

from corral.services.cli.client import send_command
from corral.services.gateway.signatures import sign
from corral.services.runner import make_worker

pytestmark = pytest.mark.timeout(60)

SCALE_ON_LATENCY = {
    "name": "scale-on-latency",
    "when": {
        "type": "io.corral.ext.alertmanager.firing",
        "subject": "ext.alertmanager.*",
        "match": {"data.labels.alertname": "HighLatency", "data.labels.service": "/^web$/"},
    },
    "then": {
        "resource": "service",
        "name": "{{ data.labels.service }}",
        "verb": "scale",
        "data": {"replicas": "{{ services[data.labels.service].replicas + 2 }}"},
    },
    "cooldown": "1m",
}


def kinds(published, prefix: str) -> list[str]:
    return [s.removeprefix(f"{prefix}.evt.") for s, _, _ in published.seen]


async def test_alert_webhook_scales_through_a_rule(settings, bus, control_plane) -> None:
    async with control_plane(workers=("api", "rules")), running_gateway(settings, bus) as api:
        await deploy(bus, "web", 3)
        accepted = await apply_rule(bus, SCALE_ON_LATENCY)
        assert accepted["generation"] == 1
        rule_events = await record(bus, f"{settings.prefix}.evt.rule.>")
        commands = await record(bus, f"{settings.prefix}.cmd.service.web.scale")
        try:
            body = json.dumps(ALERTMANAGER)
            answer = await api.client.post(
                "/v1/hooks/alertmanager", content=body, headers=auth(ALERTMANAGER_TOKEN.decode())
            )
            assert answer.status_code == 202, answer.text
            firing_id = answer.json()["events"][0]["id"]
            await eventually(lambda: replicas_of(bus, "web"), what="web exists")
            await eventually(
                lambda: _equals(replicas_of(bus, "web"), 5), what="web scaled to 3 + 2"
            )
            await eventually(lambda: len(commands.seen) == 1, what="the scale command")
            _, headers, data = commands.seen[0]
            assert data == {"replicas": 5}
            assert headers["corral-requested-by"] == "rule:scale-on-latency"
            assert headers["corral-correlation"] == firing_id
            assert headers["ce-id"] == f"{firing_id}.rule.scale-on-latency"
            await eventually(
                lambda: "rule.scale-on-latency.fired" in kinds(rule_events, settings.prefix),
                what="the fired event",
            )
            fired = next(d for s, _, d in rule_events.seen if s.endswith(".fired"))
            assert fired["trigger"] == firing_id
            assert fired["action"] == "service scale web"

            # the same alert again (a new group key, so not a duplicate delivery): cooldown
            again = dict(ALERTMANAGER, groupKey="another-group")
            answer = await api.client.post(
                "/v1/hooks/alertmanager",
                content=json.dumps(again),
                headers=auth(ALERTMANAGER_TOKEN.decode()),
            )
            assert answer.status_code == 202
            await eventually(
                lambda: "rule.scale-on-latency.skipped" in kinds(rule_events, settings.prefix),
                what="the skipped event",
            )
            skipped = next(d for s, _, d in rule_events.seen if s.endswith(".skipped"))
            assert skipped["reason"].startswith("cooldown")
            assert skipped["retry_after"] > 50
            assert await replicas_of(bus, "web") == 5
            assert len(commands.seen) == 1
        finally:
            await rule_events.close()
            await commands.close()


def firings(published) -> list:
    """The rule's own events, without the answers to its apply command."""
    return [seen for seen in published.seen if not seen[0].endswith(".accepted")]


async def _equals(value, expected) -> bool:
    return (await value) == expected


async def test_github_push_on_main_runs_a_pipeline(settings, bus, control_plane) -> None:
    rule = {
        "name": "deploy-main",
        "when": {"type": "io.corral.ext.github.push", "match": {"data.ref": "refs/heads/main"}},
        "then": {
            "resource": "pipeline",
            "name": "release",
            "verb": "run",
            "data": {"variables": {"ref": "{{ data.ref }}", "sha": "{{ data.after }}"}},
        },
    }
    async with control_plane(workers=("rules",)), running_gateway(settings, bus) as api:
        await apply_rule(bus, rule)
        commands = await record(bus, f"{settings.prefix}.cmd.pipeline.>")
        try:
            for ref, delivery in (("refs/heads/feature", "p1"), ("refs/heads/main", "p2")):
                body = json.dumps({"ref": ref, "after": "abc123"}).encode()
                answer = await api.client.post(
                    "/v1/hooks/github",
                    content=body,
                    headers={
                        "content-type": "application/json",
                        "x-github-event": "push",
                        "x-github-delivery": delivery,
                        "x-hub-signature-256": sign(GITHUB_SECRET, body),
                    },
                )
                assert answer.status_code == 202
            await eventually(lambda: commands.seen, what="a pipeline run command")
            subject, headers, data = commands.seen[0]
            assert subject == f"{settings.prefix}.cmd.pipeline.release.run"
            assert headers["ce-type"] == "io.corral.pipeline.run"
            assert data == {
                "spec": None,
                "variables": {"ref": "refs/heads/main", "sha": "abc123"},
                "requested_by": "rule:deploy-main",
            }
            assert headers["ce-id"] == "github-p2.rule.deploy-main"
            await bus.nc.flush()
            assert len(commands.seen) == 1  # the feature branch did not match
        finally:
            await commands.close()


async def test_a_template_error_is_an_event_not_a_crash(settings, bus, control_plane) -> None:
    broken = {
        "name": "broken",
        "when": {"type": "io.corral.ext.billing.*"},
        "then": {
            "resource": "service",
            "name": "{{ data.service }}",
            "verb": "scale",
            "data": {"replicas": "{{ services[data.service].replicas + 1 }}"},
        },
    }
    async with control_plane(workers=("api", "rules")):
        await apply_rule(bus, broken)
        await deploy(bus, "api", 1)
        events = await record(bus, f"{settings.prefix}.evt.rule.broken.>")
        try:
            await _publish_ext(bus, settings, "billing", "paid", "e1", {"service": "nope"})
            await eventually(lambda: firings(events), what="the failed event")
            subject, _, data = firings(events)[0]
            assert subject.endswith(".failed")
            assert data["trigger"] == "e1"
            assert "'nope'" in data["reason"]
            assert data["errors"][0]["loc"] == "then.data.replicas"
            # the worker is still there: the next event fires
            await _publish_ext(bus, settings, "billing", "paid", "e2", {"service": "api"})
            await eventually(lambda: _equals(replicas_of(bus, "api"), 2), what="api scaled")
        finally:
            await events.close()


async def test_rate_limit_and_no_loops(settings, bus, control_plane) -> None:
    # a rule that reacts to every accepted service command by scaling that service up would
    # loop forever if it fired on what it caused itself
    echo = {
        "name": "echo",
        "when": {"type": "io.corral.service.accepted", "match": {"data.command": "deploy"}},
        "then": {
            "resource": "service",
            "name": "{{ data.name }}",
            "verb": "scale",
            "data": {"replicas": "{{ services[data.name].replicas + 1 }}"},
        },
        "rate_limit": {"count": 2, "per": "1h"},
    }
    async with control_plane(workers=("api", "rules")):
        await apply_rule(bus, echo)
        events = await record(bus, f"{settings.prefix}.evt.rule.echo.>")
        try:
            for name in ("a", "b", "c"):
                await deploy(bus, name, 1)
            await eventually(lambda: len(firings(events)) >= 3, what="three rule events")
            whats = sorted(s.rsplit(".", 1)[-1] for s, _, _ in firings(events))
            assert whats == ["fired", "fired", "skipped"]
            skipped = next(d for s, _, d in events.seen if s.endswith(".skipped"))
            assert skipped["reason"].startswith("rate limit: 2 firings")
            await eventually(
                lambda: _equals(replicas_of(bus, "b"), 2), what="b scaled once by the rule"
            )
            assert await replicas_of(bus, "a") == 2
            assert await replicas_of(bus, "c") == 1
            await bus.nc.flush()
            assert len(firings(events)) == 3  # the scale commands it sent did not trigger it
        finally:
            await events.close()


async def test_rule_commands_are_validated(settings, bus, control_plane) -> None:
    async with control_plane(workers=("rules",)):
        bad = {"name": "bad", "when": {"match": {"data.x": "/[/"}}, "then": {"notify": {}}}
        outcome = await send_command(bus, "rule", "bad", "apply", bad, within=15)
        assert not outcome.accepted
        assert outcome.data["code"] == "invalid"
        locs = {e["loc"] for e in outcome.data["errors"]}
        assert {"when.match", "then.notify.text"} <= locs
        syntax = {"name": "syntax", "then": {"notify": {"text": "{{ oops("}}}
        outcome = await send_command(bus, "rule", "syntax", "apply", syntax, within=15)
        assert not outcome.accepted
        assert outcome.data["errors"][0]["loc"] == "then.notify.text"
        mismatch = {"name": "other", "then": {"notify": {"text": "hi"}}}
        outcome = await send_command(bus, "rule", "named", "apply", mismatch, within=15)
        assert "names rule 'named'" in outcome.data["reason"]
        missing = await send_command(bus, "rule", "ghost", "delete", {}, within=15)
        assert missing.data["code"] == "not_found"
        ok = await apply_rule(bus, {"name": "fine", "then": {"notify": {"text": "hi"}}})
        again = await apply_rule(bus, {"name": "fine", "then": {"notify": {"text": "hi"}}})
        assert (ok["changed"], again["changed"]) == (True, False)
        gone = await send_command(bus, "rule", "fine", "delete", {}, within=15)
        assert gone.accepted
        assert await bus.buckets.rules.get("fine") is None


async def _publish_ext(bus, settings, source: str, kind: str, event_id: str, data) -> None:
    headers = {
        "ce-id": event_id,
        "ce-source": "test",
        "ce-type": f"io.corral.ext.{source}.{kind}",
        "ce-specversion": "1.0",
        "content-type": "application/json",
        "Nats-Msg-Id": event_id,
    }
    await bus.js.publish(
        f"{settings.prefix}.evt.ext.{source}.{kind}", json.dumps(data).encode(), headers=headers
    )


async def test_copies_share_the_limits(settings, bus, control_plane) -> None:
    """Two rules workers split the events of one durable consumer, and their rate limit is
    one: ten matching events, three firings."""
    rule = {
        "name": "shared",
        "when": {"type": "io.corral.ext.billing.paid"},
        "then": {"notify": {"text": "paid {{ data.n }}"}},
        "rate_limit": {"count": 3, "per": "1h"},
    }
    async with control_plane(workers=("rules", "rules")):
        await apply_rule(bus, rule)
        events = await record(bus, f"{settings.prefix}.evt.rule.shared.>")
        try:
            for n in range(10):
                await _publish_ext(bus, settings, "billing", "paid", f"p{n}", {"n": n})
            await eventually(
                lambda: len([s for s, _, _ in firings(events) if not s.endswith(".notify")]) == 10,
                what="ten verdicts",
            )
            whats = [s.rsplit(".", 1)[-1] for s, _, _ in firings(events)]
            assert whats.count("fired") == 3
            assert whats.count("notify") == 3
            assert whats.count("skipped") == 7
            state = await bus.buckets.rule_state.get("shared")
            assert state is not None
            assert len(state.value.firings) == 3
        finally:
            await events.close()


async def test_a_push_runs_a_real_pipeline(settings, bus) -> None:
    """examples/rules/github-push-main.yaml's shape against the pipeline worker itself: the
    run gets the push's ref as a variable and records the rule as who asked."""
    spec = {"name": "release", "jobs": {"build": {"command": ["sh", "-c", "echo $REF"]}}}
    rule = {
        "name": "release-on-push",
        "when": {"type": "io.corral.ext.github.push", "match": {"data.ref": "refs/heads/main"}},
        "then": {
            "resource": "pipeline",
            "name": "release",
            "verb": "run",
            "data": {"variables": {"REF": "{{ data.ref }}"}},
        },
    }
    async with pipeline_host(settings) as host:
        await host.add([make_worker("rules", host.ctx)])
        ok, answer = await send(bus, "pipeline", "release", "apply", {"spec": spec})
        assert ok, answer
        await apply_rule(bus, rule)
        runs = await record(bus, f"{settings.prefix}.evt.run.>")
        try:
            await _publish_ext(bus, settings, "github", "push", "gh-1", {"ref": "refs/heads/main"})
            await eventually(
                lambda: any(s.endswith(".succeeded") for s, _, _ in runs.seen),
                what="the run to succeed",
            )
            started = next(d for s, _, d in runs.seen if s.endswith(".started"))
            assert started["requested_by"] == "rule:release-on-push"
            assert started["pipeline"] == "release"
        finally:
            await runs.close()
