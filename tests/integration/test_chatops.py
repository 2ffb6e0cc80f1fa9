"""Chat-ops through the real gateway (uvicorn on 127.0.0.1) and the real nats-server: Slack
requests signed the way Slack's SDK signs them, Mattermost tokens, RBAC, and a local HTTP
receiver standing in for `response_url`."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from urllib.parse import urlencode

import httpx
import pytest
from gateway_support import CONFIG, record, running_gateway
from pipeline_support import pipeline_host, send
from receiver_support import receiver
from rules_support import deploy, replicas_of
from slack_sdk.signature import SignatureVerifier
from support import acli, corral_env, eventually

from corral.services.chatops.config import ChatConfig
from corral.services.chatops.rbac import parse_policy
from corral.services.gateway.config import GatewayConfig

pytestmark = pytest.mark.timeout(60)
SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
MM_TOKEN = "mattermost-slash-token-123"
POLICY = parse_policy(
    {
        "users": {
            "U1": ["release-managers"],
            "mm1": ["release-managers"],
            "bob": ["developers"],
            "U3": ["viewers"],
        },
        "roles": {
            "viewers": [{"verbs": ["status", "events"]}],
            "developers": [
                {"verbs": ["status", "events"]},
                {"verbs": ["deploy", "scale", "rollback"], "labels": {"env": "staging"}},
            ],
            "release-managers": [{"verbs": ["*"]}],
        },
    }
)


def chat_config(tmp_path) -> GatewayConfig:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "api.yaml").write_text(
        "name: api\nreplicas: 2\ncommand: [sleep, '3600']\nlabels: {env: staging}\n"
    )
    chat = ChatConfig(
        slack_secret=SECRET.encode(),
        mattermost_tokens=(MM_TOKEN.encode(),),
        policy=POLICY,
        specs_dir=specs,
        wait=15.0,
    )
    return GatewayConfig(tokens=CONFIG.tokens, chat=chat)


def slack_request(text: str, response_url: str, *, user=("U1", "alice"), age: float = 0.0):
    body = urlencode(
        {
            "token": "ignored-legacy-token",
            "team_id": "T1",
            "channel_id": "C1",
            "user_id": user[0],
            "user_name": user[1],
            "command": "/corral",
            "text": text,
            "response_url": response_url,
        }
    ).encode()
    timestamp = str(int(time.time() - age))
    signature = SignatureVerifier(SECRET).generate_signature(timestamp=timestamp, body=body)
    headers = {
        "content-type": "application/x-www-form-urlencoded",
        "x-slack-request-timestamp": timestamp,
        "x-slack-signature": signature or "",
    }
    return body, headers


PLANE = {
    "workers": ("api", "deployer", "scheduler"),
    "agents": [{"node_id": "n1", "driver": "fake"}],
}


async def test_slack_scale_acknowledges_then_reports(settings, bus, control_plane, tmp_path):
    async with (
        control_plane(**PLANE),
        receiver() as chat,
        running_gateway(settings, bus, chat_config(tmp_path)) as api,
    ):
        await deploy(bus, "web", 1)
        commands = await record(bus, f"{settings.prefix}.cmd.service.web.scale")
        asked = await record(bus, f"{settings.prefix}.evt.chat.>")
        try:
            body, headers = slack_request("scale web 3", f"{chat.url}/hook/1")
            # the answer comes at once (Slack allows 3 s); the outcome follows at response_url
            answer = await api.client.post("/v1/chat/slack", content=body, headers=headers)
            assert answer.status_code == 200, answer.text
            assert answer.json() == {
                "response_type": "ephemeral",
                "text": "On it: `/corral scale web 3`",
            }
            await eventually(
                lambda: any("3/3 ready" in t for t in chat.texts()), what="the final report"
            )
            accepted, done = chat.texts("/hook/1")
            assert "accepted" in accepted
            assert "alice" in accepted
            assert done.startswith(":white_check_mark: web: 3/3 ready")
            assert await replicas_of(bus, "web") == 3
            _, command_headers, data = commands.seen[0]
            assert data == {"replicas": 3}
            assert command_headers["corral-requested-by"] == "slack:alice (U1)"
            assert command_headers["ce-source"] == "corral/chatops/slack"
            await eventually(lambda: asked.seen, what="the chat event")
            subject, event_headers, who = asked.seen[0]
            assert subject == f"{settings.prefix}.evt.chat.slack.requested"
            assert (who["user_id"], who["user_name"], who["allowed"]) == ("U1", "alice", True)
            assert who["command_id"] == command_headers["ce-id"]
            assert event_headers["corral-correlation"] == command_headers["ce-id"]
        finally:
            await commands.close()
            await asked.close()


async def test_slack_signatures_and_replays_are_refused(settings, bus, tmp_path) -> None:
    async with receiver() as chat, running_gateway(settings, bus, chat_config(tmp_path)) as api:
        commands = await record(bus, f"{settings.prefix}.cmd.>")
        try:
            body, headers = slack_request("scale web 3", chat.url, age=6 * 60)
            replayed = await api.client.post("/v1/chat/slack", content=body, headers=headers)
            assert replayed.status_code == 401
            assert "replayed" in replayed.json()["error"]["message"]
            body, headers = slack_request("scale web 3", chat.url)
            tampered = await api.client.post(
                "/v1/chat/slack", content=body.replace(b"web+3", b"web+9"), headers=headers
            )
            assert tampered.status_code == 401
            assert tampered.json()["error"]["code"] == "bad_signature"
            unsigned = {"content-type": headers["content-type"]}
            missing = await api.client.post("/v1/chat/slack", content=body, headers=unsigned)
            assert missing.status_code == 401
            body, headers = slack_request("help", chat.url)
            helped = await api.client.post("/v1/chat/slack", content=body, headers=headers)
            assert helped.status_code == 200
            assert "/corral scale NAME REPLICAS" in helped.json()["text"]
            body, headers = slack_request("launch rockets", chat.url)
            usage = await api.client.post("/v1/chat/slack", content=body, headers=headers)
            assert "unknown command 'launch'" in usage.json()["text"]
            await bus.nc.flush()
            assert commands.seen == []
            assert chat.posts == []
        finally:
            await commands.close()


async def test_rbac_allows_and_denies(settings, bus, control_plane, tmp_path) -> None:
    async with (
        control_plane(workers=("api",)),
        receiver() as chat,
        running_gateway(settings, bus, chat_config(tmp_path)) as api,
    ):
        await deploy(bus, "shop", 2, labels={"env": "prod"})
        denied_events = await record(bus, f"{settings.prefix}.evt.chat.slack.denied")
        try:
            bob = ("U2", "bob")
            body, headers = slack_request("scale shop 5", f"{chat.url}/bob", user=bob)
            assert (
                await api.client.post("/v1/chat/slack", content=body, headers=headers)
            ).status_code == 200
            await eventually(lambda: chat.texts("/bob"), what="bob's answer")
            [denial] = chat.texts("/bob")
            assert denial.startswith(
                ":no_entry: denied: bob (roles: developers) may not scale shop"
            )
            assert "env=staging" in denial
            await eventually(lambda: denied_events.seen, what="the denied event")
            assert denied_events.seen[0][2]["reason"] in denial
            assert await replicas_of(bus, "shop") == 2

            # a developer may deploy a staging service by name from the specs directory
            body, headers = slack_request("deploy api", f"{chat.url}/bob2", user=bob)
            await api.client.post("/v1/chat/slack", content=body, headers=headers)
            await eventually(lambda: chat.texts("/bob2"), what="the deploy answer")
            assert "accepted" in chat.texts("/bob2")[0]
            assert await replicas_of(bus, "api") == 2
            # but not move it to prod with an inline spec
            inline = "deploy {name: api, replicas: 1, command: [sleep, '1'], labels: {env: prod}}"
            body, headers = slack_request(inline, f"{chat.url}/bob3", user=bob)
            await api.client.post("/v1/chat/slack", content=body, headers=headers)
            await eventually(lambda: chat.texts("/bob3"), what="the inline deploy answer")
            assert chat.texts("/bob3")[0].startswith(":no_entry: denied")
            assert await replicas_of(bus, "api") == 2

            # a viewer sees status, a stranger gets nothing
            body, headers = slack_request("status", f"{chat.url}/viewer", user=("U3", "carol"))
            await api.client.post("/v1/chat/slack", content=body, headers=headers)
            await eventually(lambda: chat.texts("/viewer"), what="the status")
            assert "*shop*" in chat.texts("/viewer")[0]
            body, headers = slack_request("status", f"{chat.url}/eve", user=("U9", "eve"))
            await api.client.post("/v1/chat/slack", content=body, headers=headers)
            await eventually(lambda: chat.texts("/eve"), what="the stranger's answer")
            assert "eve has no chat-ops role" in chat.texts("/eve")[0]

            # the release manager may scale prod
            body, headers = slack_request("scale shop 4", f"{chat.url}/alice")
            await api.client.post("/v1/chat/slack", content=body, headers=headers)
            await eventually(lambda: _equals(replicas_of(bus, "shop"), 4), what="shop at 4")
        finally:
            await denied_events.close()


async def _equals(value, expected) -> bool:
    return (await value) == expected


async def test_mattermost_uses_the_same_handlers(settings, bus, control_plane, tmp_path):
    async with (
        control_plane(workers=("api",)),
        receiver() as chat,
        running_gateway(settings, bus, chat_config(tmp_path)) as api,
    ):
        await deploy(bus, "web", 1)
        form = {
            "token": "wrong",
            "user_id": "mm1",
            "user_name": "alice",
            "command": "/corral",
            "text": "scale web 2",
            "response_url": f"{chat.url}/mm",
        }
        form_type = {"content-type": "application/x-www-form-urlencoded"}
        wrong = await api.client.post(
            "/v1/chat/mattermost", content=urlencode(form), headers=form_type
        )
        assert wrong.status_code == 401
        form["token"] = MM_TOKEN
        ok = await api.client.post(
            "/v1/chat/mattermost", content=urlencode(form), headers=form_type
        )
        assert ok.status_code == 200, ok.text
        await eventually(lambda: _equals(replicas_of(bus, "web"), 2), what="web at 2")
        await eventually(lambda: chat.texts("/mm"), what="the mattermost reply")
        assert "accepted" in chat.texts("/mm")[0]
        assert json.dumps(chat.posts[0][1]).startswith('{"response_type": "in_channel"')


async def test_chat_is_off_without_secrets(settings, bus) -> None:
    async with running_gateway(settings, bus) as api:
        for path, variable in (
            ("slack", "CORRAL_SLACK_SIGNING_SECRET"),
            ("mattermost", "CORRAL_MATTERMOST_TOKENS"),
        ):
            answer = await api.client.post(f"/v1/chat/{path}", content=b"text=help")
            assert answer.status_code == 404
            assert variable in answer.json()["error"]["message"]


async def test_pipeline_run_and_approve_follow_the_bus_contract(settings, bus, tmp_path) -> None:
    """The pipeline worker's side of the contract is played here: it answers `accepted` with
    the run id, then publishes the run's events."""
    names = bus.names
    seen: list[tuple[str, dict, dict]] = []

    async def pipeline_side(msg) -> None:
        data = json.loads(msg.data)
        headers = dict(msg.headers or {})
        seen.append((msg.subject, headers, data))
        command_id = headers["ce-id"]
        resource, name, verb = names.parse_cmd(msg.subject)
        answer = {"command": verb, "command_id": command_id, "name": name, "generation": 1}
        if verb == "run":
            answer["run"] = "r-1"
        await _event(
            bus, names.evt(resource, name, "accepted"), f"{command_id}.a", answer, command_id
        )
        if verb == "run":
            approval = {"pipeline": name, "run": "r-1", "job": "prod", "approvers": ["alice"]}
            await _event(bus, names.evt("run", "r-1", "approval_needed"), "r1.ap", approval)
        else:
            failed = {"pipeline": "release", "run": "r-1", "jobs": [{"job": "prod", "reason": "x"}]}
            await _event(bus, names.evt("run", "r-1", "failed"), "r1.f", failed)

    sub = await bus.nc.subscribe(names.cmd("*", "*", "*"), cb=pipeline_side)
    try:
        async with receiver() as chat, running_gateway(settings, bus, chat_config(tmp_path)) as api:
            body, headers = slack_request("pipeline run release ref=main", f"{chat.url}/run")
            await api.client.post("/v1/chat/slack", content=body, headers=headers)
            await eventually(lambda: len(chat.texts("/run")) >= 2, what="accepted and approval")
            accepted, approval = chat.texts("/run")[:2]
            assert "run `r-1`" in accepted
            assert approval.endswith("`/corral approve r-1 prod`")
            subject, command_headers, data = seen[0]
            assert subject == names.cmd("pipeline", "release", "run")
            assert data == {
                "spec": None,
                "variables": {"ref": "main"},
                "requested_by": "slack:alice (U1)",
            }
            assert command_headers["corral-requested-by"] == "slack:alice (U1)"

            body, headers = slack_request("approve r-1 prod", f"{chat.url}/approve")
            await api.client.post("/v1/chat/slack", content=body, headers=headers)
            await eventually(lambda: len(chat.texts("/approve")) >= 2, what="approve and failed")
            assert chat.texts("/approve")[1].startswith(":x: run `r-1` of release failed")
            subject, _, data = seen[1]
            assert subject == names.cmd("run", "r-1", "approve")
            assert data == {"job": "prod", "user": "alice", "roles": ["release-managers"]}

            body, headers = slack_request(
                "pipeline run release", f"{chat.url}/bob", user=("U2", "bob")
            )
            await api.client.post("/v1/chat/slack", content=body, headers=headers)
            await eventually(lambda: chat.texts("/bob"), what="bob's denial")
            assert chat.texts("/bob")[0].startswith(
                ":no_entry: denied: bob (roles: developers) may not pipeline"
            )
            assert len(seen) == 2
    finally:
        await sub.unsubscribe()


