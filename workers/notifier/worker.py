"""The notifier's thin handler: a shared durable consumer on the chosen event subjects; each
event becomes a message (`selection`), passes the rate limit (`throttle`), and is posted to
every configured incoming webhook. A chat that is down (5xx, no answer) gets the message again
later (the event is redelivered); one that refuses it (4xx) is logged and skipped."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from corral.bus.codec import decode
from corral.bus.edge import deliveries, headers_of
from corral.bus.lifecycle import Loops, unsubscribe_quietly
from corral.schemas.errors import InvalidInput
from corral.workers.notifier.selection import DEFAULT_KINDS, notice, parse_kinds, subjects
from corral.workers.notifier.throttle import Throttle, with_folded
from corral.workers.runtime import Context

log = logging.getLogger(__name__)
MAX_DELIVER = 8


class NotifierConfigError(InvalidInput):
    """A notifier setting is wrong; `corral up` says which and exits 2."""


class NotifierSecrets(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    notify_slack_url: SecretStr | None = None
    notify_mattermost_url: SecretStr | None = None
    notify_events: str | None = None
    notify_rate: float = Field(default=20.0, gt=0, description="messages per minute")
    notify_burst: int = Field(default=5, ge=1)
    notify_repeat: float = Field(default=60.0, ge=0, description="fold the same news within")


@dataclass(frozen=True)
class Destination:
    platform: str
    url: str = field(repr=False)
    """an incoming webhook URL is a secret: it is never logged"""


@dataclass(frozen=True)
class NotifierConfig:
    destinations: tuple[Destination, ...] = ()
    kinds: tuple[str, ...] = DEFAULT_KINDS
    per_minute: float = 20.0
    burst: int = 5
    repeat: float = 60.0

    @classmethod
    def from_env(cls) -> NotifierConfig:
        try:
            secrets = NotifierSecrets()
            kinds = parse_kinds(secrets.notify_events)
        except (ValidationError, ValueError) as exc:
            raise NotifierConfigError(f"invalid notifier setting: {exc}") from None
        destinations = []
        for platform, url in (
            ("slack", secrets.notify_slack_url),
            ("mattermost", secrets.notify_mattermost_url),
        ):
            if url is not None and url.get_secret_value().strip():
                value = url.get_secret_value().strip()
                if not value.startswith(("https://", "http://")):
                    raise NotifierConfigError(
                        f"CORRAL_NOTIFY_{platform.upper()}_URL must be an http(s) URL"
                    )
                destinations.append(Destination(platform, value))
        return cls(
            tuple(destinations),
            kinds,
            secrets.notify_rate,
            secrets.notify_burst,
            secrets.notify_repeat,
        )


class ChatDown(Exception):
    """The chat did not take the message; try again later."""


class Poster(Protocol):
    async def post(self, url: str, message: dict[str, Any]) -> None:
        """Raise ChatDown when it should be retried."""


class HttpPoster:
    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.client: httpx.AsyncClient | None = None

    async def post(self, url: str, message: dict[str, Any]) -> None:
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        try:
            response = await self.client.post(url, json=message)
        except httpx.HTTPError as exc:
            raise ChatDown(f"{exc.__class__.__name__}") from None
        if response.status_code >= 500 or response.status_code == 429:
            raise ChatDown(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            log.warning("the chat refused a notification: HTTP %d", response.status_code)

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


class NotifierWorker:
    name = "notifier"

    def __init__(
        self, ctx: Context, config: NotifierConfig, *, poster: Poster | None = None
    ) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.config = config
        self.poster: Poster = poster or HttpPoster()
        self.throttles = {
            d.platform: Throttle(config.per_minute, config.burst, config.repeat)
            for d in config.destinations
        }
        self.loops = Loops("notifier")
        self._sub: JetStreamContext.PullSubscription | None = None
        self._delivered: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.sent = 0
        self.held_back = 0

    def register(self, broker: NatsBroker) -> None:
        return None

    async def start(self) -> None:
        if not self.config.destinations:
            log.info("notifier: no CORRAL_NOTIFY_SLACK_URL or CORRAL_NOTIFY_MATTERMOST_URL; idle")
            return
        names = self.bus.names
        filters = subjects(names.prefix, self.config.kinds)
        self._sub = await self.bus.js.pull_subscribe(
            filters[0],
            durable=f"{names.prefix}-notifier",
            stream=names.evt_stream,
            config=ConsumerConfig(
                ack_wait=60,
                max_deliver=MAX_DELIVER,
                deliver_policy=DeliverPolicy.NEW,
                filter_subjects=filters if len(filters) > 1 else None,
            ),
        )
        self.loops.spawn(self._consume(), "events")

    async def stop(self) -> None:
        await self.loops.stop()
        if self._sub is not None:
            await unsubscribe_quietly(self._sub)
            self._sub = None
        if isinstance(self.poster, HttpPoster):
            await self.poster.aclose()

    async def _consume(self) -> None:
        assert self._sub is not None
        while self.loops.running:
            try:
                msgs = await self._sub.fetch(32, timeout=1.0)
            except (TimeoutError, NatsTimeoutError):
                continue
            except Exception as exc:
                log.warning("notifier: fetching failed: %s", exc)
                await self.loops.sleep(0.5)
                continue
            for msg in msgs:
                await self._settle(msg)

    async def _settle(self, msg: Msg) -> None:
        try:
            await self.handle(msg)
            await msg.ack()
        except ChatDown as exc:
            attempt = deliveries(msg)
            if attempt >= MAX_DELIVER:
                log.error(
                    "notifier: giving up on %s after %d attempts: %s", msg.subject, attempt, exc
                )
                await msg.ack()
            else:
                await msg.nak(delay=min(60.0, 2.0 * 2 ** (attempt - 1)))
        except Exception:
            log.exception("notifier: %s failed", msg.subject)
            await msg.ack()  # a notification is not worth a poison loop

    async def handle(self, msg: Msg) -> None:
        try:
            event = decode(headers_of(msg), msg.data)
        except InvalidInput as exc:
            log.debug("notifier: unreadable event on %s: %s", msg.subject, exc)
            return
        subject = msg.subject.removeprefix(f"{self.bus.names.prefix}.evt.")
        found = notice(subject, event.data, self.config.kinds)
        if found is None:
            return
        down: list[str] = []
        for destination in self.config.destinations:
            mark = (event.id, destination.platform)
            state = self._delivered.get(mark)
            if state == "sent":
                continue  # a redelivery after another destination was down
            folded = 0
            if state is None:
                send, folded = self.throttles[destination.platform].admit(found.key, time.time())
                if not send:
                    self.held_back += 1
                    continue
                self._remember(mark, "admitted")
            message: dict[str, Any] = {"text": with_folded(found.text, folded)}
            if found.channel:
                message["channel"] = found.channel
            try:
                await self.poster.post(destination.url, message)
            except ChatDown as exc:
                down.append(f"{destination.platform}: {exc}")
                continue
            self.sent += 1
            self._remember(mark, "sent")
        if down:
            raise ChatDown("; ".join(down))

    def _remember(self, mark: tuple[str, str], state: str) -> None:
        self._delivered[mark] = state
        self._delivered.move_to_end(mark)
        while len(self._delivered) > 10_000:
            self._delivered.popitem(last=False)
