"""Health probes: one check (http, tcp or exec) against a replica, and the loop that runs it
every `period` and reports a change once `failure_threshold` or `success_threshold` results in
a row say so.

Probes reach a replica on 127.0.0.1 only: the agent runs beside its replicas, and a probe that
followed a spec to another host would let a spec make the node scan its network.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

from corral.schemas.spec import Health, HttpProbe

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
EXEC_GRACE = 1.0
"""seconds past the probe timeout before an exec that the runner did not stop is given up on;
the runner enforces the timeout itself, so this only guards against one that never returns"""
CLOSE_WAIT = 0.5
"""seconds to let a probe connection close cleanly before it is dropped"""
_PATH_SAFE = "/?&=%:@!$'()*+,;~-._"
"""left as written in a probe path; anything else (spaces, CR/LF, non-ASCII) is %-escaped so a
path can never add a header to the request"""

ExecFn = Callable[[list[str], float], Awaitable[int]]
"""Runs argv beside the replica within a timeout (seconds) and returns its exit code; may raise
TimeoutError, or any other exception when it cannot run."""


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str
    """short and human, for events and logs: "http 200", "exec exited 1" """


ChangeFn = Callable[[str, bool, ProbeResult], Awaitable[None]]
"""Called with (replica, healthy, the result that decided it) on each transition."""


# --- one check ------------------------------------------------------------------------------


async def check(health: Health, ports: dict[str, int], run_exec: ExecFn) -> ProbeResult:
    """Run the probe once. Never raises, except CancelledError: every error is a failed
    result whose detail says what went wrong."""
    timeout = health.timeout
    try:
        if health.exec is not None:
            return await _exec(health.exec, timeout, run_exec)
        port = _resolve(health.port(), ports)
        if isinstance(port, ProbeResult):
            return port
        if health.http is not None:
            return await _http(health.http, port, timeout)
        return await _tcp(port, timeout)
    except Exception as exc:  # a probe reports, it never takes its loop down
        return ProbeResult(False, f"probe error: {exc!r}")


def _resolve(port: int | str | None, ports: dict[str, int]) -> int | ProbeResult:
    if port is None:
        return ProbeResult(False, "the health check names no probe port")
    if isinstance(port, str):
        if port not in ports:
            known = ", ".join(sorted(ports)) or "none"
            return ProbeResult(False, f"port {port!r} is not one of the replica's ports ({known})")
        port = ports[port]
    if not 1 <= port <= 65535:
        return ProbeResult(False, f"port {port} is not between 1 and 65535")
    return port


def _seconds(value: float) -> str:
    return f"{round(value, 3)}s"


async def _exec(argv: list[str], timeout: float, run_exec: ExecFn) -> ProbeResult:
    try:
        code = await asyncio.wait_for(run_exec(argv, timeout), timeout + EXEC_GRACE)
    except TimeoutError:
        return ProbeResult(False, f"exec timed out after {_seconds(timeout)}")
    except Exception as exc:
        return ProbeResult(False, f"exec could not run: {exc}")
    return ProbeResult(code == 0, f"exec exited {code}")


async def _tcp(port: int, timeout: float) -> ProbeResult:
    where = f"tcp {HOST}:{port}"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(HOST, port)
    except TimeoutError:
        return ProbeResult(False, f"{where} timed out after {_seconds(timeout)}")
    except ConnectionRefusedError:
        return ProbeResult(False, f"{where} refused")
    except OSError as exc:
        return ProbeResult(False, f"{where}: {exc.strerror or exc}")
    finally:
        if writer is not None:
            await _close(writer)
    return ProbeResult(True, f"{where} open")


async def _http(probe: HttpProbe, port: int, timeout: float) -> ProbeResult:
    what = f"http GET {probe.path}"
    request = (
        f"GET {quote(probe.path, safe=_PATH_SAFE)} HTTP/1.1\r\n"
        f"Host: {HOST}:{port}\r\n"
        "User-Agent: corral-probe\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("latin-1")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request)
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        return ProbeResult(False, f"{what} timed out after {_seconds(timeout)}")
    except ConnectionRefusedError:
        return ProbeResult(False, f"http {HOST}:{port} refused")
    except (OSError, ValueError) as exc:  # ValueError: a status line past the stream's limit
        return ProbeResult(False, f"{what}: {getattr(exc, 'strerror', None) or exc}")
    finally:
        # outside the timeout, so a slow close never turns an answer into a timeout
        if writer is not None:
            await _close(writer)
    status = _status(line)
    if status is None:
        if not line:
            return ProbeResult(False, f"{what}: closed without a response")
        shown = line[:40].decode("latin-1").strip()
        return ProbeResult(False, f"{what}: not an HTTP response ({shown!r})")
    if 200 <= status < 400:
        return ProbeResult(True, f"http {status}")
    return ProbeResult(False, f"{what} returned {status}")


def _status(line: bytes) -> int | None:
    """The code from an HTTP status line such as b"HTTP/1.1 200 OK\\r\\n", or None."""
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return None
    code = parts[1]
    if len(code) != 3 or not code.isdigit():
        return None
    return int(code)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_WAIT)
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass  # the peer reset it: closed all the same


# --- deciding -------------------------------------------------------------------------------


@dataclass
class Tally:
    """Consecutive results, and the health they add up to. Pure: no I/O, no clock."""

    success_threshold: int
    failure_threshold: int
    healthy: bool | None = None
    """None until the first threshold is reached"""
    successes: int = 0
    failures: int = 0

    def observe(self, ok: bool) -> bool | None:
        """Count one result; return the new health if this result changes it, else None."""
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.success_threshold and self.healthy is not True:
                self.healthy = True
                return True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= self.failure_threshold and self.healthy is not False:
                self.healthy = False
                return False
        return None


def next_deadline(deadline: float, period: float, now: float) -> float:
    """When the next probe starts: one period after the last one was due, so sleeps that
    overshoot do not add up; but never in the past, so a slow probe is followed at once by
    one more, not by a burst that catches up."""
    return max(deadline + period, now)


# --- the loop -------------------------------------------------------------------------------


class Prober:
    """Runs one replica's probe as an asyncio task, from `start()` until `stop()`."""

    def __init__(
        self,
        replica: str,
        health: Health,
        ports: dict[str, int],
        run_exec: ExecFn,
        on_change: ChangeFn,
    ) -> None:
        self.replica = replica
        self.health = health
        self.ports = dict(ports)
        self.run_exec = run_exec
        self.on_change = on_change
        self.tally = Tally(health.success_threshold, health.failure_threshold)
        self.last: ProbeResult | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def healthy(self) -> bool | None:
        """True or False once a threshold is reached; None until then."""
        return self.tally.healthy

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start probing; calling it again while running does nothing."""
        if self._stopping:
            raise RuntimeError(f"the prober for {self.replica} was stopped")
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name=f"probe {self.replica}")

    async def stop(self) -> None:
        """Cancel the loop and wait for it to end. Safe before start, twice, and from inside
        `on_change`: the loop then ends as soon as the callback returns, which is not cut
        short."""
        self._stopping = True
        task = self._task
        if task is None or task.done() or task is asyncio.current_task():
            return
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            log.error("probe loop for %s failed", self.replica, exc_info=task.exception())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.health.initial_delay)
        deadline = loop.time()
        while True:
            result = await check(self.health, self.ports, self.run_exec)
            self.last = result
            change = self.tally.observe(result.ok)
            if change is not None:
                await self._report(change, result)
            if self._stopping:
                return
            deadline = next_deadline(deadline, self.health.period, loop.time())
            await asyncio.sleep(deadline - loop.time())

    async def _report(self, healthy: bool, result: ProbeResult) -> None:
        try:
            await self.on_change(self.replica, healthy, result)
        except Exception:  # the callback's failure must not stop the probing
            log.exception(
                "health change for %s (%s) was not handled",
                self.replica,
                "healthy" if healthy else "unhealthy",
            )
