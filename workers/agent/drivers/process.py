"""Local subprocesses, like Nomad's raw_exec. Each replica gets its own process group, its own
free TCP ports, and a log file; it dies with the agent (PDEATHSIG) so no orphan outlives it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from corral.schemas.spec import expand, port_environment
from corral.workers.agent.drivers.base import (
    DriverError,
    ExitCallback,
    Launch,
    Recovered,
    Started,
)
from corral.workers.agent.drivers.ports import free_port

REPLICA_ENV = "CORRAL_REPLICA_ID"
RUNTIME_ENV = "CORRAL_RUNTIME"
"""set to `process` in our replicas, so that a container's process (which carries the same
replica id, and is visible from the host) is never taken for one of ours"""


def _child_setup() -> None:
    # Linux only: SIGKILL this child when the agent dies, even by kill -9
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)


@dataclass
class _Proc:
    process: asyncio.subprocess.Process
    env: dict[str, str]
    waiter: asyncio.Task[None] | None = None
    stopping: bool = False
    cpu: tuple[float, float] | None = None
    """(cpu seconds of the process tree, monotonic time) at the last stats call"""


class ProcessDriver:
    name = "process"
    provides: tuple[str, ...] = ("process",)

    def __init__(self, log_dir: Path, on_exit: ExitCallback) -> None:
        self.log_dir = log_dir
        self.on_exit = on_exit
        self._procs: dict[str, _Proc] = {}

    async def start(self, launch: Launch) -> Started:
        template = launch.template
        ports = {name: free_port() for name in template.ports}
        variables = port_environment(template.ports, list(ports.values()))
        variables.update(
            {
                REPLICA_ENV: launch.replica,
                RUNTIME_ENV: "process",
                "CORRAL_SERVICE": launch.service,
                "CORRAL_NODE": launch.node,
            }
        )
        argv = [expand(arg, variables) for arg in template.command]
        env = dict(os.environ)
        env.update({key: expand(value, variables) for key, value in template.env.items()})
        env.update(variables)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{launch.replica}.log"
        # opened here, not in a thread: a cancelled thread hop would leak the file
        with open(log_path, "ab") as log:  # noqa: ASYNC230
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_child_setup,
                )
            except FileNotFoundError as exc:
                raise DriverError(f"command not found: {argv[0]}") from exc
            except PermissionError as exc:
                raise DriverError(f"command not executable: {argv[0]}") from exc
            except OSError as exc:
                raise DriverError(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc
        proc = _Proc(process, env)
        proc.waiter = asyncio.create_task(self._wait(launch.replica, proc), name=launch.replica)
        self._procs[launch.replica] = proc
        return Started(pid=process.pid, ports=ports)

    async def _wait(self, replica: str, proc: _Proc) -> None:
        code = await proc.process.wait()
        if self._procs.get(replica) is proc:
            del self._procs[replica]
        if not proc.stopping:
            reason = f"killed by signal {-code}" if code < 0 else ""
            await self.on_exit(replica, code, reason)

    async def stop(self, replica: str, grace: float) -> int | None:
        proc = self._procs.get(replica)
        if proc is None:
            return None
        proc.stopping = True
        pid = proc.process.pid
        _signal_group(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.process.wait(), timeout=grace)
        except TimeoutError:
            _signal_group(pid, signal.SIGKILL)
            await proc.process.wait()
        _signal_group(pid, signal.SIGKILL)  # anything the replica forked and left behind
        if proc.waiter is not None:
            await proc.waiter
        self._procs.pop(replica, None)
        return proc.process.returncode

    def running(self) -> set[str]:
        return set(self._procs)

    async def recover(self, claimed: dict[str, int | None]) -> Recovered:
        """A process cannot be adopted (it is not our child, so its exit cannot be awaited):
        any replica a previous agent left running is killed, and started again if claimed."""
        cleaned: list[str] = []
        for replica, pid in claimed.items():
            if replica in self._procs or pid is None:
                continue
            try:
                process = psutil.Process(pid)
                environ = process.environ()
                if environ.get(REPLICA_ENV) != replica or environ.get(RUNTIME_ENV) != "process":
                    continue  # the pid was reused by something that is not ours
            except (psutil.Error, OSError):
                continue
            _signal_group(pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                process.wait(timeout=5)
            cleaned.append(replica)
        return Recovered(removed=cleaned)

    async def exec(self, replica: str, argv: list[str], timeout: float) -> int:
        """Run `argv` with the replica's environment (its ports included)."""
        proc = self._procs.get(replica)
        if proc is None:
            raise DriverError(f"replica {replica} is not running")
        try:
            child = await asyncio.create_subprocess_exec(
                *argv,
                env=proc.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        except OSError as exc:
            raise DriverError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        try:
            return await asyncio.wait_for(child.wait(), timeout)
        except TimeoutError:
            _signal_group(child.pid, signal.SIGKILL)
            await child.wait()
            raise

    async def stats(self, replica: str) -> dict[str, float] | None:
        proc = self._procs.get(replica)
        if proc is None:
            return None
        return await asyncio.to_thread(_usage, proc)

    async def close(self) -> None:
        for proc in list(self._procs.values()):
            if proc.waiter is not None:
                proc.waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await proc.waiter


def _usage(proc: _Proc) -> dict[str, float] | None:
    """Blocking: cpu cores and resident bytes of the replica and everything it started. The
    cpu is averaged since the previous call (since the process started, the first time);
    children it has reaped still count, through their parent's children times."""
    try:
        root = psutil.Process(proc.process.pid)
        tree = [root, *root.children(recursive=True)]
        born = root.create_time()
    except psutil.Error:
        return None
    seconds, rss = 0.0, 0
    for member in tree:
        with contextlib.suppress(psutil.Error):
            times = member.cpu_times()
            seconds += times.user + times.system + times.children_user + times.children_system
            rss += member.memory_info().rss
    now = time.monotonic()
    if proc.cpu is not None:
        before, at = proc.cpu
        elapsed = now - at
    else:
        before, elapsed = 0.0, time.time() - born
    proc.cpu = (seconds, now)
    usage = {"memory": float(rss)}
    if elapsed > 0:
        usage["cpu"] = max(0.0, (seconds - before) / elapsed)
    return usage


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
