"""Running one job attempt to completion: a local process (its own session, killed with the
agent by PDEATHSIG, as the process driver does) or a container on the node's Docker engine
(labelled with the node and the job, the workspace bind-mounted at /workspace). Output comes
back line by line, on stdout and stderr apart."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from corral.schemas.runs import JobAssignment

LineSink = Callable[[str, bytes], Awaitable[None]]
DRAIN_WITHIN = 2.0
CHUNK = 64 * 1024
CONTAINER_WORKSPACE = "/workspace"
JOB_LABEL = "corral.job"
NODE_LABEL = "corral.node"


class ExecutionError(Exception):
    """The job could not start; the message says why, for the user."""


class Execution(Protocol):
    def terminate(self, grace: float) -> None:
        """Ask it to stop now (SIGTERM), and kill it after `grace` seconds."""

    async def wait(self, timeout: float, grace: float) -> tuple[int, bool]:
        """Its exit code, and whether it ran past `timeout` (then it was stopped)."""

    async def drained(self) -> None:
        """Until every line it wrote has been handed on."""


class _Lines:
    """Splits a byte stream into lines for the sink."""

    def __init__(self, stream: str, sink: LineSink) -> None:
        self.stream = stream
        self.sink = sink
        self.buffer = b""

    async def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            await self.sink(self.stream, line + b"\n")
        if len(self.buffer) > CHUNK:
            await self.sink(self.stream, self.buffer)
            self.buffer = b""

    async def close(self) -> None:
        if self.buffer:
            await self.sink(self.stream, self.buffer)
            self.buffer = b""


SETPRIV = shutil.which("setpriv")
"""util-linux's setpriv sets PDEATHSIG and execs the job: the agent then spawns without a
preexec_fn, which lets Python use vfork (about 1 ms a spawn instead of 5)"""


def _child_setup() -> None:
    # Linux only: SIGKILL this job when the agent dies, even by kill -9
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class ProcessExecution:
    """A job process watched from the event loop itself: its exit through a pidfd and its
    pipes through non-blocking reads, so no thread is started per job (asyncio's threaded
    child watcher would start one for each, and wait for it to run)."""

    def __init__(self, process: subprocess.Popen[bytes], sink: LineSink) -> None:
        self.process = process
        self.loop = asyncio.get_running_loop()
        self._kill: asyncio.TimerHandle | None = None
        self.exited: asyncio.Future[int] = self.loop.create_future()
        self.readers = [
            asyncio.create_task(self._read(process.stdout, _Lines("stdout", sink))),
            asyncio.create_task(self._read(process.stderr, _Lines("stderr", sink))),
        ]
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            self._waiter = asyncio.ensure_future(asyncio.to_thread(process.wait))
            self._waiter.add_done_callback(lambda f: self._set_exit(f.result()))
        else:
            self.loop.add_reader(self._pidfd, self._on_pidfd)

    def _on_pidfd(self) -> None:
        assert self._pidfd is not None
        self.loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._set_exit(self.process.wait())

    def _set_exit(self, code: int) -> None:
        if not self.exited.done():
            self.exited.set_result(code)

    async def _read(self, pipe: Any, lines: _Lines) -> None:
        if pipe is None:
            return
        fd = pipe.fileno()
        os.set_blocking(fd, False)
        chunks: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            try:
                chunk = os.read(fd, CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.loop.remove_reader(fd)
            chunks.put_nowait(chunk)

        self.loop.add_reader(fd, readable)
        try:
            while chunk := await chunks.get():
                await lines.feed(chunk)
            await lines.close()
        finally:
            self.loop.remove_reader(fd)
            pipe.close()

    def terminate(self, grace: float) -> None:
        if self.exited.done() or self._kill is not None:
            return
        pid = self.process.pid
        _signal_group(pid, signal.SIGTERM)
        self._kill = self.loop.call_later(grace, _signal_group, pid, signal.SIGKILL)

    async def wait(self, timeout: float, grace: float) -> tuple[int, bool]:
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except TimeoutError:
            timed_out = True
            self.terminate(grace)
            await self.exited
        if self._kill is not None:
            self._kill.cancel()
        _signal_group(self.process.pid, signal.SIGKILL)  # whatever it forked and left behind
        code = self.exited.result()
        return (128 - code if code < 0 else code), timed_out

    async def drained(self) -> None:
        _, pending = await asyncio.wait(self.readers, timeout=DRAIN_WITHIN)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)

    def abandon(self) -> None:
        """The agent stops: make sure nothing of it is left."""
        _signal_group(self.process.pid, signal.SIGKILL)
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


async def start_process(job: JobAssignment, workspace: Path, sink: LineSink) -> ProcessExecution:
    # on the loop on purpose, one job after another: without a preexec_fn this is a vfork
    # and an exec, about a millisecond. Spawning on threads instead (measured in
    # bench/pipeline.py, a 10-wide layer on 2 busy cores) was slower: Popen's Python half
    # then fights the loop for the GIL, and a layer's last job started later, not sooner.
    return ProcessExecution(_spawn(job, workspace), sink)


def _spawn(job: JobAssignment, workspace: Path) -> subprocess.Popen[bytes]:
    """Start the job's process."""
    env = dict(os.environ)
    env.update(job.env)
    env["CORRAL_WORKSPACE"] = str(workspace)
    argv = [SETPRIV, "--pdeathsig", "KILL", "--", *job.argv] if SETPRIV else job.argv
    if SETPRIV and not (shutil.which(job.argv[0], path=env.get("PATH")) or "/" in job.argv[0]):
        raise ExecutionError(f"command not found: {job.argv[0]}")
    try:
        # no preexec_fn (setpriv sets PDEATHSIG), so this is a vfork and an exec
        return subprocess.Popen(
            argv,
            cwd=workspace,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=None if SETPRIV else _child_setup,
        )
    except FileNotFoundError as exc:
        raise ExecutionError(f"command not found: {job.argv[0]}") from exc
    except PermissionError as exc:
        raise ExecutionError(f"command not executable: {job.argv[0]}") from exc
    except OSError as exc:
        raise ExecutionError(f"cannot start {job.argv[0]}: {exc.strerror or exc}") from exc


