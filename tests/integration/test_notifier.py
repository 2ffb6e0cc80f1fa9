"""The notifier against a real nats-server, posting to a real HTTP receiver on 127.0.0.1 that
stands in for Slack's and Mattermost's incoming webhooks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from receiver_support import receiver
from rules_support import apply_rule
from support import eventually

from corral.services.runner import Host
from corral.workers.notifier.worker import Destination, NotifierConfig, NotifierWorker

pytestmark = pytest.mark.timeout(60)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rules" / "crash-loop-notify.yaml"


async def publish(bus, subject: str, event_id: str, ce_type: str, data) -> None:
    headers = {
        "ce-id": event_id,
        "ce-source": "test",
        "ce-type": ce_type,
        "ce-specversion": "1.0",
        "content-type": "application/json",
        "Nats-Msg-Id": event_id,
    }
    await bus.js.publish(
        f"{bus.names.prefix}.evt.{subject}", json.dumps(data).encode(), headers=headers
    )


async def test_chosen_events_reach_both_chats(settings, bus) -> None:
    async with receiver() as chat:
        config = NotifierConfig(
            destinations=(
                Destination("slack", f"{chat.url}/slack"),
                Destination("mattermost", f"{chat.url}/mm"),
            ),
            per_minute=600,
            burst=10,
            repeat=60,
        )
        async with Host(settings, lambda ctx: [NotifierWorker(ctx, config)]):
            await publish(
                bus,
                "service.web.rollout_failed",
                "e1",
                "io.corral.service.rollout_failed",
                {"name": "web", "revision": 3, "reason": "replica web-1 crashed"},
            )
            await publish(bus, "replica.web.started", "e2", "io.corral.replica.started", {})
            for i in range(3):  # a flapping service: said once, then folded
                await publish(
                    bus,
                    "service.api.degraded",
                    f"d{i}",
                    "io.corral.service.degraded",
                    {"name": "api", "reason": f"crash loop {i}"},
                )
            await publish(
                bus,
                "run.r-1.approval_needed",
                "a1",
                "io.corral.run.approval_needed",
                {"pipeline": "release", "run": "r-1", "job": "prod", "approvers": ["alice"]},
            )
            await publish(
                bus,
                "rule.chat.notify",
                "n1",
                "io.corral.rule.notify",
                {"rule": "chat", "trigger": "x", "text": "hello from a rule", "channel": "ops"},
            )
            await eventually(lambda: len(chat.texts("/slack")) == 4, what="four slack posts")
            await eventually(lambda: len(chat.texts("/mm")) == 4, what="four mattermost posts")
            slack = chat.texts("/slack")
            assert slack[0] == ":x: *web*: the rollout of revision 3 failed: replica web-1 crashed"
            assert slack[1] == ":rotating_light: *api* is degraded: crash loop 0"
            assert "`/corral approve r-1 prod`" in slack[2]
            assert "held back" in slack[2] or "held back" in slack[3]
            assert slack[3].startswith("hello from a rule")
            rule_post = next(b for p, b in chat.posts if p == "/slack" and "rule" in b["text"])
            assert rule_post["channel"] == "ops"


async def test_a_chat_outage_is_retried(settings, bus) -> None:
    async with receiver() as chat:
        chat.status = 503
        config = NotifierConfig(destinations=(Destination("slack", f"{chat.url}/s"),))
        async with Host(settings, lambda ctx: [NotifierWorker(ctx, config)]):
            await publish(
                bus,
                "service.web.rollout_complete",
                "ok1",
                "io.corral.service.rollout_complete",
                {"name": "web", "revision": 2},
            )
            await eventually(lambda: chat.posts, what="the first attempt")
            chat.status = 200
            await eventually(lambda: len(chat.posts) >= 2, what="the retry")
            assert chat.posts[-1][1]["text"] == ":white_check_mark: *web*: revision 2 rolled out"


async def test_idle_without_destinations(settings, bus) -> None:
    async with Host(settings, lambda ctx: [NotifierWorker(ctx, NotifierConfig())]) as host:
        assert host.workers[0]._sub is None  # type: ignore[attr-defined]


async def test_a_rule_notifies_a_crash_loop(settings, bus, control_plane) -> None:
    """examples/rules/crash-loop-notify.yaml end to end: the healer's `degraded` event fires
    the rule, whose `notify` the notifier posts."""
    async with receiver() as chat:
        config = NotifierConfig(
            destinations=(Destination("mattermost", f"{chat.url}/mm"),), kinds=("rule_notify",)
        )
        async with control_plane(workers=("rules",)) as host:
            await host.add([NotifierWorker(host.ctx, config)])
            await apply_rule(bus, yaml.safe_load(EXAMPLE.read_text()))
            await publish(
                bus,
                "service.web.degraded",
                "deg-1",
                "io.corral.service.degraded",
                {"name": "web", "degraded": True, "reason": "crash loop: 5 restarts within 60s"},
            )
            await eventually(lambda: chat.texts("/mm"), what="the rule's chat message")
            assert chat.texts("/mm") == [
                ":rotating_light: web is crash-looping: crash loop: 5 restarts within 60s"
            ]
