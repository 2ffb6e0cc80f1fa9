"""The webhooks through real HTTP against the real nats-server: each publishes exactly its
events, deduplicated, and nothing at all when its signature is missing or wrong."""

from __future__ import annotations

import json

import pytest
from gateway_payloads import ALERTMANAGER
from gateway_support import (
    ADMIN,
    ALERTMANAGER_TOKEN,
    CONFIG,
    GITHUB_SECRET,
    GITLAB_TOKEN,
    HOOK_SECRET,
    READ,
    auth,
    record,
    running_gateway,
)
from support import eventually

from corral.services.gateway.config import GatewayConfig
from corral.services.gateway.signatures import sign

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def api(settings, bus):
    async with running_gateway(settings, bus) as running:
        yield running


def github_headers(body: bytes, event: str, delivery: str, secret: bytes = GITHUB_SECRET):
    return {
        "content-type": "application/json",
        "x-github-event": event,
        "x-github-delivery": delivery,
        "x-hub-signature-256": sign(secret, body),
    }


async def test_github_webhook(settings, bus, api) -> None:
    published = await record(bus, f"{settings.prefix}.evt.ext.>")
    try:
        push = {
            "ref": "refs/heads/main",
            "repository": {"full_name": "octo/shop", "html_url": "https://github.com/octo/shop"},
        }
        body = json.dumps(push).encode()
        wrong = await api.client.post(
            "/v1/hooks/github", content=body, headers=github_headers(body, "push", "d1", b"nope")
        )
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "bad_signature"
        unsigned = github_headers(body, "push", "d1")
        del unsigned["x-hub-signature-256"]
        assert (
            await api.client.post("/v1/hooks/github", content=body, headers=unsigned)
        ).status_code == 401
        tampered = await api.client.post(
            "/v1/hooks/github", content=body + b" ", headers=github_headers(body, "push", "d1")
        )
        assert tampered.status_code == 401

        ok = await api.client.post(
            "/v1/hooks/github", content=body, headers=github_headers(body, "push", "d1")
        )
        assert ok.status_code == 202, ok.text
        subject = f"{settings.prefix}.evt.ext.github.push"
        assert ok.json() == {
            "events": [{"id": "github-d1", "subject": subject, "duplicate": False}]
        }
        again = await api.client.post(
            "/v1/hooks/github", content=body, headers=github_headers(body, "push", "d1")
        )
        assert again.json()["events"][0]["duplicate"] is True
        run = await api.client.post(
            "/v1/hooks/github", content=b"{}", headers=github_headers(b"{}", "workflow_run", "d2")
        )
        assert run.status_code == 202

        await eventually(lambda: len(published.seen) == 2, what="two github events")
        assert published.ids() == ["github-d1", "github-d2"]
        first_subject, headers, data = published.seen[0]
        assert first_subject == subject
        assert headers["ce-type"] == "io.corral.ext.github.push"
        assert headers["ce-subject"] == "octo/shop"
        assert data == push
        assert published.seen[1][0] == f"{settings.prefix}.evt.ext.github.workflow_run"
    finally:
        await published.close()


