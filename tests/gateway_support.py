"""Helpers for the gateway's tests: a real uvicorn on 127.0.0.1 (a free port) over the test's
bus, tokens of every scope, signed webhook requests, and a recorder of published events."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from corral.bus.connection import Bus
from corral.bus.settings import Settings
from corral.services.gateway.auth import TokenTable, parse_tokens
from corral.services.gateway.config import GatewayConfig
from corral.services.gateway.worker import GatewayWorker
from corral.workers.runtime import Context

READ = "read-token-0123456789"
DEPLOY = "deploy-token-0123456789"
ADMIN = "admin-token-0123456789"
GITHUB_SECRET = b"github-webhook-secret"
GITLAB_TOKEN = b"gitlab-webhook-token"
ALERTMANAGER_TOKEN = b"alertmanager-bearer-token"
HOOK_SECRET = b"billing-hook-secret"

CONFIG = GatewayConfig(
    tokens=TokenTable(parse_tokens(f"viewer:{READ}:read,ci:{DEPLOY}:deploy,ops:{ADMIN}:admin")),
    github_secret=GITHUB_SECRET,
    gitlab_token=GITLAB_TOKEN,
    alertmanager_token=ALERTMANAGER_TOKEN,
    hooks={"billing": HOOK_SECRET},
)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Api:
    worker: GatewayWorker
    client: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.worker.url


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, bus: Bus, config: GatewayConfig = CONFIG, **overrides: Any
) -> AsyncIterator[Api]:
    local = settings.model_copy(update={"gateway_port": 0, **overrides})
    worker = GatewayWorker(Context(settings=local, bus=bus), config)
    await worker.start()
    try:
        async with httpx.AsyncClient(base_url=worker.url, timeout=20.0) as client:
            yield Api(worker, client)
    finally:
        await worker.stop()


class Published:
    """Every message JetStream stored under a subject filter, in stream order (a duplicate
    that JetStream dropped is not among them)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], Any]] = []
        self.sub: Any = None

    async def on_msg(self, msg: Msg) -> None:
        data = json.loads(msg.data) if msg.data else None
        self.seen.append((msg.subject, dict(msg.headers or {}), data))

    def ids(self) -> list[str]:
        return [headers.get("ce-id", "") for _, headers, _ in self.seen]

    async def close(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()
            self.sub = None


async def record(bus: Bus, subject: str) -> Published:
    published = Published()
    published.sub = await bus.js.subscribe(
        subject,
        cb=published.on_msg,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    return published
