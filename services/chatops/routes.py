"""The slash-command endpoints, mounted in the gateway: `POST /v1/chat/slack` (signed with
the app's signing secret) and `POST /v1/chat/mattermost` (the command's token). Both answer
at once and report the rest to `response_url`."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from corral.services.chatops.handlers import Caller, ChatOps
from corral.services.chatops.signing import slack_problem, token_ok
from corral.services.gateway.errors import ApiError
from corral.services.gateway.state import gateway

router = APIRouter(prefix="/v1/chat", tags=["chat-ops"])
FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {
                        name: {"type": "string"}
                        for name in (
                            "token",
                            "team_id",
                            "channel_id",
                            "user_id",
                            "user_name",
                            "command",
                            "text",
                            "response_url",
                        )
                    },
                }
            }
        },
    }
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "acknowledged; progress and the outcome go to response_url"},
    401: {"description": "not signed by Slack (or a wrong Mattermost token), or replayed"},
    404: {"description": "this chat platform is not configured"},
}


def chatops(request: Request) -> ChatOps:
    chat: ChatOps = request.app.state.chatops
    return chat


def _form(body: bytes) -> dict[str, str]:
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8 form data") from None
    return {key: values[0] for key, values in fields.items()}


def _caller(platform: str, form: dict[str, str]) -> Caller:
    user_id = form.get("user_id", "").strip()
    if not user_id:
        raise ApiError(422, "the slash command has no user_id", code="invalid")
    return Caller(
        platform=platform,
        user_id=user_id[:200],
        user_name=form.get("user_name", "").strip()[:200],
        team=form.get("team_id", "")[:200],
        channel=form.get("channel_id", "")[:200],
        command=(form.get("command") or "/corral")[:100],
        response_url=form.get("response_url", "").strip(),
    )


def _answer(request: Request, platform: str, form: dict[str, str]) -> JSONResponse:
    caller = _caller(platform, form)
    gateway(request).throttle(f"chat:{platform}:{caller.user_id}")
    text = form.get("text", "")
    return JSONResponse(chatops(request).accept(caller, text))


@router.post(
    "/slack",
    summary="Slack slash command (X-Slack-Signature v0)",
    openapi_extra=FORM,
    responses=RESPONSES,
)
async def slack(request: Request) -> JSONResponse:
    chat = chatops(request)
    secret = chat.config.slack_secret
    if secret is None:
        raise ApiError(
            404,
            "Slack chat-ops is off: set CORRAL_SLACK_SIGNING_SECRET to turn it on",
            code="chat_not_configured",
        )
    body = await request.body()
    headers = request.headers
    problem = slack_problem(
        secret,
        headers.get("x-slack-request-timestamp"),
        headers.get("x-slack-signature"),
        body,
        chat.clock(),
    )
    if problem is not None:
        raise ApiError(401, f"{problem}; nothing was done", code="bad_signature")
    return _answer(request, "slack", _form(body))


@router.post(
    "/mattermost",
    summary="Mattermost slash command (the command's token)",
    openapi_extra=FORM,
    responses=RESPONSES,
)
async def mattermost(request: Request) -> JSONResponse:
    chat = chatops(request)
    if not chat.config.mattermost_tokens:
        raise ApiError(
            404,
            "Mattermost chat-ops is off: set CORRAL_MATTERMOST_TOKENS to turn it on",
            code="chat_not_configured",
        )
    form = _form(await request.body())
    presented = form.get("token")
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("token "):
        presented = authorization[6:].strip()
    if not token_ok(chat.config.mattermost_tokens, presented):
        raise ApiError(
            401, "missing or wrong slash command token; nothing was done", code="bad_signature"
        )
    return _answer(request, "mattermost", form)


def chatops_of(app: Any) -> ChatOps:
    chat: ChatOps = app.state.chatops
    return chat
