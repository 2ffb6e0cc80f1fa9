"""A real HTTP server on 127.0.0.1 that stands in for Slack's response_url and incoming
webhooks (and Mattermost's): it records every JSON body posted to it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from corral.services.gateway.worker import bind_socket


@dataclass
class Receiver:
    url: str = ""
    posts: list[tuple[str, Any]] = field(default_factory=list)
    status: int = 200
    """the status it answers with (set 500 to play an outage)"""

    def texts(self, path: str | None = None) -> list[str]:
        return [
            body.get("text", "")
            for where, body in self.posts
            if (path is None or where == path) and isinstance(body, dict)
        ]


class _Quiet(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = FastAPI()

    @app.post("/{path:path}")
    async def record(path: str, request: Request) -> JSONResponse:
        body = await request.body()
        try:
            parsed: Any = json.loads(body)
        except ValueError:
            parsed = body.decode(errors="replace")
        state.posts.append((f"/{path}", parsed))
        return JSONResponse({"ok": state.status < 400}, status_code=state.status)

    sock = bind_socket("127.0.0.1", 0)
    host, port = sock.getsockname()[:2]
    state.url = f"http://{host}:{port}"
    server = _Quiet(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]), name="receiver")
    try:
        while not server.started:
            if task.done():
                await task
            await asyncio.sleep(0.01)
        yield state
    finally:
        server.should_exit = True
        await asyncio.wait({task}, timeout=10)
        sock.close()
