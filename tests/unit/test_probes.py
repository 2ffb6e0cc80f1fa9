"""Health probes: one check against real local servers, the pure tally and schedule, and the
probe loop driven by a scripted exec probe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from support import eventually

from corral.schemas.spec import Health
from corral.workers.agent.probes import (
    Prober,
    ProbeResult,
    Tally,
    check,
    next_deadline,
)

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """A real server on 127.0.0.1 with a free port; yields the port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


class HttpServer:
    """Answers 200 on /ok, 302 on /moved, 500 on /bad, 404 elsewhere; keeps each request."""

    def __init__(self) -> None:
        self.requests: list[list[str]] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines: list[str] = []
        while (line := await reader.readline()) not in (b"\r\n", b""):
            lines.append(line.decode("latin-1").rstrip("\r\n"))
        self.requests.append(lines)
        path = lines[0].split()[1] if lines else ""
        status = {"/ok": "200 OK", "/moved": "302 Found", "/bad": "500 Oops"}.get(
            path, "404 Not Found"
        )
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts, never answers; ends when the client hangs up."""
    await reader.read()
    writer.close()


def answering(reply: bytes) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(reply)
        await writer.drain()
        writer.close()

    return handle


async def closed_port() -> int:
    """A port that was just free: connecting to it is refused."""
    async with serving(silent) as port:
        pass
    return port


def http(path: str, port: int | str, timeout: float = 2.0) -> Health:
    return Health.model_validate({"http": {"path": path, "port": port}, "timeout": timeout})


def tcp(port: int | str, timeout: float = 2.0) -> Health:
    return Health.model_validate({"tcp": {"port": port}, "timeout": timeout})


async def never_exec(argv: list[str], timeout: float) -> int:
    raise AssertionError("no exec expected")


# --- check: http --------------------------------------------------------------------------


async def test_http_2xx_and_3xx_pass_and_the_request_is_plain_http11() -> None:
    server = HttpServer()
    async with serving(server) as port:
        ok = await check(http("/ok", port), {}, never_exec)
        moved = await check(http("/moved", port), {}, never_exec)
    assert ok == ProbeResult(True, "http 200")
    assert moved == ProbeResult(True, "http 302")
    request = server.requests[0]
    assert request[0] == "GET /ok HTTP/1.1"
    assert f"Host: 127.0.0.1:{port}" in request
    assert "Connection: close" in request


async def test_http_error_status_fails() -> None:
    async with serving(HttpServer()) as port:
        bad = await check(http("/bad", port), {}, never_exec)
        missing = await check(http("/nope", port), {}, never_exec)
    assert bad == ProbeResult(False, "http GET /bad returned 500")
    assert missing == ProbeResult(False, "http GET /nope returned 404")


async def test_http_no_answer_times_out() -> None:
    async with serving(silent) as port:
        result = await check(http("/ok", port, timeout=0.2), {}, never_exec)
    assert not result.ok
    assert result.detail == "http GET /ok timed out after 0.2s"


async def test_http_refused() -> None:
    port = await closed_port()
    result = await check(http("/ok", port), {}, never_exec)
    assert result == ProbeResult(False, f"http 127.0.0.1:{port} refused")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"", "closed without a response"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP response ('SSH-2.0-OpenSSH_9.6')"),
        (b"HTTP/1.1 2xx Weird\r\n", "not an HTTP response"),
    ],
)
async def test_http_garbage_fails_with_what_came_back(reply: bytes, expected: str) -> None:
    async with serving(answering(reply)) as port:
        result = await check(http("/ok", port), {}, never_exec)
    assert not result.ok
    assert result.detail.startswith("http GET /ok: ")
    assert expected in result.detail


async def test_http_path_cannot_inject_a_header() -> None:
    server = HttpServer()
    async with serving(server) as port:
        await check(http("/ok HTTP/1.1\r\nX-Evil: 1\r\n", port), {}, never_exec)
    assert server.requests[0][0] == "GET /ok%20HTTP/1.1%0D%0AX-Evil:%201%0D%0A HTTP/1.1"
    assert not any(line.startswith("X-Evil") for line in server.requests[0])


# --- check: tcp and ports -----------------------------------------------------------------


async def test_tcp_connect_passes_and_refused_fails() -> None:
    async with serving(silent) as port:
        ok = await check(tcp(port), {}, never_exec)
    assert ok == ProbeResult(True, f"tcp 127.0.0.1:{port} open")
    refused_port = await closed_port()
    refused = await check(tcp(refused_port), {}, never_exec)
    assert refused == ProbeResult(False, f"tcp 127.0.0.1:{refused_port} refused")


async def test_port_names_are_looked_up() -> None:
    async with serving(HttpServer()) as port:
        by_http = await check(http("/ok", "web"), {"web": port, "admin": 1}, never_exec)
        by_tcp = await check(tcp("web"), {"web": port}, never_exec)
    assert by_http.ok
    assert by_tcp.ok


async def test_a_missing_port_name_fails_clearly() -> None:
    result = await check(tcp("admin"), {"web": 8080, "metrics": 9090}, never_exec)
    assert result == ProbeResult(
        False, "port 'admin' is not one of the replica's ports (metrics, web)"
    )
    none = await check(http("/", "admin"), {}, never_exec)
    assert none == ProbeResult(False, "port 'admin' is not one of the replica's ports (none)")


async def test_an_impossible_port_number_fails() -> None:
    result = await check(tcp(70000), {}, never_exec)
    assert result == ProbeResult(False, "port 70000 is not between 1 and 65535")


# --- check: exec --------------------------------------------------------------------------


def exec_health(timeout: float = 1.0) -> Health:
    return Health.model_validate({"exec": ["check", "--now"], "timeout": timeout})


async def test_exec_exit_codes() -> None:
    seen: list[tuple[list[str], float]] = []

    def exiting(code: int) -> Callable[[list[str], float], Awaitable[int]]:
        async def run(argv: list[str], timeout: float) -> int:
            seen.append((argv, timeout))
            return code

        return run

    assert await check(exec_health(), {}, exiting(0)) == ProbeResult(True, "exec exited 0")
    assert await check(exec_health(), {}, exiting(1)) == ProbeResult(False, "exec exited 1")
    assert seen == [(["check", "--now"], 1.0)] * 2


async def test_exec_timeout_and_errors_are_failed_results() -> None:
    async def times_out(argv: list[str], timeout: float) -> int:
        raise TimeoutError

    async def breaks(argv: list[str], timeout: float) -> int:
        raise RuntimeError("replica r1 is not running")

    timed_out = await check(exec_health(0.5), {}, times_out)
    assert timed_out == ProbeResult(False, "exec timed out after 0.5s")
    broken = await check(exec_health(), {}, breaks)
    assert broken == ProbeResult(False, "exec could not run: replica r1 is not running")


async def test_an_exec_that_never_returns_is_given_up_on() -> None:
    async def hangs(argv: list[str], timeout: float) -> int:
        await asyncio.Event().wait()
        return 0

    result = await check(exec_health(0.05), {}, hangs)
    assert result == ProbeResult(False, "exec timed out after 0.05s")


# --- deciding -----------------------------------------------------------------------------


def test_tally_reports_each_transition_once() -> None:
    tally = Tally(success_threshold=2, failure_threshold=3)
    script = [True, False, True, True, True, False, False, False, False, True, True]
    changes = [(i, c) for i, ok in enumerate(script) if (c := tally.observe(ok)) is not None]
    assert changes == [(3, True), (7, False), (10, True)]


def test_tally_goes_unhealthy_from_unknown() -> None:
    tally = Tally(success_threshold=1, failure_threshold=2)
    assert [tally.observe(False) for _ in range(4)] == [None, False, None, None]
    assert tally.healthy is False


def test_next_deadline_keeps_the_grid_but_never_bursts() -> None:
    assert next_deadline(10.0, 1.0, now=10.3) == 11.0
    assert next_deadline(11.0, 1.0, now=11.002) == 12.0  # an overshoot does not add up
    assert next_deadline(10.0, 1.0, now=12.5) == 12.5  # a slow probe: next one at once


# --- the loop -----------------------------------------------------------------------------


class Script:
    """An exec probe that exits with the scripted codes, then repeats the last one."""

    def __init__(self, *codes: int) -> None:
        self.codes = list(codes)
        self.calls = 0
        self.first_call: float | None = None

    async def __call__(self, argv: list[str], timeout: float) -> int:
        if self.first_call is None:
            self.first_call = asyncio.get_running_loop().time()
        code = self.codes[min(self.calls, len(self.codes) - 1)]
        self.calls += 1
        return code


class Changes:
    """on_change that records (healthy, probe count when reported)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.seen: list[tuple[bool, int]] = []
        self.results: list[ProbeResult] = []

    async def __call__(self, replica: str, healthy: bool, result: ProbeResult) -> None:
        assert replica == "r1"
        self.seen.append((healthy, self.script.calls))
        self.results.append(result)