async def _event(bus, subject: str, event_id: str, data: dict, correlation: str = "") -> None:
    headers = {
        "ce-id": event_id,
        "ce-source": "test/pipeline",
        "ce-type": "io.corral." + ".".join(subject.split(".")[2::2]),
        "ce-specversion": "1.0",
        "content-type": "application/json",
    }
    if correlation:
        headers["corral-correlation"] = correlation
    await bus.js.publish(subject, json.dumps(data).encode(), headers=headers)


async def test_chat_runs_and_approves_a_real_pipeline(settings, bus, tmp_path) -> None:
    """Against the pipeline worker itself: a stored pipeline run from chat, its manual job
    approved from chat by someone in its approvers (a role, here), to the end."""
    spec = {
        "name": "gated",
        "jobs": {
            "build": {"command": ["true"]},
            "ship": {
                "needs": ["build"],
                "when": "manual",
                "approvers": ["release-managers"],
                "command": ["true"],
            },
        },
    }
    async with (
        pipeline_host(settings),
        receiver() as chat,
        running_gateway(settings, bus, chat_config(tmp_path)) as api,
    ):
        ok, answer = await send(bus, "pipeline", "gated", "apply", {"spec": spec})
        assert ok, answer
        body, headers = slack_request("pipeline run gated ref=main", f"{chat.url}/run")
        acked = await api.client.post("/v1/chat/slack", content=body, headers=headers)
        assert acked.status_code == 200, acked.text
        await eventually(
            lambda: any("waits for approval" in t for t in chat.texts("/run")),
            what="the approval request in chat",
        )
        approval = next(t for t in chat.texts("/run") if "waits for approval" in t)
        assert approval.endswith(" ship`")
        run_id = approval.split("`")[1]
        body, headers = slack_request(f"approve {run_id} ship", f"{chat.url}/approve")
        await api.client.post("/v1/chat/slack", content=body, headers=headers)
        await eventually(
            lambda: any("succeeded" in t for t in chat.texts("/approve") + chat.texts("/run")),
            what="the run's end in chat",
        )


