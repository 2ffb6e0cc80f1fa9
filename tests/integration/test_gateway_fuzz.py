"""schemathesis fuzzes the gateway's OpenAPI document over real HTTP, with the api worker
running: whatever it sends, the gateway never answers 5xx."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections import Counter
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from gateway_support import ADMIN, CONFIG, auth, running_gateway

from corral.services.chatops.config import ChatConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]
EXAMPLES = 25
# chat-ops on too, so that its routes are fuzzed past "not configured"
WITH_CHAT = dataclasses.replace(
    CONFIG, chat=ChatConfig(slack_secret=b"fuzz-signing-secret", mattermost_tokens=(b"fuzz",))
)
SKIP = {"/v1/events/stream"}  # a stream never ends: the integration tests cover it


def fuzz(document: dict[str, Any], base_url: str) -> tuple[Counter[tuple[str, int]], list[str]]:
    """Every operation, EXAMPLES cases each; returns (operation, status) counts and the 5xx."""
    schema = schemathesis.openapi.from_dict(copy.deepcopy(document))
    answers: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()  # type: ignore[union-attr]
            if operation.path not in SKIP:
                _fuzz_one(operation, session, base_url, answers, failures)
    return answers, failures


def _fuzz_one(
    operation: Any,
    session: requests.Session,
    base_url: str,
    answers: Counter[tuple[str, int]],
    failures: list[str],
) -> None:
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy())
    def check(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, headers=auth(ADMIN), timeout=15)
        answers[(operation.label, response.status_code)] += 1
        if response.status_code >= 500:
            failures.append(
                f"{case.method} {case.formatted_path} -> {response.status_code}: "
                f"{response.text[:300]}"
            )

    check()


async def test_no_5xx_anywhere(settings, bus, control_plane) -> None:
    async with (
        control_plane(workers=("api",)),
        running_gateway(settings, bus, WITH_CHAT, gateway_rate_limit=0) as api,
    ):
        document = api.worker.app.openapi()
        answers, failures = await asyncio.to_thread(fuzz, document, api.url)
    assert not failures, "\n".join(failures[:20])
    print("\n".join(f"{label}: {status} x{n}" for (label, status), n in sorted(answers.items())))
    assert sum(answers.values()) > 100
    succeeded = {label for (label, status), _ in answers.items() if status < 300}
    # the fuzzing got past auth and validation, into the handlers
    assert {"GET /v1/services", "POST /v1/services", "POST /v1/cloudevents"} <= succeeded
