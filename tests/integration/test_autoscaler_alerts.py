"""The autoscaler and Alertmanager alerts on a real nats-server, with the control plane
in-process and the gateway on a real uvicorn: an Alertmanager webhook posted to the gateway
scales a service to the alert metric's floor, and the decision names the alert; once resolved
the proposal goes and the service scales back down through its stabilisation window. An
autoscaler started after an alert fired learns of it from the events stream. Bad alert events
are counted and skipped, never fatal."""

from __future__ import annotations

import json
from typing import Any

import pytest
from gateway_support import ALERTMANAGER_TOKEN, auth, running_gateway
from support import collect, command, eventually

from corral.bus.codec import encode
from corral.bus.settings import Settings
from corral.schemas.envelope import utcnow
from corral.services.gateway import external
from corral.workers.autoscaler.worker import AutoscalerWorker

pytestmark = pytest.mark.timeout(60)
WORKERS = ("api", "deployer", "scheduler", "autoscaler")
FAKE = {"node_id": "sim", "driver": "fake", "capacity": {"cpu": 64, "memory": "64Gi"}}
ALERT = {"type": "alert", "alertname": "HighLatency", "match": {"service": "web"}, "replicas": 4}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"autoscale_poll_interval": 0.2, "metrics_interval": 0.2})


def spec(replicas: int, autoscale: dict[str, Any]) -> dict[str, Any]:
    return {"replicas": replicas, "command": ["sleep", "600"], "autoscale": autoscale}


def webhook(status: str, *alerts: tuple[str, dict[str, str]]) -> dict[str, Any]:
    """An Alertmanager v4 webhook payload with these (fingerprint, labels) alerts."""
    ends = "2026-11-27T07:00:00Z" if status == "resolved" else "0001-01-01T00:00:00Z"
    return {
        "version": "4",
        "groupKey": '{}:{alertname="HighLatency"}',
        "status": status,
        "receiver": "corral",
        "groupLabels": {"alertname": "HighLatency"},
        "externalURL": "http://alertmanager.example:9093",
        "alerts": [
            {
                "status": status,
                "labels": {"alertname": "HighLatency", **labels},
                "annotations": {"summary": "p99 latency over 500ms"},
                "startsAt": "2026-11-27T06:00:00Z",
                "endsAt": ends,
                "generatorURL": "http://prometheus.example/graph",
                "fingerprint": fingerprint,
            }
            for fingerprint, labels in alerts
        ],
    }


async def send(bus: Any, payload: dict[str, Any]) -> None:
    """Publish a webhook's events exactly as the gateway does (its pure mapping, then the
    events stream)."""
    for out in external.alertmanager(bus.names, payload):
        headers, body = encode(out.event)
        await bus.js.publish(out.subject, body, headers=headers, stream=bus.names.evt_stream)


async def post(api: Any, payload: dict[str, Any]) -> None:
    """Through the real gateway, as Alertmanager sends it."""
    token = auth(ALERTMANAGER_TOKEN.decode())
    answer = await api.client.post("/v1/hooks/alertmanager", json=payload, headers=token)
    assert answer.status_code == 202, answer.text


async def desired(bus: Any, service: str) -> int:
    item = await bus.buckets.services.get(service)
    return -1 if item is None else int(item.value.spec.replicas)


async def desired_is(bus: Any, service: str, count: int) -> bool:
    return await desired(bus, service) == count


def autoscaler(host: Any) -> AutoscalerWorker:
    return next(w for w in host.workers if isinstance(w, AutoscalerWorker))


