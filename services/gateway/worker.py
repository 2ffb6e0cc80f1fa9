"""`GatewayWorker`: the gateway as a worker, so `corral up` and `corral gateway` host it like
any other. It serves the app with uvicorn on a socket bound up front (so a taken port is
reported before anything starts), leaves signals to its host, and on stop ends the event
streams, lets requests in flight finish, and closes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterator

import uvicorn
from faststream.nats import NatsBroker

from corral.schemas.errors import CorralError
from corral.services.chatops.routes import chatops_of
from corral.services.gateway.app import create_app, gateway_of
from corral.services.gateway.config import GatewayConfig
from corral.workers.runtime import Context

log = logging.getLogger(__name__)
STARTUP = 10.0
SHUTDOWN = 10.0


class GatewayBindError(CorralError):
    """The gateway cannot listen where it was told to."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: a free port), or a GatewayBindError that says
    what to do instead."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every response waits ~40 ms on Nagle and the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        raise GatewayBindError(
            f"the gateway cannot listen on {host}:{port}: {why}. Another `corral up` or another "
            "program may hold it: pass --gateway-port (0 picks a free port) or set "
            "CORRAL_GATEWAY_PORT, or run without the gateway (--no-gateway)"
        ) from None
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # the host (FastStream's app, or a test) owns SIGINT and SIGTERM and calls stop()
        yield


class GatewayWorker:
    name = "gateway"

    def __init__(
        self, ctx: Context, config: GatewayConfig, *, sock: socket.socket | None = None
    ) -> None:
        self.ctx = ctx
        self.config = config
        self.sock = sock
        self.app = create_app(ctx.settings, ctx.bus, config)
        self.server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._address: tuple[str, int] | None = None

    @property
    def port(self) -> int:
        """The port it listens on (known once bound: the one picked, for port 0)."""
        return self.address[1]

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            if self.sock is None:
                raise RuntimeError("the gateway has not started")
            host, port = self.sock.getsockname()[:2]
            self._address = (str(host), int(port))
        return self._address

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def register(self, broker: NatsBroker) -> None:
        return None

    async def start(self) -> None:
        settings = self.ctx.settings
        if self.sock is None:
            self.sock = bind_socket(settings.gateway_host, settings.gateway_port)
        _ = self.address
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=int(SHUTDOWN / 2),
            server_header=False,
        )
        self.server = _Server(config)
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="gateway")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP
        while not self.server.started:
            if self._task.done():
                await self._task  # raises what stopped it
                raise GatewayBindError("the gateway stopped while starting")
            if loop.time() > deadline:
                await self.stop()
                raise GatewayBindError(f"the gateway did not start within {STARTUP:.0f}s")
            await asyncio.sleep(0.01)
        log.info("gateway listening on %s", self.url)

    async def stop(self) -> None:
        gateway_of(self.app).stop_streams()
        await chatops_of(self.app).aclose()
        task, self._task = self._task, None
        if self.server is not None and task is not None:
            self.server.should_exit = True
            done, _ = await asyncio.wait({task}, timeout=SHUTDOWN)
            if not done:
                log.warning("the gateway did not stop within %.0fs; closing it", SHUTDOWN)
                self.server.force_exit = True
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            elif task.exception() is not None:
                log.error("the gateway failed: %r", task.exception())
        if self.sock is not None:
            self.sock.close()
