"""`corral gateway` on its own, and the clear errors of `corral gateway` and `corral up` when
the port is taken or the configuration is wrong."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from collections.abc import Iterator

import httpx
import pytest
from gateway_support import ADMIN, READ, auth
from support import acli, corral_env, eventually

pytestmark = pytest.mark.timeout(90)
TOKENS = f"viewer:{READ}:read,ops:{ADMIN}:admin"


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


async def test_gateway_command(settings, bus, processes, tmp_path) -> None:
    env = corral_env(settings, CORRAL_GATEWAY_TOKENS=TOKENS)
    proc = processes.start("gateway", "--port", "0", env=env, name="gateway")
    log = tmp_path / "gateway-0.log"

    def url() -> str | None:
        found = re.search(r"gateway: (http://127\.0\.0\.1:\d+)", log.read_text())
        return found.group(1) if found else None

    base = await eventually(url, within=30, what="the gateway's URL in its output")
    assert "2 API token(s)" in log.read_text()
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/v1/services")).status_code == 401
        listed = await client.get("/v1/services", headers=auth(READ))
        assert listed.status_code == 200
        assert listed.json() == {"services": []}
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert "Traceback" not in log.read_text()


async def test_a_taken_port_is_a_clear_error(settings, taken_port, tmp_path) -> None:
    env = corral_env(settings)
    for args in (
        ("gateway", "--port", str(taken_port)),
        ("up", "--gateway-port", str(taken_port), "--data-dir", str(tmp_path / "up")),
    ):
        result = await acli(env, *args, within=30)
        assert result.returncode == 1, result
        assert f"cannot listen on 127.0.0.1:{taken_port}" in result.stderr, result
        assert "--gateway-port" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


async def test_bad_configuration_is_refused(settings) -> None:
    env = corral_env(settings, CORRAL_GATEWAY_TOKENS="ci:tooshorttok:read")
    bad_tokens = await acli(env, "gateway")
    assert bad_tokens.returncode == 2, bad_tokens
    assert "CORRAL_GATEWAY_TOKENS" in bad_tokens.stderr
    assert "tooshorttok" not in bad_tokens.stderr  # a token is never echoed
    exposed = await acli(corral_env(settings), "gateway", "--insecure-local", "--host", "0.0.0.0")
    assert exposed.returncode == 2, exposed
    assert "loopback" in exposed.stderr
    bad_hooks = await acli(corral_env(settings, CORRAL_HOOK_SECRETS="github:x"), "gateway")
    assert bad_hooks.returncode == 2
    assert "CORRAL_HOOK_SECRETS" in bad_hooks.stderr
