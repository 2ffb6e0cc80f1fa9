"""Containers on the local Docker engine, like Nomad's docker driver. Each replica is one
container on the host network, with its own free ports, labelled with its node and replica so
that a later agent can find it again. Deaths come from the engine's event stream (one reader
thread per driver), never from polling. Corral never pulls: the image must be on the node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import docker
from docker.errors import (
    APIError,
    DockerException,
    ImageNotFound,
    InvalidArgument,
    InvalidVersion,
    NotFound,
)
from docker.models.containers import Container
from docker.types.daemon import CancellableStream

from corral.schemas.spec import expand, port_environment
from corral.workers.agent.drivers.base import (
    DriverError,
    ExitCallback,
    Launch,
    Recovered,
    Started,
)
from corral.workers.agent.drivers.ports import free_port

log = logging.getLogger(__name__)

NODE_LABEL = "corral.node"
REPLICA_LABEL = "corral.replica"
PORTS_LABEL = "corral.ports"
OOM_REASON = "out of memory (OOM killed)"
API_TIMEOUT = 60
"""seconds for one engine call; the short timeout of the first ping is only for finding out
whether an engine answers at all"""

Event = dict[str, Any]


def docker_client_or_none(timeout: float = 2.0) -> docker.DockerClient | None:
    """A client for the engine DOCKER_HOST (or the default socket) names, if it answers."""
    try:
        client = docker.from_env(timeout=max(1, math.ceil(timeout)))
    except Exception as exc:
        _close_sockets(exc)
        return None
    try:
        client.ping()
    except Exception as exc:
        _close_sockets(exc)
        with contextlib.suppress(Exception):
            client.close()
        return None
    client.api.timeout = API_TIMEOUT
    return client


def _close_sockets(exc: BaseException | None) -> None:
    """docker-py leaves the socket of a failed connect in the traceback, for the garbage
    collector to find and warn about later, somewhere unrelated: close it now."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frame = exc.__traceback__
        while frame is not None:
            for value in frame.tb_frame.f_locals.values():
                if isinstance(value, socket.socket):
                    value.close()
            frame = frame.tb_next
        exc = exc.__cause__ or exc.__context__


@dataclass
class _Box:
    """What the driver knows of one replica's container."""

    replica: str
    ports: dict[str, int] = field(default_factory=dict)
    container: str = ""
    settling: bool = True
    """start or adoption is still under way: a death is held in `died` until it is done"""
    stopping: bool = False
    oom: bool = False
    died: int | None = None
    cpu: tuple[int, int] | None = None
    """(container cpu ns, system cpu ns) of the previous stats call"""