def loop_health(**fields: Any) -> Health:
    return Health.model_validate({"exec": ["check"], "period": 0.01, **fields})


@contextlib.asynccontextmanager
async def probing(prober: Prober) -> AsyncIterator[Prober]:
    prober.start()
    try:
        yield prober
    finally:
        await prober.stop()


async def test_failure_threshold_reports_unhealthy_once() -> None:
    script = Script(1)
    changes = Changes(script)
    health = loop_health(failure_threshold=3)
    async with probing(Prober("r1", health, {}, script, changes)) as prober:
        await eventually(lambda: script.calls >= 8, within=10, what="8 probes")
    assert changes.seen == [(False, 3)]
    assert changes.results == [ProbeResult(False, "exec exited 1")]
    assert prober.healthy is False
    assert prober.last == ProbeResult(False, "exec exited 1")


async def test_success_threshold_needs_that_many_in_a_row() -> None:
    script = Script(0, 1, 0, 0)
    changes = Changes(script)
    health = loop_health(success_threshold=2, failure_threshold=3)
    prober = Prober("r1", health, {}, script, changes)
    assert prober.healthy is None
    assert prober.last is None
    async with probing(prober):
        await eventually(lambda: script.calls >= 8, within=10, what="8 probes")
    assert changes.seen == [(True, 4)]
    assert prober.healthy is True


