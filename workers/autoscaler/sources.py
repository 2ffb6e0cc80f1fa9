"""Pulled sources: a Prometheus server's HTTP API (urllib, in a thread) and a JetStream
consumer's backlog (consumer info over the client connection, never the monitoring port).
Each read returns a number or raises `SourceError` with a reason fit for a decision event."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import ProxyHandler, Request, build_opener

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

MAX_BODY = 1_000_000
PrometheusQuery = Callable[[str, str, float], Awaitable[float]]
"""(server URL, PromQL, timeout) -> the value; the seam a test or another client plugs into"""


class SourceError(Exception):
    """A source could not be read; the message says why."""


def parse_prometheus(body: bytes) -> float:
    """The value of an instant query's answer: a scalar, or a vector of one series (an empty
    vector reads as 0, as KEDA reads it)."""
    try:
        answer: Any = json.loads(body)
    except ValueError as exc:
        raise SourceError(f"Prometheus answered something that is not JSON: {exc}") from exc
    if not isinstance(answer, dict):
        raise SourceError("Prometheus answered JSON that is not an object")
    if answer.get("status") != "success":
        kind = answer.get("errorType", "error")
        raise SourceError(f"Prometheus: {kind}: {answer.get('error', 'no detail')}")
    try:
        data = answer["data"]
        kind = data["resultType"]
        result = data["result"]
        if kind == "scalar":
            raw = result[1]
        elif kind == "vector":
            if not result:
                return 0.0
            if len(result) > 1:
                raise SourceError(
                    f"the query returned {len(result)} series; aggregate it to one, "
                    "for example with sum(...)"
                )
            raw = result[0]["value"][1]
        else:
            raise SourceError(f"the query returned a {kind}; use an instant vector or scalar")
        value = float(raw)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise SourceError(f"cannot read Prometheus' answer: {exc!r}") from exc
    if not math.isfinite(value):
        raise SourceError(f"the query returned {raw}")
    return value


async def query_prometheus(url: str, query: str, timeout: float) -> float:
    """GET <url>/api/v1/query. Proxy variables are not used: the server is asked directly."""
    address = f"{url.rstrip('/')}/api/v1/query?{urlencode({'query': query})}"

    def fetch() -> bytes:
        opener = build_opener(ProxyHandler({}))
        request = Request(address, headers={"Accept": "application/json"})
        try:
            with opener.open(request, timeout=timeout) as response:
                return bytes(response.read(MAX_BODY))
        except HTTPError as exc:  # Prometheus explains a bad query in a JSON body
            with exc:
                return bytes(exc.read(MAX_BODY))

    try:
        body = await asyncio.to_thread(fetch)
    except (URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SourceError(f"cannot reach Prometheus at {url}: {reason}") from exc
    return parse_prometheus(body)


async def queue_backlog(js: JetStreamContext, stream: str, consumer: str, timeout: float) -> int:
    """Messages the consumer has yet to see plus those it holds unacknowledged."""
    try:
        info = await js.consumer_info(stream, consumer, timeout=timeout)
    except NotFoundError as exc:
        raise SourceError(f"consumer {stream}/{consumer} not found") from exc
    except (NatsTimeoutError, TimeoutError) as exc:
        raise SourceError(f"consumer info for {stream}/{consumer} timed out") from exc
    except (APIError, ValueError) as exc:
        raise SourceError(f"consumer info for {stream}/{consumer}: {exc}") from exc
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
