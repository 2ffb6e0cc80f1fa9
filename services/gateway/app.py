"""`create_app`: the gateway's FastAPI app over one bus connection.

- open: `GET /healthz`, `GET /metrics`, `GET /openapi.json`;
- read: `GET /v1/services`, `/v1/services/{name}`, `/v1/nodes`, `/v1/events`,
  `/v1/events/stream`;
- deploy: `POST /v1/services`, `/v1/services/{name}/scale`, `/rollback`, `/promote`,
  `/v1/cloudevents`;
- admin: `DELETE /v1/services/{name}`;
- the webhook's own secret: `POST /v1/hooks/github`, `/gitlab`, `/alertmanager`, `/{name}`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from corral.bus.connection import Bus
from corral.bus.settings import Settings
from corral.services.chatops import routes as chat_routes
from corral.services.chatops.handlers import ChatOps
from corral.services.gateway import errors, hooks, ingress, rest, streaming
from corral.services.gateway.bodylimit import BodyLimitMiddleware
from corral.services.gateway.config import GatewayConfig
from corral.services.gateway.limits import RateLimiter
from corral.services.gateway.metrics import GatewayMetrics, MetricsMiddleware
from corral.services.gateway.publishing import Publisher
from corral.services.gateway.state import Gateway

DESCRIPTION = """Corral's HTTP API. Commands are sent as command events on the bus, like the
CLI's: the answer carries the command id, and with `?wait=true` the api worker's outcome.
Authenticate with `Authorization: Bearer <token>`; scopes are read < deploy < admin."""


def create_app(
    settings: Settings,
    bus: Bus,
    config: GatewayConfig,
    *,
    metrics: GatewayMetrics | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    metrics = metrics or GatewayMetrics()
    state = Gateway(
        settings=settings,
        bus=bus,
        config=config,
        metrics=metrics,
        limiter=RateLimiter(settings.gateway_rate_limit, settings.gateway_rate_burst),
        publisher=Publisher(bus, metrics),
        clock=clock,
    )
    app = FastAPI(
        title="Corral gateway",
        version="1",
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
    )
    app.state.gateway = state
    app.state.chatops = ChatOps(settings, bus, config.chat)
    errors.install(app)
    app.include_router(rest.router)
    app.include_router(streaming.router)
    app.include_router(ingress.router)
    app.include_router(hooks.router)
    app.include_router(chat_routes.router)

    @app.get("/healthz", tags=["meta"], summary="Liveness, and whether NATS is connected")
    async def healthz(request: Request) -> JSONResponse:
        connected = bool(bus.nc.is_connected)
        return JSONResponse(
            {"status": "ok" if connected else "degraded", "nats": connected},
            status_code=200 if connected else 503,
        )

    @app.get("/metrics", tags=["meta"], summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # the last added runs first: count every answer, the body limit's 413s included
    app.add_middleware(BodyLimitMiddleware, max_body=settings.gateway_max_body)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def gateway_of(app: FastAPI) -> Gateway:
    state: Gateway = app.state.gateway
    return state