class ContainerExecution:
    """A container; its output is read by one thread, and its end awaited by another."""

    def __init__(self, client: Any, container: Any, sink: LineSink) -> None:
        self.client = client
        self.container = container
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self.out = _Lines("stdout", sink)
        self.err = _Lines("stderr", sink)
        self.stopping: asyncio.Future[Any] | None = None
        stream = client.api.attach(
            container.id, stdout=True, stderr=True, stream=True, logs=True, demux=True
        )
        self.reader = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.reader.start()
        self.forward = asyncio.create_task(self._forward())

    def _pump(self, stream: Any) -> None:
        try:
            for out, err in stream:
                if out:
                    self.loop.call_soon_threadsafe(self.queue.put_nowait, ("stdout", out))
                if err:
                    self.loop.call_soon_threadsafe(self.queue.put_nowait, ("stderr", err))
        except Exception:
            pass
        finally:
            with contextlib.suppress(Exception):
                stream.close()  # the attach holds its own socket to the engine
            with contextlib.suppress(Exception):
                stream._response.close()  # and its response, which nobody else closes
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    async def _forward(self) -> None:
        while (item := await self.queue.get()) is not None:
            stream, chunk = item
            await (self.out if stream == "stdout" else self.err).feed(chunk)
        await self.out.close()
        await self.err.close()

    def terminate(self, grace: float) -> None:
        if self.stopping is None:
            self.stopping = asyncio.ensure_future(
                asyncio.to_thread(self.container.stop, timeout=max(1, round(grace)))
            )

    async def wait(self, timeout: float, grace: float) -> tuple[int, bool]:
        waiting = asyncio.ensure_future(
            asyncio.to_thread(self.container.wait, timeout=int(timeout + grace + 60))
        )
        timed_out = False
        try:
            result = await asyncio.wait_for(asyncio.shield(waiting), timeout)
        except TimeoutError:
            timed_out = True
            self.terminate(grace)
            result = await waiting
        if self.stopping is not None:
            with contextlib.suppress(Exception):
                await self.stopping
        return int(result.get("StatusCode", -1)), timed_out

    async def drained(self) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.forward), DRAIN_WITHIN)
        except TimeoutError:
            self.forward.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.forward
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.container.remove, force=True)


async def start_container(
    job: JobAssignment, workspace: Path, client: Any, sink: LineSink
) -> ContainerExecution:
    from docker.errors import APIError, ImageNotFound

    env = {**job.env, "CORRAL_WORKSPACE": CONTAINER_WORKSPACE}

    def create() -> Any:
        container = client.containers.create(
            job.image,
            command=job.argv,
            working_dir=CONTAINER_WORKSPACE,
            environment=env,
            volumes={str(workspace.resolve()): {"bind": CONTAINER_WORKSPACE, "mode": "rw"}},
            network_mode="host",
            labels={NODE_LABEL: job.node, JOB_LABEL: f"{job.run}.{job.job}.{job.attempt}"},
        )
        return container

    try:
        container = await asyncio.to_thread(create)
    except ImageNotFound as exc:
        raise ExecutionError(
            f"image {job.image} is not on node {job.node} (Corral never pulls)"
        ) from exc
    except APIError as exc:
        raise ExecutionError(f"cannot create the container: {exc.explanation or exc}") from exc
    execution = ContainerExecution(client, container, sink)
    try:
        await asyncio.to_thread(container.start)
    except APIError as exc:
        await execution.drained()
        raise ExecutionError(f"cannot start the container: {exc.explanation or exc}") from exc
    return execution


async def start_execution(
    job: JobAssignment, workspace: Path, docker: Any | None, sink: LineSink
) -> Execution:
    if job.image is None:
        return await start_process(job, workspace, sink)
    if docker is None:
        raise ExecutionError(f"node {job.node} has no Docker engine for image {job.image}")
    return await start_container(job, workspace, docker, sink)


async def remove_leftover_containers(client: Any, node: str) -> int:
    """Job containers a crashed agent of this node left behind."""

    def sweep() -> int:
        labels = [f"{NODE_LABEL}={node}", JOB_LABEL]
        found = client.containers.list(all=True, filters={"label": labels})
        for container in found:
            with contextlib.suppress(Exception):
                container.remove(force=True)
        return len(found)

    return await asyncio.to_thread(sweep)
