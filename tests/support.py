"""Helpers shared by the tests: polling with a deadline, and the environment for `corral`
subprocesses."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.bus.lifecycle import on_server
from corral.bus.settings import Settings

CORRAL = str(Path(sys.executable).parent / "corral")


async def eventually(
    probe: Callable[[], Any],
    *,
    within: float = 20.0,
    every: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll `probe` until it returns something truthy; fail with `what` after `within` s."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        last = result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {within:.0f}s waiting for {what}; last: {last!r}"
            )
        await asyncio.sleep(every)


def corral_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "CORRAL_NATS_URL": settings.resolved_url(),
            "CORRAL_PREFIX": settings.prefix,
            "CORRAL_DATA_DIR": str(settings.data_dir),
            "CORRAL_HEARTBEAT_INTERVAL": str(settings.heartbeat_interval),
            "CORRAL_NODE_GRACE": str(settings.node_grace),
            "CORRAL_RESYNC_INTERVAL": str(settings.resync_interval),
            "CORRAL_PIPELINE_LOG_BYTES": str(settings.pipeline_log_bytes),
            "COLUMNS": "200",
            "NO_COLOR": "1",
        }
    )
    env.update(extra)
    return env


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.returncode = code
        self.stdout = out
        self.stderr = err

    def __repr__(self) -> str:
        return f"<exit {self.returncode}\nstdout: {self.stdout}\nstderr: {self.stderr}>"


async def acli(
    env: dict[str, str], *args: str, within: float = 60.0, stdin: str | None = None
) -> Result:
    """Run `corral ...` without blocking the event loop (in-process workers keep running)."""
    proc = await asyncio.create_subprocess_exec(
        CORRAL,
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin else None), within
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"corral {' '.join(args)} took longer than {within}s") from None
    return Result(proc.returncode or 0, out.decode(), err.decode())


async def command(bus: Any, verb: str, name: str, data: dict[str, Any] | None = None) -> str:
    """Publish a service command as another system would; returns its id."""
    import json
    import uuid

    command_id = uuid.uuid4().hex
    headers = {
        "ce-id": command_id,
        "ce-source": "test",
        "ce-type": f"io.corral.service.{verb}",
        "ce-specversion": "1.0",
    }
    await bus.js.publish(
        bus.names.cmd("service", name, verb), json.dumps(data or {}).encode(), headers=headers
    )
    return command_id


async def replica_states(bus: Any, service: str) -> list[Any]:
    return [v.value for v in (await bus.buckets.replicas.items(f"{service}.>")).values()]


class Collected(list[Any]):
    """Messages seen on a subject (subject, decoded payload), in order; `close()` ends it."""

    sub: Any = None

    async def close(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()
            self.sub = None


async def collect(bus: Any, subject: str) -> Collected:
    seen = Collected()

    async def on_msg(msg: Any) -> None:
        seen.append((msg.subject, msg.data.decode()))

    seen.sub = await bus.nc.subscribe(subject, cb=on_msg)
    await on_server(bus.nc)  # what other connections publish from now on is seen
    return seen


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie counts as exited); safe against the race where
    the process ends while we look."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