async def test_corral_gateway_reads_chat_settings(settings, bus, processes, tmp_path) -> None:
    """`corral gateway` takes chat-ops from the environment, says so, and refuses a bad RBAC
    policy with exit 2."""
    rbac = tmp_path / "rbac.yaml"
    rbac.write_text("users: {U1: [ops]}\nroles: {ops: [{verbs: [status]}]}\n")
    env = corral_env(
        settings, CORRAL_SLACK_SIGNING_SECRET=SECRET, CORRAL_CHATOPS_RBAC_FILE=str(rbac)
    )
    proc = processes.start("gateway", "--port", "0", env=env, name="gateway")
    log = tmp_path / "gateway-0.log"

    def url() -> str | None:
        found = re.search(r"gateway: (http://127\.0\.0\.1:\d+)", log.read_text())
        return found.group(1) if found else None

    base = await eventually(url, within=30, what="the gateway's URL")
    assert "chat-ops: slack" in log.read_text()
    async with receiver() as chat, httpx.AsyncClient(base_url=base, timeout=10) as client:
        body, headers = slack_request("status", f"{chat.url}/s")
        acked = await client.post("/v1/chat/slack", content=body, headers=headers)
        assert acked.status_code == 200, acked.text
        await eventually(lambda: chat.texts("/s"), what="the status reply")
        assert chat.texts("/s") == ["no services"]
        off = await client.post("/v1/chat/mattermost", content=b"token=x")
        assert off.status_code == 404
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    bad = corral_env(settings, CORRAL_CHATOPS_RBAC="users: {U1: [nobody]}")
    refused = await acli(bad, "gateway", "--port", "0")
    assert refused.returncode == 2, refused
    assert "CORRAL_CHATOPS_RBAC: roles used but not defined: nobody" in refused.stderr
