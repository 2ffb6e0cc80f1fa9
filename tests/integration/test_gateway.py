"""The HTTP gateway through real HTTP (uvicorn on 127.0.0.1) against the real nats-server and
in-process workers: REST and commands, auth and limits, CloudEvents and the live event
stream (the webhooks are in test_gateway_hooks.py)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from gateway_support import (
    ADMIN,
    CONFIG,
    DEPLOY,
    READ,
    Api,
    auth,
    record,
    running_gateway,
)
from support import eventually

from corral.services.gateway.config import GatewayConfig

pytestmark = pytest.mark.timeout(90)
FAKE_NODE = {"node_id": "n1", "driver": "fake", "capacity": {"cpu": 8, "memory": "16Gi"}}
SPEC = {
    "name": "web",
    "replicas": 2,
    "command": ["sleep", "1000"],
    "resources": {"cpu": 0.1, "memory": "16Mi"},
}


@pytest.fixture
async def api(settings, bus):
    async with running_gateway(settings, bus) as running:
        yield running


async def service(api: Api, name: str) -> dict[str, Any] | None:
    response = await api.client.get(f"/v1/services/{name}", headers=auth(READ))
    return response.json() if response.status_code == 200 else None


async def cmd_count(bus) -> int:
    return (await bus.js.stream_info(bus.names.cmd_stream)).state.messages


async def test_deploy_scale_delete_over_http(settings, bus, control_plane, api) -> None:
    async with control_plane(agents=[FAKE_NODE]):
        deployed = await api.client.post("/v1/services?wait=true", json=SPEC, headers=auth(DEPLOY))
        assert deployed.status_code == 200, deployed.text
        body = deployed.json()
        assert body["accepted"] is True
        assert body["outcome"]["generation"] == 1
        assert body["subject"] == f"{settings.prefix}.cmd.service.web.deploy"
        command_id = body["command_id"]

        web = await eventually(
            lambda: _ready(api, "web", 2), what="web with 2 ready replicas over GET"
        )
        assert web["name"] == "web"
        assert web["desired"] == 2
        listed = (await api.client.get("/v1/services", headers=auth(READ))).json()
        assert [s["name"] for s in listed["services"]] == ["web"]
        nodes = (await api.client.get("/v1/nodes", headers=auth(READ))).json()
        assert [n["id"] for n in nodes["nodes"]] == ["n1"]

        scaled = await api.client.post(
            "/v1/services/web/scale?wait=true", json={"replicas": 3}, headers=auth(DEPLOY)
        )
        assert scaled.status_code == 200, scaled.text
        assert scaled.json()["outcome"]["generation"] == 2
        await eventually(lambda: _ready(api, "web", 3), what="3 ready replicas")

        queued = await api.client.post(
            "/v1/services/web/scale", json={"replicas": 1}, headers=auth(DEPLOY)
        )
        assert queued.status_code == 202
        assert set(queued.json()) >= {"command_id", "subject"}
        await eventually(lambda: _ready(api, "web", 1), what="scaled in to 1 without waiting")

        # the command carries who asked, and `events` finds what it caused
        events = await api.client.get(
            "/v1/events",
            params={"subject": "evt.service.web.*", "type": "*.accepted"},
            headers=auth(READ),
        )
        assert events.status_code == 200
        accepted = events.json()["events"]
        assert [e["type"] for e in accepted] == ["io.corral.service.accepted"] * 3
        assert accepted[0]["corralcorrelation"] == command_id
        assert accepted[0]["data"]["command"] == "deploy"

        forbidden = await api.client.delete("/v1/services/web", headers=auth(DEPLOY))
        assert forbidden.status_code == 403
        deleted = await api.client.delete("/v1/services/web?wait=true", headers=auth(ADMIN))
        assert deleted.status_code == 200, deleted.text
        await eventually(lambda: _gone(api, "web"), what="web gone")


async def _ready(api: Api, name: str, count: int) -> dict[str, Any] | None:
    view = await service(api, name)
    if view and view["desired"] == count and view["ready"] == count:
        return view
    return None


async def _gone(api: Api, name: str) -> bool:
    response = await api.client.get(f"/v1/services/{name}", headers=auth(READ))
    return response.status_code == 404 and response.json()["error"]["code"] == "not_found"


async def test_rejections_and_validation(settings, bus, control_plane, api) -> None:
    async with control_plane():
        ghost = await api.client.post(
            "/v1/services/ghost/scale?wait=true", json={"replicas": 2}, headers=auth(DEPLOY)
        )
        assert ghost.status_code == 404, ghost.text
        error = ghost.json()["error"]
        assert error["code"] == "not_found"
        assert "ghost" in error["message"]
        assert error["command_id"]

        no_revision = await api.client.post(
            "/v1/services/ghost/rollback?wait=true", json={"to_revision": 3}, headers=auth(DEPLOY)
        )
        assert no_revision.status_code == 404

        before = await cmd_count(bus)
        bad = await api.client.post(
            "/v1/services",
            json={"name": "Bad_Name", "replicas": -2, "command": ["x"], "bogus": 1},
            headers=auth(DEPLOY),
        )
        assert bad.status_code == 422
        error = bad.json()["error"]
        assert error["code"] == "invalid"
        assert {"name", "replicas", "bogus"} <= {e["loc"] for e in error["errors"]}
        bad_name = await api.client.post(
            "/v1/services/Not_A_Name/scale", json={"replicas": 1}, headers=auth(DEPLOY)
        )
        assert bad_name.status_code == 422
        assert (await api.client.get("/v1/services/ghost", headers=auth(READ))).status_code == 404
        assert await cmd_count(bus) == before


async def test_waiting_without_an_api_worker_times_out(settings, bus, api) -> None:
    response = await api.client.post(
        "/v1/services/web/scale?wait=true&timeout=0.3", json={"replicas": 2}, headers=auth(DEPLOY)
    )
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "timeout"
    assert error["command_id"]
    assert await cmd_count(bus) == 1  # queued: it applies when the api worker comes


async def test_auth(settings, bus, api) -> None:
    client = api.client
    missing = await client.get("/v1/services")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthenticated"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = await client.get("/v1/services", headers=auth("x" * 30))
    assert wrong.status_code == 401
    assert (
        await client.get("/v1/services", headers={"Authorization": f"Basic {READ}"})
    ).status_code == 401
    assert (await client.get("/v1/services", headers=auth(READ))).status_code == 200
    denied = await client.post("/v1/services", json=SPEC, headers=auth(READ))
    assert denied.status_code == 403
    assert denied.json()["error"] == {
        "code": "forbidden",
        "message": "token 'viewer' has scope read; this needs deploy",
    }
    assert (await client.post("/v1/cloudevents", headers=auth(READ))).status_code == 403
    for path in ("/healthz", "/metrics", "/openapi.json"):
        assert (await client.get(path)).status_code == 200, path
    assert (await client.get("/healthz")).json() == {"status": "ok", "nats": True}
    unknown = await client.get("/v2/nothing")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "not_found"
    assert "corral_gateway_requests_total" in (await client.get("/metrics")).text

    async with running_gateway(settings, bus, GatewayConfig()) as closed:
        refused = await closed.client.get("/v1/services", headers=auth(ADMIN))
        assert refused.status_code == 401
        error = refused.json()["error"]
        assert error["code"] == "auth_not_configured"
        assert "CORRAL_GATEWAY_TOKENS" in error["message"]
    async with running_gateway(settings, bus, GatewayConfig(insecure_local=True)) as local:
        assert (await local.client.get("/v1/services")).status_code == 200


async def test_cloudevents_that_delete_or_approve_need_admin(settings, bus, api) -> None:
    """The same scopes as the REST routes: deleting a service, changing rules and approving a
    job need admin, even as a CloudEvent; a refused batch publishes none of its events."""
    published = await record(bus, bus.names.cmd("*", "*", "*"))
    try:

        def event(kind: str, subject: str, data: dict[str, Any]) -> dict[str, Any]:
            return {
                "specversion": "1.0",
                "id": uuid.uuid4().hex,
                "source": "test",
                "type": f"io.corral.{kind}",
                "subject": subject,
                "data": data,
            }

        delete = event("service.delete", "web", {})
        approve = event("run.approve", "ci-1", {"job": "ship", "user": "ann", "roles": []})
        scale = event("service.scale", "web", {"replicas": 2})
        batch = "application/cloudevents-batch+json"
        for refused in (delete, approve):
            response = await api.client.post(
                "/v1/cloudevents",
                content=json.dumps(refused),
                headers={**auth(DEPLOY), "content-type": "application/cloudevents+json"},
            )
            assert response.status_code == 403, response.text
            assert "needs admin" in response.json()["error"]["message"]
        mixed = await api.client.post(
            "/v1/cloudevents",
            content=json.dumps([scale, delete]),
            headers={**auth(DEPLOY), "content-type": batch},
        )
        assert mixed.status_code == 403
        allowed = await api.client.post(
            "/v1/cloudevents",
            content=json.dumps([scale, delete]),
            headers={**auth(ADMIN), "content-type": batch},
        )
        assert allowed.status_code == 202, allowed.text
        await eventually(lambda: len(published.ids()) == 2)
        assert sorted(published.ids()) == sorted([scale["id"], delete["id"]])
    finally:
        await published.close()


async def test_body_and_rate_limits(settings, bus) -> None:
    async with running_gateway(
        settings, bus, gateway_max_body=1024, gateway_rate_limit=0.5, gateway_rate_burst=2
    ) as api:
        big = json.dumps({**SPEC, "env": {"X": "y" * 2000}})
        declared = await api.client.post(
            "/v1/services",
            content=big,
            headers={**auth(DEPLOY), "content-type": "application/json"},
        )
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "too_large"

        async def chunks():
            for _ in range(3):
                yield b"x" * 600

        chunked = await api.client.post(
            "/v1/hooks/billing", content=chunks(), headers={"x-corral-signature": "sha256=00"}
        )
        assert chunked.status_code == 413

        answers = [
            (await api.client.get("/v1/nodes", headers=auth(READ))).status_code for _ in range(3)
        ]
        assert answers == [200, 200, 429]
        limited = await api.client.get("/v1/nodes", headers=auth(READ))
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["code"] == "rate_limited"
        # another token has its own bucket
        assert (await api.client.get("/v1/nodes", headers=auth(ADMIN))).status_code == 200


def binary_headers(ce_id: str, ce_type: str, **extra: str) -> dict[str, str]:
    return {
        **auth(DEPLOY),
        "ce-id": ce_id,
        "ce-source": "https://shop.example.com",
        "ce-type": ce_type,
        "ce-specversion": "1.0",
        "content-type": "application/json",
        **extra,
    }


async def test_cloudevents_binary_structured_batch_and_duplicates(settings, bus, api) -> None:
    prefix = settings.prefix
    ext = await record(bus, f"{prefix}.evt.ext.>")
    cmds = await record(bus, f"{prefix}.cmd.>")
    try:
        event_id = uuid.uuid4().hex
        first = await api.client.post(
            "/v1/cloudevents",
            json={"order": 42},
            headers=binary_headers(event_id, "com.example.order.created"),
        )
        assert first.status_code == 202, first.text
        subject = f"{prefix}.evt.ext.shop_example_com.com_example_order_created"
        assert first.json() == {"id": event_id, "subject": subject, "duplicate": False}
        again = await api.client.post(
            "/v1/cloudevents",
            json={"order": 42},
            headers=binary_headers(event_id, "com.example.order.created"),
        )
        assert again.status_code == 202
        assert again.json()["duplicate"] is True

        structured = {
            "specversion": "1.0",
            "id": uuid.uuid4().hex,
            "source": "ci",
            "type": "io.corral.service.scale",
            "subject": "web",
            "data": {"replicas": 4},
        }
        command = await api.client.post(
            "/v1/cloudevents",
            content=json.dumps(structured),
            headers={**auth(DEPLOY), "content-type": "application/cloudevents+json"},
        )
        assert command.status_code == 202, command.text
        assert command.json()["subject"] == f"{prefix}.cmd.service.web.scale"

        batch = [
            {"specversion": "1.0", "id": f"b{i}", "source": "batcher", "type": "thing.happened"}
            for i in range(2)
        ]
        batched = await api.client.post(
            "/v1/cloudevents",
            content=json.dumps(batch),
            headers={**auth(DEPLOY), "content-type": "application/cloudevents-batch+json"},
        )
        assert batched.status_code == 202, batched.text
        assert [e["id"] for e in batched.json()["events"]] == ["b0", "b1"]

        for headers, content in (
            ({**binary_headers("x1", "a.b"), "ce-source": ""}, "{}"),
            ({k: v for k, v in binary_headers("x2", "a.b").items() if k != "ce-source"}, "{}"),
            (binary_headers("x3", "io.corral.service.accepted"), "{}"),
            (binary_headers("x4", "io.corral.service.scale"), '{"replicas": 1}'),  # no subject
            (binary_headers("x5", "io.corral.service.scale", **{"ce-subject": "web"}), "[1]"),
            ({**binary_headers("x6", "a.b"), "ce-specversion": "0.3"}, "{}"),
            ({**auth(DEPLOY), "content-type": "application/cloudevents+json"}, '{"id": "x7"}'),
            ({**auth(DEPLOY), "content-type": "application/cloudevents-batch+json"}, "{}"),
        ):
            refused = await api.client.post("/v1/cloudevents", content=content, headers=headers)
            assert refused.status_code == 422, (headers, refused.text)
            assert refused.json()["error"]["code"] == "invalid"

        await eventually(lambda: len(ext.seen) == 3 and len(cmds.seen) == 1, what="published")
        assert [s for s, _, _ in ext.seen] == [
            subject,
            f"{prefix}.evt.ext.batcher.thing_happened",
            f"{prefix}.evt.ext.batcher.thing_happened",
        ]
        _, headers, data = ext.seen[0]
        assert headers["ce-id"] == headers["Nats-Msg-Id"] == event_id
        assert headers["ce-type"] == "com.example.order.created"
        assert data == {"order": 42}
        assert cmds.seen[0][1]["ce-type"] == "io.corral.service.scale"
        assert cmds.seen[0][2] == {"replicas": 4}
    finally:
        await ext.close()
        await cmds.close()


async def _first_lines(lines, until: str, within: float = 10.0) -> list[str]:
    seen: list[str] = []

    async def read() -> list[str]:
        async for line in lines:
            seen.append(line)
            if line.startswith(until):
                return seen
        return seen

    return await asyncio.wait_for(read(), within)


async def test_event_stream(settings, bus, api) -> None:
    async with api.client.stream(
        "GET",
        "/v1/events/stream",
        params={"subject": "evt.ext.>", "type": "com.example.*"},
        headers=auth(READ),
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        await _first_lines(lines, ": stream of")  # subscribed from here on
        for ce_type in ("other.thing", "com.example.ping"):
            sent = await api.client.post(
                "/v1/cloudevents", json={"n": 1}, headers=binary_headers(ce_type, ce_type)
            )
            assert sent.status_code == 202
        got = await _first_lines(lines, "data:")
        assert got[-3:] == [
            "id: com.example.ping",
            "event: com.example.ping",
            got[-1],
        ]
        event = json.loads(got[-1].removeprefix("data: "))
        assert event["type"] == "com.example.ping"
        assert event["data"] == {"n": 1}
    metrics = api.client

    async def closed() -> bool:
        text = (await metrics.get("/metrics")).text
        return "corral_gateway_event_streams 0.0" in text

    await eventually(closed, what="the stream closed after the client left")

    bad = await api.client.get("/v1/events/stream", params={"subject": "cmd.>"}, headers=auth(READ))
    assert bad.status_code == 422


async def test_stopping_the_gateway_ends_open_streams(settings, bus) -> None:
    async with (
        running_gateway(settings, bus) as api,
        api.client.stream("GET", "/v1/events/stream", headers=auth(READ)) as response,
    ):
        lines = response.aiter_lines()
        await _first_lines(lines, ": stream of")
        await asyncio.wait_for(api.worker.stop(), 10)
        rest = await asyncio.wait_for(_drain(lines), 10)
        assert all(not line.startswith("data:") for line in rest)


async def _drain(lines) -> list[str]:
    return [line async for line in lines]


async def test_http_client_sees_json_errors_for_bad_json(settings, bus, api) -> None:
    response = await api.client.post(
        "/v1/services",
        content=b"{not json",
        headers={**auth(DEPLOY), "content-type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid"


async def test_a_lost_bus_is_503_not_500(settings) -> None:
    from corral.bus.connection import Bus
    from corral.services.gateway.app import create_app

    lost = await Bus.connect(settings, name="test-lost")
    await lost.close()
    app = create_app(settings, lost, CONFIG)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        health = await client.get("/healthz")
        assert health.status_code == 503
        assert health.json() == {"status": "degraded", "nats": False}
        listed = await client.get("/v1/services", headers=auth(READ))
        assert listed.status_code == 503, listed.text
        assert listed.json()["error"]["code"] == "unavailable"
        sent = await client.post(
            "/v1/services/web/scale", json={"replicas": 1}, headers=auth(DEPLOY)
        )
        assert sent.status_code == 503, sent.text
