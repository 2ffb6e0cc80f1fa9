"""Webhook payloads -> the events Corral publishes: subjects, types, ids for deduplication;
Alertmanager's documented v4 payload."""

from __future__ import annotations

import json
from typing import Any

import pytest
from gateway_payloads import ALERTMANAGER

from corral.bus.names import Names
from corral.schemas.errors import InvalidInput
from corral.services.gateway import external

NAMES = Names("corral")

PUSH = {
    "ref": "refs/heads/main",
    "after": "abc123",
    "repository": {"full_name": "octo/shop", "html_url": "https://github.com/octo/shop"},
}


def test_github_push() -> None:
    body = json.dumps(PUSH).encode()
    out = external.github(NAMES, "push", "72d3162e-cc78-11e3-81ab-4c9367dc0958", body, PUSH)
    assert out.subject == "corral.evt.ext.github.push"
    assert out.event.type == "io.corral.ext.github.push"
    assert out.event.id == "github-72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert out.event.source == "https://github.com/octo/shop"
    assert out.event.subject == "octo/shop"
    assert out.event.data == PUSH


def test_github_other_events_and_missing_ids() -> None:
    body = b'{"zen": "Keep it logically awesome."}'
    ping = external.github(NAMES, "ping", None, body, json.loads(body))
    assert ping.subject == "corral.evt.ext.github.ping"
    assert ping.event.source == "https://github.com"
    again = external.github(NAMES, "ping", "not a valid id!", body, json.loads(body))
    assert ping.event.id == again.event.id  # the same body: the same id, deduplicated
    run = external.github(NAMES, "workflow_run", "d1", b"{}", {})
    assert run.subject == "corral.evt.ext.github.workflow_run"
    with pytest.raises(InvalidInput, match="X-GitHub-Event"):
        external.github(NAMES, None, "d1", b"{}", {})


def test_gitlab() -> None:
    payload = {
        "object_kind": "merge_request",
        "project": {"path_with_namespace": "g/app", "web_url": "https://gitlab.example.com/g/app"},
    }
    out = external.gitlab(NAMES, "Merge Request Hook", "uuid-1", b"{}", payload)
    assert out.subject == "corral.evt.ext.gitlab.merge_request"
    assert out.event.id == "gitlab-uuid-1"
    assert out.event.subject == "g/app"
    fallback = external.gitlab(NAMES, "Push Hook", None, b"{}", {})
    assert fallback.subject == "corral.evt.ext.gitlab.push"
    assert fallback.event.id.startswith("gitlab-")


def test_alertmanager_documented_payload() -> None:
    events = external.alertmanager(NAMES, ALERTMANAGER)
    assert [e.subject for e in events] == [
        "corral.evt.ext.alertmanager.firing",
        "corral.evt.ext.alertmanager.resolved",
    ]
    firing = events[0].event
    assert firing.type == "io.corral.ext.alertmanager.firing"
    assert firing.subject == "HighLatency"
    assert firing.source == "http://alertmanager.example.org:9093"
    assert firing.data["labels"]["service"] == "web"
    assert firing.data["fingerprint"] == "1a30ba71cca2921f"
    assert firing.data["groupKey"] == ALERTMANAGER["groupKey"]
    assert firing.data["receiver"] == "corral"
    # the same group, alert and status: the same id; another status: another id
    again = external.alertmanager(NAMES, ALERTMANAGER)
    assert [e.event.id for e in again] == [e.event.id for e in events]
    resolved = json.loads(json.dumps(ALERTMANAGER))
    resolved["alerts"][0]["status"] = "resolved"
    assert external.alertmanager(NAMES, resolved)[0].event.id != firing.id
    assert firing.id == external.alert_event_id(
        ALERTMANAGER["groupKey"], "1a30ba71cca2921f", "firing"
    )


def test_alertmanager_without_fingerprint_hashes_the_labels() -> None:
    payload = json.loads(json.dumps(ALERTMANAGER))
    del payload["alerts"][0]["fingerprint"]
    first = external.alertmanager(NAMES, payload)[0].event
    assert first.data["fingerprint"]
    assert external.alertmanager(NAMES, payload)[0].event.id == first.id


@pytest.mark.parametrize(
    "change",
    [
        {"version": "3"},
        {"status": "weird"},
        {"alerts": "nope"},
        {"alerts": [{"status": "firing", "labels": {"a": 1}}]},
    ],
)
def test_alertmanager_rejects_other_payloads(change: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match="Alertmanager v4"):
        external.alertmanager(NAMES, {**ALERTMANAGER, **change})
    with pytest.raises(InvalidInput):
        external.alertmanager(NAMES, [1, 2])


def test_generic_hook() -> None:
    out = external.hook(NAMES, "billing", "invoice-paid", "d-1", b"{}", {"amount": 3})
    assert out.subject == "corral.evt.ext.billing.invoice-paid"
    assert out.event.type == "io.corral.ext.billing.invoice-paid"
    assert out.event.id == "hook-billing-d-1"
    default = external.hook(NAMES, "billing", None, None, b"{}", {})
    assert default.subject == "corral.evt.ext.billing.received"


def test_json_bodies() -> None:
    assert external.json_body(b'{"a": 1}') == {"a": 1}
    assert external.json_body(
        b"payload=%7B%22a%22%3A+1%7D", "application/x-www-form-urlencoded"
    ) == {"a": 1}
    with pytest.raises(InvalidInput, match="not valid JSON"):
        external.json_body(b"{nope")
    with pytest.raises(InvalidInput, match="payload"):
        external.json_body(b"x=1", "application/x-www-form-urlencoded")
