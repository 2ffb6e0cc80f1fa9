"""Prometheus metrics of one gateway (its own registry, so several can live in a process),
and the ASGI middleware that counts requests by route template and status."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "corral_gateway_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "corral_gateway_request_seconds",
            "time to answer an HTTP request (a stream: until it ends)",
            ["method", "route"],
            registry=r,
        )
        self.commands = Counter(
            "corral_gateway_commands",
            "commands published, and their outcome when the caller waited",
            ["verb", "outcome"],
            registry=r,
        )
        self.events = Counter(
            "corral_gateway_events_published",
            "events published from CloudEvents and webhooks",
            ["source", "duplicate"],
            registry=r,
        )
        self.webhooks = Counter(
            "corral_gateway_webhooks",
            "webhook deliveries: verified, rejected (bad or missing signature) or off",
            ["source", "result"],
            registry=r,
        )
        self.streams = Gauge(
            "corral_gateway_event_streams", "open server-sent event streams", registry=r
        )


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status[0])).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