async def test_gitlab_alertmanager_and_generic_hooks(settings, bus, api) -> None:
    published = await record(bus, f"{settings.prefix}.evt.ext.>")
    try:
        client = api.client
        mr = json.dumps({"object_kind": "merge_request", "project": {"path_with_namespace": "g/a"}})
        gitlab = {"x-gitlab-event": "Merge Request Hook", "x-gitlab-event-uuid": "u1"}
        assert (
            await client.post(
                "/v1/hooks/gitlab", content=mr, headers={**gitlab, "x-gitlab-token": "nope"}
            )
        ).status_code == 401
        assert (
            await client.post("/v1/hooks/gitlab", content=mr, headers=gitlab)
        ).status_code == 401
        ok = await client.post(
            "/v1/hooks/gitlab",
            content=mr,
            headers={**gitlab, "x-gitlab-token": GITLAB_TOKEN.decode()},
        )
        assert ok.status_code == 202, ok.text

        alerts = json.dumps(ALERTMANAGER)
        assert (
            await client.post("/v1/hooks/alertmanager", content=alerts, headers=auth("wrong"))
        ).status_code == 401
        assert (
            await client.post("/v1/hooks/alertmanager", content=alerts, headers=auth(ADMIN))
        ).status_code == 401  # an API token is not the Alertmanager's
        am = await client.post(
            "/v1/hooks/alertmanager", content=alerts, headers=auth(ALERTMANAGER_TOKEN.decode())
        )
        assert am.status_code == 202, am.text
        assert [e["subject"].rsplit(".", 1)[-1] for e in am.json()["events"]] == [
            "firing",
            "resolved",
        ]
        repeat = await client.post(
            "/v1/hooks/alertmanager", content=alerts, headers=auth(ALERTMANAGER_TOKEN.decode())
        )
        assert [e["duplicate"] for e in repeat.json()["events"]] == [True, True]

        paid = b'{"invoice": 7}'
        signed = {"x-corral-signature": sign(HOOK_SECRET, paid), "x-corral-event": "invoice_paid"}
        assert (
            await client.post(
                "/v1/hooks/billing", content=paid, headers={"x-corral-signature": "sha256=00"}
            )
        ).status_code == 401
        assert (await client.post("/v1/hooks/billing", content=paid)).status_code == 401
        hooked = await client.post("/v1/hooks/billing", content=paid, headers=signed)
        assert hooked.status_code == 202, hooked.text
        unknown = await client.post("/v1/hooks/payroll", content=paid, headers=signed)
        assert unknown.status_code == 404
        assert "CORRAL_HOOK_SECRETS" in unknown.json()["error"]["message"]

        await eventually(lambda: len(published.seen) == 4, what="four events")
        assert [s.removeprefix(f"{settings.prefix}.") for s, _, _ in published.seen] == [
            "evt.ext.gitlab.merge_request",
            "evt.ext.alertmanager.firing",
            "evt.ext.alertmanager.resolved",
            "evt.ext.billing.invoice_paid",
        ]
        assert published.seen[0][1]["ce-id"] == "gitlab-u1"
        assert published.seen[1][2]["labels"]["alertname"] == "HighLatency"
        assert published.seen[3][2] == {"invoice": 7}
    finally:
        await published.close()


async def test_unconfigured_webhooks_are_off(settings, bus) -> None:
    async with running_gateway(settings, bus, GatewayConfig(tokens=CONFIG.tokens)) as api:
        published = await record(bus, f"{settings.prefix}.evt.ext.>")
        try:
            for path, variable in (
                ("github", "CORRAL_GITHUB_SECRET"),
                ("gitlab", "CORRAL_GITLAB_TOKEN"),
                ("alertmanager", "CORRAL_ALERTMANAGER_TOKEN"),
                ("billing", "CORRAL_HOOK_SECRETS"),
            ):
                response = await api.client.post(
                    f"/v1/hooks/{path}", content=b"{}", headers=github_headers(b"{}", "push", "d")
                )
                assert response.status_code == 404, path
                error = response.json()["error"]
                assert error["code"] == "hook_not_configured"
                assert variable in error["message"]
            await bus.nc.flush()
            assert published.seen == []
        finally:
            await published.close()


async def test_metrics_count_requests_and_webhooks(settings, bus, api) -> None:
    body = b"{}"
    await api.client.post(
        "/v1/hooks/github", content=body, headers=github_headers(body, "push", "m1")
    )
    await api.client.post(
        "/v1/hooks/github", content=body, headers=github_headers(body, "push", "m2", b"bad")
    )
    await api.client.get("/v1/services/web", headers=auth(READ))
    text = (await api.client.get("/metrics")).text
    assert 'corral_gateway_webhooks_total{result="verified",source="github"} 1.0' in text
    assert 'corral_gateway_webhooks_total{result="rejected",source="github"} 1.0' in text
    assert (
        'corral_gateway_requests_total{method="GET",route="/v1/services/{name}",status="404"} 1.0'
        in text
    )
    assert 'corral_gateway_events_published_total{duplicate="false",source="github"} 1.0' in text