def decisions(seen: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [json.loads(text) for _, text in seen]


async def test_a_firing_alert_scales_to_its_floor_and_back_once_resolved(
    settings, bus, control_plane
) -> None:
    policy = {
        "min": 1,
        "max": 6,
        "metrics": [ALERT],
        "behavior": {"scale_down": {"stabilization_window": "2s"}},
    }
    seen = await collect(bus, bus.names.evt("autoscale", "web", "decision"))
    async with (
        control_plane(workers=WORKERS, agents=[FAKE]) as host,
        running_gateway(settings, bus) as api,
    ):
        await command(bus, "deploy", "web", spec(1, policy))
        await eventually(lambda: decisions(seen), what="a first decision")
        worker = autoscaler(host)
        await eventually(lambda: worker.alerts_synced, what="the stored alerts read (none)")
        # another service's alert, and events that are no alerts: skipped, counted
        await post(api, webhook("firing", ("api1", {"service": "api"})))
        subject = bus.names.evt("ext", "alertmanager", "firing")
        await bus.js.publish(subject, b"not a cloudevent", stream=bus.names.evt_stream)
        bad = external.alertmanager(bus.names, webhook("firing", ("x", {"service": "web"})))[0]
        headers, _ = encode(bad.event)
        await bus.js.publish(subject, b'{"status": "firing"}', headers=headers)
        await eventually(lambda: worker.invalid_alerts == 2, what="two bad events counted")
        await eventually(lambda: len(worker.alerts) == 1, what="the api alert kept")
        assert await desired(bus, "web") == 1

        await post(api, webhook("firing", ("fp-web-1", {"service": "web", "pod": "a"})))
        await eventually(lambda: desired_is(bus, "web", 4), within=5, what="a scale to 4")
        [up] = [d for d in decisions(seen) if d["action"] == "scale_up"]
        assert (up["current"], up["desired"]) == (1, 4)
        assert up["trigger"] == "alert HighLatency firing"
        assert "alert HighLatency firing (fingerprint fp-web-1): at least 4" in up["reason"]
        [proposal] = up["proposals"]
        assert proposal["metric"] == "alert HighLatency{service=web}"
        assert proposal["replicas"] == 4

        await post(api, webhook("resolved", ("fp-web-1", {"service": "web", "pod": "a"})))
        held = await eventually(
            lambda: [d for d in decisions(seen) if d["code"] == "stabilized" and d["current"] == 4],
            within=5,
            what="the scale-down held by the window",
        )
        assert held[0]["trigger"] == "alert HighLatency resolved"
        assert held[0]["proposals"][0]["note"] == "alert HighLatency not firing"
        assert held[0]["desired"] == 4
        await eventually(lambda: desired_is(bus, "web", 1), within=10, what="back to 1")
        [down] = [d for d in decisions(seen) if d["action"] == "scale_down"]
        assert (down["current"], down["desired"]) == (4, 1)
    await seen.close()


async def test_an_autoscaler_started_after_the_alert_fired_still_sees_it(
    settings, bus, control_plane
) -> None:
    # the alert fired before any autoscaler ran: the events stream holds it
    await send(bus, webhook("firing", ("early", {"service": "late"})))
    await send(bus, webhook("firing", ("gone", {"service": "late"})))
    await send(bus, webhook("resolved", ("gone", {"service": "late"})))
    policy = {
        "min": 1,
        "max": 5,
        "metrics": [{**ALERT, "match": {"service": "late"}, "replicas": 3}],
    }
    seen = await collect(bus, bus.names.evt("autoscale", "late", "decision"))
    async with control_plane(workers=WORKERS, agents=[FAKE]) as host:
        await command(bus, "deploy", "late", spec(1, policy))
        await eventually(lambda: desired_is(bus, "late", 3), within=5, what="a scale to 3")
        assert autoscaler(host).alerts_synced
        assert [
            a.fingerprint
            for a in autoscaler(host).alerts.matching(policy_metric(host, "late"), utcnow())
        ] == ["early"]
        [up] = [d for d in decisions(seen) if d["action"] == "scale_up"]
        assert "(fingerprint early): at least 3" in up["reason"]
    await seen.close()


def policy_metric(host: Any, service: str) -> Any:
    record = autoscaler(host).services.get(service)
    assert record is not None
    assert record.spec.autoscale is not None
    return record.spec.autoscale.metrics[0]
