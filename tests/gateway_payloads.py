"""Webhook payloads the gateway's tests send, as their senders document them."""

from __future__ import annotations

from typing import Any

# Alertmanager's webhook payload, version 4, with the fields its documentation lists
# (https://prometheus.io/docs/alerting/latest/configuration/#webhook_config)
ALERTMANAGER: dict[str, Any] = {
    "version": "4",
    "groupKey": '{}/{severity="critical"}:{alertname="HighLatency"}',
    "truncatedAlerts": 0,
    "status": "firing",
    "receiver": "corral",
    "groupLabels": {"alertname": "HighLatency"},
    "commonLabels": {"alertname": "HighLatency", "severity": "critical", "service": "web"},
    "commonAnnotations": {"summary": "p99 latency above 500ms"},
    "externalURL": "http://alertmanager.example.org:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "HighLatency",
                "severity": "critical",
                "service": "web",
                "instance": "10.0.0.1:8080",
            },
            "annotations": {"summary": "p99 latency above 500ms"},
            "startsAt": "2024-05-01T10:00:00.000Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example.org:9090/graph?g0.expr=latency",
            "fingerprint": "1a30ba71cca2921f",
        },
        {
            "status": "resolved",
            "labels": {
                "alertname": "HighLatency",
                "severity": "critical",
                "service": "web",
                "instance": "10.0.0.2:8080",
            },
            "annotations": {"summary": "p99 latency above 500ms"},
            "startsAt": "2024-05-01T09:50:00.000Z",
            "endsAt": "2024-05-01T10:01:00.000Z",
            "generatorURL": "http://prometheus.example.org:9090/graph?g0.expr=latency",
            "fingerprint": "bc97ff14869b13e3",
        },
    ],
}