class _EventReader:
    """One thread reading the engine's container events for this node and handing each to
    `deliver`. If the stream breaks while open (the engine restarted), it connects again and
    calls `resync`, since events in between are lost."""

    def __init__(
        self,
        client: docker.DockerClient,
        filters: dict[str, Any],
        deliver: Callable[[Event], None],
        resync: Callable[[], None],
    ) -> None:
        self._client = client
        self._filters = filters
        self._deliver = deliver
        self._resync = resync
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._stream: CancellableStream[Event] | None = None
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        """Blocking. Once it returns, the engine has subscribed us: no later event is lost."""
        self._stream = self._client.events(decode=True, filters=self._filters)
        self._thread = threading.Thread(target=self._run, name="corral-docker-events", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Blocking: ends the stream and joins the thread."""
        self._closed.set()
        with self._lock:
            if self._stream is not None:
                with contextlib.suppress(Exception):
                    self._stream.close()
        if self._thread is not None:
            self._thread.join(timeout=API_TIMEOUT)

    def _run(self) -> None:
        stream = self._stream
        while stream is not None:
            problem = "it ended"
            try:
                for event in stream:
                    self._deliver(event)
            except Exception as exc:
                problem = str(exc)
            if not self._closed.is_set():
                log.warning("docker event stream broke (%s); reconnecting", problem)
            stream = self._reconnect()

    def _reconnect(self) -> CancellableStream[Event] | None:
        delay = 0.5
        while not self._closed.is_set():
            try:
                stream = self._client.events(decode=True, filters=self._filters)
            except Exception as exc:
                _close_sockets(exc)
                log.warning("docker event stream: cannot reconnect: %s", exc)
                self._closed.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            with self._lock:
                if self._closed.is_set():
                    with contextlib.suppress(Exception):
                        stream.close()
                    return None
                self._stream = stream
            self._resync()
            return stream
        return None


class DockerDriver:
    name = "docker"
    provides: tuple[str, ...] = ("docker",)

    def __init__(
        self, node_id: str, on_exit: ExitCallback, client: docker.DockerClient | None = None
    ) -> None:
        self.node_id = node_id
        self.on_exit = on_exit
        self._client = client
        self._boxes: dict[str, _Box] = {}
        self._ids: dict[str, _Box] = {}
        self._execs: dict[str, asyncio.Future[int | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._events: _EventReader | None = None
        self._opening = asyncio.Lock()

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            raise DriverError("no Docker engine answers on this node")
        return self._client

    async def open(self) -> None:
        """Connect and follow the engine's events; start, recover and exec call it first."""
        async with self._opening:
            if self._events is not None:
                return
            if self._client is None:
                self._client = await asyncio.to_thread(docker_client_or_none)
            loop = asyncio.get_running_loop()

            def deliver(event: Event) -> None:
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    loop.call_soon_threadsafe(self._on_event, event)

            def resync() -> None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._start_resync)

            events = _EventReader(
                self.client, {"type": "container", "label": [self._node_label]}, deliver, resync
            )
            try:
                await asyncio.to_thread(events.open)
            except DockerException as exc:
                raise DriverError(f"cannot follow Docker events: {_reason(exc)}") from exc
            self._events = events

    @property
    def _node_label(self) -> str:
        return f"{NODE_LABEL}={self.node_id}"

    async def start(self, launch: Launch) -> Started:
        template = launch.template
        if template.image is None:
            raise DriverError("the docker driver runs images, and this replica names none")
        if launch.replica in self._boxes:
            raise DriverError(f"replica {launch.replica} is already running")
        await self.open()
        ports = {name: free_port() for name in template.ports}
        variables = port_environment(template.ports, list(ports.values()))
        variables.update(
            {
                "CORRAL_REPLICA_ID": launch.replica,
                "CORRAL_SERVICE": launch.service,
                "CORRAL_NODE": self.node_id,
            }
        )
        env = {key: expand(value, variables) for key, value in template.env.items()}
        env.update(variables)
        options: dict[str, Any] = {
            "command": [expand(arg, variables) for arg in template.command] or None,
            "name": f"corral-{self.node_id}-{launch.replica}",
            "network_mode": "host",
            "environment": env,
            "labels": {
                "corral.service": launch.service,
                REPLICA_LABEL: launch.replica,
                "corral.generation": str(launch.generation),
                NODE_LABEL: self.node_id,
                PORTS_LABEL: json.dumps(ports),
            },
        }
        if template.resources.cpu > 0:
            options["nano_cpus"] = int(template.resources.cpu * 1e9)
        if template.resources.memory > 0:
            options["mem_limit"] = template.resources.memory
        # registered before the container exists, so that even an instant death is reported
        box = _Box(launch.replica, ports)
        self._boxes[launch.replica] = box
        container: Container | None = None
        try:
            container = await asyncio.to_thread(self._create, template.image, options)
            box.container = str(container.id)
            self._ids[box.container] = box
            await asyncio.to_thread(container.start)
            await asyncio.to_thread(container.reload)
        except DockerException as exc:
            self._forget(box)
            if container is not None:
                with contextlib.suppress(DockerException):
                    await asyncio.to_thread(self._remove, str(container.id))
            raise DriverError(_reason(exc)) from exc
        except BaseException:
            self._forget(box)
            raise
        self._settle(box)
        return Started(pid=_pid(container), ports=ports)

    def _create(self, image: str, options: dict[str, Any]) -> Container:
        """Blocking. `containers.create` never pulls (`containers.run` would)."""
        try:
            self.client.images.get(image)
        except ImageNotFound:
            raise DriverError(
                f"image {image} is not on this node; Corral does not pull; load or import it first"
            ) from None
        with contextlib.suppress(NotFound):
            self.client.containers.get(options["name"]).remove(force=True)  # left over
        try:
            return self.client.containers.create(image, **options)
        except ImageNotFound:
            raise DriverError(f"image {image} is not on this node (it was removed)") from None

    async def stop(self, replica: str, grace: float) -> int | None:
        box = self._boxes.get(replica)
        if box is None:
            return None
        box.stopping = True
        try:
            return await asyncio.to_thread(self._stop, box.container, grace)
        except DockerException as exc:
            raise DriverError(f"cannot stop replica {replica}: {_reason(exc)}") from exc
        finally:
            self._forget(box)

    def _stop(self, container_id: str, grace: float) -> int | None:
        """Blocking: SIGTERM, SIGKILL after `grace` (the engine counts whole seconds)."""
        if not container_id:
            return None
        try:
            container = self.client.containers.get(container_id)
            container.stop(timeout=max(0, math.ceil(grace)))
            code = int(container.wait()["StatusCode"])
        except NotFound:
            return None
        self._remove(container_id)
        return code

    def running(self) -> set[str]:
        return set(self._boxes)

    async def recover(self, claimed: dict[str, int | None]) -> Recovered:
        await self.open()
        try:
            return await self._recover(claimed)
        except DockerException as exc:
            raise DriverError(f"cannot recover containers: {_reason(exc)}") from exc

    async def _recover(self, claimed: dict[str, int | None]) -> Recovered:
        found = await asyncio.to_thread(
            self.client.containers.list,
            all=True,
            filters={"label": self._node_label},
            ignore_removed=True,
        )
        adopted: dict[str, Started] = {}
        removed: list[str] = []
        fresh: list[_Box] = []
        try:
            for container in found:
                cid = str(container.id)
                replica = container.labels.get(REPLICA_LABEL, container.name or cid)
                box = self._boxes.get(replica)
                live = bool(container.attrs.get("State", {}).get("Running"))
                if live and replica in claimed and (box is None or box.container == cid):
                    if box is None:
                        box = _Box(replica, _ports(container), cid)
                        self._boxes[replica] = box
                        self._ids[cid] = box
                        fresh.append(box)
                    adopted[replica] = Started(pid=_pid(container), ports=box.ports)
                    continue
                if box is not None and box.container == cid:
                    box.stopping = True
                    self._forget(box)
                await asyncio.to_thread(self._remove, cid)
                removed.append(replica)
            for box in fresh:
                # a death between the listing and now came before we knew the container
                state = await asyncio.to_thread(self._state, box.container)
                if box.died is None and not state.get("Running"):
                    box.died = int(state.get("ExitCode", -1))
        finally:
            for box in fresh:
                self._settle(box)
        return Recovered(adopted=adopted, removed=removed)

    async def exec(self, replica: str, argv: list[str], timeout: float) -> int:
        box = self._boxes.get(replica)
        if box is None or not box.container:
            raise DriverError(f"replica {replica} is not running")
        await self.open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        api = self.client.api
        try:
            exec_id = str(
                (await asyncio.to_thread(api.exec_create, box.container, argv, False, False))["Id"]
            )
        except DockerException as exc:
            raise DriverError(f"cannot run {argv[0]} in {replica}: {_reason(exc)}") from exc
        done: asyncio.Future[int | None] = loop.create_future()
        self._execs[exec_id] = done
        try:
            await asyncio.to_thread(api.exec_start, exec_id, True)
            # the engine cannot kill an exec: past the timeout it runs on in the container
            async with asyncio.timeout_at(deadline):
                code = await done
            if code is None:
                code = int((await asyncio.to_thread(api.exec_inspect, exec_id))["ExitCode"])
            return code
        except DockerException as exc:
            raise DriverError(f"cannot run {argv[0]} in {replica}: {_reason(exc)}") from exc
        finally:
            self._execs.pop(exec_id, None)

    async def stats(self, replica: str) -> dict[str, float] | None:
        box = self._boxes.get(replica)
        if box is None or not box.container:
            return None
        try:
            raw = await asyncio.to_thread(self._stats, box.container)
        except DockerException as exc:
            log.debug("no stats for %s: %s", replica, _reason(exc))
            return None
        usage, box.cpu = container_usage(raw, box.cpu)
        return usage

    def _stats(self, container_id: str) -> dict[str, Any]:
        """Blocking: one sample at once (one-shot), or, on an engine too old for that, the
        engine's own two samples a second apart."""
        api = self.client.api
        try:
            raw: dict[str, Any] = api.stats(container_id, stream=False, one_shot=True)
        except (InvalidVersion, InvalidArgument):
            raw = api.stats(container_id, stream=False)
        return raw

    async def close(self) -> None:
        events, self._events = self._events, None
        if events is not None:
            await asyncio.to_thread(events.close)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for done in self._execs.values():
            done.cancel()
        if self._client is not None:
            await asyncio.to_thread(self._client.close)

    # --- events, on the loop

    def _on_event(self, event: Event) -> None:
        action = str(event.get("Action", ""))
        actor = event.get("Actor") or {}
        attributes: dict[str, str] = actor.get("Attributes") or {}
        if action == "exec_die":
            done = self._execs.pop(attributes.get("execID", ""), None)
            if done is not None and not done.done():
                code = attributes.get("exitCode")
                done.set_result(None if code is None else int(code))
            return
        box = self._ids.get(str(actor.get("ID") or event.get("id") or ""))
        if box is None or box.stopping:
            return
        if action == "oom":
            box.oom = True
        elif action == "die":
            box.died = int(attributes.get("exitCode", -1))
            if not box.settling:
                self._report(box)

    def _settle(self, box: _Box) -> None:
        box.settling = False
        if box.died is not None:
            self._report(box)

    def _report(self, box: _Box) -> None:
        if self._ids.get(box.container) is not box:
            return  # already reported
        self._forget(box)
        self._spawn(self._exited(box), f"exit-{box.replica}")

    def _start_resync(self) -> None:
        self._spawn(self._resync(), "docker-resync")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _exited(self, box: _Box) -> None:
        oom = box.oom
        try:
            oom = await asyncio.to_thread(self._remove, box.container) or oom
        except DockerException as exc:
            log.warning("cannot remove the container of %s: %s", box.replica, _reason(exc))
        code = -1 if box.died is None else box.died
        await self.on_exit(box.replica, code, OOM_REASON if oom else "")

    async def _resync(self) -> None:
        """After a break in the event stream: report deaths the stream did not."""
        for box in [b for b in self._ids.values() if not b.settling and not b.stopping]:
            try:
                state = await asyncio.to_thread(self._state, box.container)
            except DockerException as exc:
                log.warning("cannot inspect the container of %s: %s", box.replica, _reason(exc))
                continue
            if not state.get("Running"):
                box.died = int(state.get("ExitCode", -1))
                box.oom = box.oom or bool(state.get("OOMKilled"))
                self._report(box)

    def _forget(self, box: _Box) -> None:
        if self._boxes.get(box.replica) is box:
            del self._boxes[box.replica]
        if self._ids.get(box.container) is box:
            del self._ids[box.container]

    # --- blocking helpers, run in threads

    def _state(self, container_id: str) -> dict[str, Any]:
        try:
            state: dict[str, Any] = self.client.api.inspect_container(container_id)["State"]
        except NotFound:
            return {"Running": False, "ExitCode": -1}
        return state

    def _remove(self, container_id: str) -> bool:
        """Remove a container; return whether the kernel killed it for memory."""
        try:
            container = self.client.containers.get(container_id)
        except NotFound:
            return False
        oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
        with contextlib.suppress(NotFound):
            container.remove(force=True)
        return oom