async def test_healthy_unhealthy_healthy_each_reported_once() -> None:
    script = Script(0, 0, 1, 1, 1, 1, 1, 0, 0, 0)
    changes = Changes(script)
    health = loop_health(success_threshold=2, failure_threshold=3)
    async with probing(Prober("r1", health, {}, script, changes)):
        await eventually(lambda: script.calls >= 14, within=10, what="14 probes")
    assert changes.seen == [(True, 2), (False, 5), (True, 9)]


async def test_a_failing_callback_is_logged_and_probing_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = Script(1, 0)
    seen: list[bool] = []

    async def flaky(replica: str, healthy: bool, result: ProbeResult) -> None:
        seen.append(healthy)
        if not healthy:
            raise RuntimeError("bus down")

    health = loop_health(failure_threshold=1)
    with caplog.at_level(logging.ERROR, logger="corral.workers.agent.probes"):
        async with probing(Prober("r1", health, {}, script, flaky)):
            await eventually(lambda: seen == [False, True], within=10, what="both changes")
    assert "health change for r1 (unhealthy) was not handled" in caplog.text
    assert "bus down" in caplog.text


async def test_initial_delay_comes_first() -> None:
    script = Script(0)
    changes = Changes(script)
    health = loop_health(initial_delay=0.3)
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with probing(Prober("r1", health, {}, script, changes)):
        await eventually(lambda: changes.seen, within=10, what="a first probe")
    assert script.first_call is not None
    assert script.first_call - began >= 0.25  # a lower bound only: the machine may be slow


async def test_stop_leaves_no_task_and_is_safe_to_repeat() -> None:
    script = Script(0)
    prober = Prober("r1", loop_health(), {}, script, Changes(script))
    await prober.stop()  # before start: nothing to do

    prober = Prober("r1", loop_health(), {}, script, Changes(script))
    prober.start()
    prober.start()  # already running: no second loop
    assert [t for t in asyncio.all_tasks() if t.get_name() == "probe r1"]
    await eventually(lambda: script.calls >= 2, within=10, what="2 probes")
    await asyncio.gather(prober.stop(), prober.stop())
    await prober.stop()
    assert not prober.running
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "probe r1"]
    calls = script.calls
    await asyncio.sleep(0)
    assert script.calls == calls
    with pytest.raises(RuntimeError, match="was stopped"):
        prober.start()


async def test_stop_during_initial_delay() -> None:
    script = Script(0)
    prober = Prober("r1", loop_health(initial_delay=60), {}, script, Changes(script))
    prober.start()
    await asyncio.sleep(0)
    await prober.stop()
    assert not prober.running
    assert script.calls == 0


async def test_stop_from_inside_the_callback_lets_it_finish() -> None:
    script = Script(1)
    finished = asyncio.Event()
    prober: Prober | None = None

    async def stop_myself(replica: str, healthy: bool, result: ProbeResult) -> None:
        assert prober is not None
        await prober.stop()
        await asyncio.sleep(0)  # the callback is not cut short by its own stop
        finished.set()

    prober = Prober("r1", loop_health(failure_threshold=1), {}, script, stop_myself)
    prober.start()
    await asyncio.wait_for(finished.wait(), 10)
    await eventually(lambda: not prober.running, within=10, what="the loop to end")
    assert script.calls == 1
    await prober.stop()
