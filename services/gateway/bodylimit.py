"""The request body size limit: a declared Content-Length over it is refused before any of
the body is read; a body sent without one is cut off once it passes the limit."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.services.gateway.errors import ApiError, error_response


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (CORRAL_GATEWAY_MAX_BODY)"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    response = error_response(400, "bad_request", "invalid Content-Length")
                    await response(scope, receive, send)
                    return
                if declared > self.max_body:
                    response = error_response(
                        413, "too_large", _too_large(self.max_body), headers={"Connection": "close"}
                    )
                    await response(scope, receive, send)
                    return
        seen = 0

        async def receiving() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise ApiError(413, _too_large(self.max_body), code="too_large")
            return message

        await self.app(scope, receiving, send)