def container_usage(
    raw: dict[str, Any], previous: tuple[int, int] | None
) -> tuple[dict[str, float], tuple[int, int] | None]:
    """Cores and bytes from one engine stats sample, as `docker stats` computes them: the
    container's cpu time over the machine's, times its cpus, between two samples (the
    engine's `precpu_stats` when it has one, else our previous sample); memory without the
    inactive page cache. Returns the usage and the sample to keep for next time."""
    usage: dict[str, float] = {}
    cpu = raw.get("cpu_stats") or {}
    total = (cpu.get("cpu_usage") or {}).get("total_usage")
    system = cpu.get("system_cpu_usage")
    sample = (int(total), int(system)) if total is not None and system is not None else None
    pre = raw.get("precpu_stats") or {}
    pre_total = (pre.get("cpu_usage") or {}).get("total_usage")
    pre_system = pre.get("system_cpu_usage")
    before = (int(pre_total), int(pre_system)) if pre_total and pre_system else previous
    if sample is not None and before is not None and sample[1] > before[1]:
        per_cpu = (cpu.get("cpu_usage") or {}).get("percpu_usage") or [0]
        cpus = cpu.get("online_cpus") or len(per_cpu)
        share = max(0, sample[0] - before[0]) / (sample[1] - before[1])
        usage["cpu"] = share * cpus
    memory = raw.get("memory_stats") or {}
    if memory.get("usage") is not None:
        details = memory.get("stats") or {}
        cache = details.get("inactive_file", details.get("total_inactive_file", 0))
        usage["memory"] = float(max(0, int(memory["usage"]) - int(cache or 0)))
    return usage, sample


def _pid(container: Container) -> int | None:
    pid = container.attrs.get("State", {}).get("Pid")
    return int(pid) if pid else None


def _ports(container: Container) -> dict[str, int]:
    try:
        ports = json.loads(container.labels.get(PORTS_LABEL, "{}"))
        return {str(name): int(number) for name, number in ports.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


_EXEC_FAILED = re.compile(r'exec: "([^"]+)": (.+?)(?:: unknown)?$')


def _reason(exc: DockerException) -> str:
    """The engine's message, without the layers of runtime detail above the cause."""
    text = str(exc)
    if isinstance(exc, APIError) and exc.explanation:
        explanation = exc.explanation
        text = explanation.decode() if isinstance(explanation, bytes) else str(explanation)
    found = _EXEC_FAILED.search(text)
    if found:
        return f"cannot run {found[1]}: {found[2]}"
    return text if len(text) <= 300 else text[:297] + "..."
