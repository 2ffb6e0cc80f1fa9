"""Webhooks: GitHub, GitLab, Alertmanager and generic signed hooks. Each delivery is verified
before anything else happens; a missing or wrong signature gets 401 and publishes nothing. A
webhook whose secret is not configured answers 404 and says which variable turns it on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from corral.schemas.errors import InvalidInput
from corral.services.gateway import external
from corral.services.gateway.auth import bearer_token
from corral.services.gateway.errors import ApiError
from corral.services.gateway.external import Outgoing
from corral.services.gateway.ingress import PublishedEvent, PublishedEvents
from corral.services.gateway.routing import TOKEN
from corral.services.gateway.signatures import verify_signature, verify_token
from corral.services.gateway.state import Gateway, gateway

router = APIRouter(prefix="/v1/hooks", tags=["webhooks"])
ANY_JSON = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": PublishedEvents, "description": "verified and published"},
    401: {"description": "missing or wrong signature; nothing was published"},
    404: {"description": "this webhook is not configured"},
}


def _off(gw: Gateway, source: str, variable: str, what: str = "") -> ApiError:
    gw.metrics.webhooks.labels(source, "off").inc()
    return ApiError(
        404,
        f"{what or f'the {source} webhook'} is off: set {variable} to turn it on",
        code="hook_not_configured",
    )


def _rejected(gw: Gateway, source: str, what: str) -> ApiError:
    gw.metrics.webhooks.labels(source, "rejected").inc()
    return ApiError(401, f"{what}; nothing was published", code="bad_signature")


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "")


async def _publish(gw: Gateway, source: str, build: Callable[[], list[Outgoing]]) -> JSONResponse:
    """After verification: the rate limit, the mapping (InvalidInput -> 422), the publish."""
    gw.metrics.webhooks.labels(source, "verified").inc()
    gw.throttle(f"hook:{source}")
    try:
        outgoing = build()
    except InvalidInput as exc:
        raise ApiError.invalid(exc) from None
    results = []
    for item in outgoing:
        published = await gw.publisher.publish(
            item.subject, item.event, command=False, source=source
        )
        results.append(
            PublishedEvent(
                id=published.id, subject=published.subject, duplicate=published.duplicate
            )
        )
    return JSONResponse(PublishedEvents(events=results).model_dump(), status_code=202)


@router.post(
    "/github",
    summary="GitHub webhook (X-Hub-Signature-256)",
    status_code=202,
    openapi_extra=ANY_JSON,
    responses=RESPONSES,
)
async def github(request: Request) -> JSONResponse:
    gw = gateway(request)
    secret = gw.config.github_secret
    if secret is None:
        raise _off(gw, external.GITHUB, "CORRAL_GITHUB_SECRET")
    body = await request.body()
    if not verify_signature(secret, body, request.headers.get("x-hub-signature-256")):
        raise _rejected(gw, external.GITHUB, "missing or wrong X-Hub-Signature-256")
    headers = request.headers

    def build() -> list[Outgoing]:
        payload = external.json_body(body, _content_type(request))
        return [
            external.github(
                gw.bus.names,
                headers.get("x-github-event"),
                headers.get("x-github-delivery"),
                body,
                payload,
            )
        ]

    return await _publish(gw, external.GITHUB, build)


@router.post(
    "/gitlab",
    summary="GitLab webhook (X-Gitlab-Token)",
    status_code=202,
    openapi_extra=ANY_JSON,
    responses=RESPONSES,
)
async def gitlab(request: Request) -> JSONResponse:
    gw = gateway(request)
    expected = gw.config.gitlab_token
    if expected is None:
        raise _off(gw, external.GITLAB, "CORRAL_GITLAB_TOKEN")
    if not verify_token(expected, request.headers.get("x-gitlab-token")):
        raise _rejected(gw, external.GITLAB, "missing or wrong X-Gitlab-Token")
    body = await request.body()
    headers = request.headers

    def build() -> list[Outgoing]:
        delivery = headers.get("x-gitlab-event-uuid") or headers.get("idempotency-key")
        payload = external.json_body(body, _content_type(request))
        return [
            external.gitlab(gw.bus.names, headers.get("x-gitlab-event"), delivery, body, payload)
        ]

    return await _publish(gw, external.GITLAB, build)


@router.post(
    "/alertmanager",
    summary="Alertmanager webhook, payload version 4 (bearer token)",
    status_code=202,
    openapi_extra=ANY_JSON,
    responses=RESPONSES,
)
async def alertmanager(request: Request) -> JSONResponse:
    gw = gateway(request)
    expected = gw.config.alertmanager_token
    if expected is None:
        raise _off(gw, external.ALERTMANAGER, "CORRAL_ALERTMANAGER_TOKEN")
    if not verify_token(expected, bearer_token(request.headers.get("authorization"))):
        raise _rejected(gw, external.ALERTMANAGER, "missing or wrong bearer token")
    body = await request.body()

    def build() -> list[Outgoing]:
        return external.alertmanager(gw.bus.names, external.json_body(body))

    return await _publish(gw, external.ALERTMANAGER, build)


@router.post(
    "/{name}",
    summary="A generic webhook (X-Corral-Signature: sha256=<hex HMAC of the body>)",
    status_code=202,
    openapi_extra=ANY_JSON,
    responses=RESPONSES,
)
async def hook(
    request: Request,
    name: Annotated[str, Path(pattern=TOKEN.pattern, description="the hook's name")],
) -> JSONResponse:
    gw = gateway(request)
    secret = gw.config.hooks.get(name)
    if secret is None:
        variable = f"CORRAL_HOOK_SECRETS={name}:<secret>"
        raise _off(gw, "unknown", variable, what=f"the hook {name!r}")
    body = await request.body()
    if not verify_signature(secret, body, request.headers.get("x-corral-signature")):
        raise _rejected(gw, name, "missing or wrong X-Corral-Signature")
    headers = request.headers

    def build() -> list[Outgoing]:
        payload = external.json_body(body, _content_type(request))
        delivery = headers.get("x-corral-delivery") or headers.get("idempotency-key")
        return [
            external.hook(
                gw.bus.names, name, headers.get("x-corral-event"), delivery, body, payload
            )
        ]

    return await _publish(gw, name, build)
