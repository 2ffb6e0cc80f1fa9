"""What every route shares: one `Gateway` per app, and the auth-and-rate-limit dependency."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from corral.bus.connection import Bus
from corral.bus.settings import Settings
from corral.services.gateway.auth import HOW_TO_CONFIGURE, Principal, Scope
from corral.services.gateway.config import GatewayConfig
from corral.services.gateway.errors import ApiError
from corral.services.gateway.limits import RateLimiter, retry_after
from corral.services.gateway.metrics import GatewayMetrics
from corral.services.gateway.publishing import Publisher

LOCAL = Principal("local", Scope.ADMIN)


@dataclass
class Gateway:
    settings: Settings
    bus: Bus
    config: GatewayConfig
    metrics: GatewayMetrics
    limiter: RateLimiter
    publisher: Publisher
    clock: Callable[[], float] = time.monotonic
    keepalive: float = 15.0
    """seconds between comment lines on an idle event stream"""
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    streams: set[asyncio.Queue[Any]] = field(default_factory=set)

    def stop_streams(self) -> None:
        """End every open event stream (the gateway is stopping)."""
        self.stopping.set()
        for queue in list(self.streams):
            # a full queue's reader is busy, and checks `stopping` before each event
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    def throttle(self, key: str) -> None:
        wait = self.limiter.acquire(key, self.clock())
        if wait > 0:
            raise ApiError(
                429,
                f"rate limit of {self.limiter.rate:g} requests/s (burst {self.limiter.burst}) "
                f"reached; retry in {retry_after(wait)} s",
                headers={"Retry-After": retry_after(wait)},
            )


def gateway(request: Request) -> Gateway:
    state: Gateway = request.app.state.gateway
    return state


bearer = HTTPBearer(
    auto_error=False,
    description="an API token from CORRAL_GATEWAY_TOKENS; its scope is read, deploy or admin",
)


def authenticate(gw: Gateway, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    if gw.config.open_locally:
        return LOCAL
    challenge = {"WWW-Authenticate": 'Bearer realm="corral"'}
    if not gw.config.tokens:
        raise ApiError(
            401,
            f"no API tokens are configured on this gateway: {HOW_TO_CONFIGURE}; or start "
            "`corral up --insecure-local` to let local callers in without one",
            code="auth_not_configured",
            headers=challenge,
        )
    if credentials is None:
        raise ApiError(401, "send `Authorization: Bearer <token>`", headers=challenge)
    principal = gw.config.tokens.authenticate(credentials.credentials)
    if principal is None:
        raise ApiError(401, "unknown API token", headers=challenge)
    return principal


def require(needed: Scope) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller, once authenticated, allowed `needed` and within its rate."""

    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        gw = gateway(request)
        principal = authenticate(gw, credentials)
        if not principal.allows(needed):
            raise ApiError(
                403,
                f"token {principal.name!r} has scope {principal.scope.label}; this needs "
                f"{needed.label}",
                headers={
                    "WWW-Authenticate": f'Bearer error="insufficient_scope" scope="{needed.label}"'
                },
            )
        gw.throttle(f"token:{principal.name}")
        request.state.principal = principal
        return principal

    return dependency
