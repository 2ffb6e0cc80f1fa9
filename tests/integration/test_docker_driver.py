"""The docker driver against a real engine, with the busybox image imported from
busybox-static: ports, labels and limits; deaths reported from the event stream; stop with a
grace period; no pull; adoption by a later agent; exec; OOM. Each test has its own node id,
and every container labelled with it is removed afterwards."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import docker
import pytest
from docker.errors import ImageNotFound, NotFound
from docker_support import remove_node_containers
from support import eventually

from corral.schemas.spec import Resources
from corral.schemas.state import Template
from corral.workers.agent.drivers.base import DriverError, Launch
from corral.workers.agent.drivers.docker import OOM_REASON, DockerDriver

pytestmark = [pytest.mark.docker, pytest.mark.timeout(60)]

BB = "/bin/busybox"
FOREVER = f"while true; do {BB} sleep 1; done"


def sh(script: str) -> list[str]:
    return [BB, "sh", "-c", script]


@dataclass
class Exits:
    """What on_exit was told, with when."""

    seen: list[tuple[str, int, str]] = field(default_factory=list)
    at: list[float] = field(default_factory=list)

    async def __call__(self, replica: str, code: int, reason: str) -> None:
        self.seen.append((replica, code, reason))
        self.at.append(time.monotonic())

    def of(self, replica: str) -> list[tuple[str, int, str]]:
        return [exit for exit in self.seen if exit[0] == replica]


@pytest.fixture
def node_id(docker_engine: docker.DockerClient) -> Iterator[str]:
    node = f"test-{uuid.uuid4().hex[:8]}"
    yield node
    left = remove_node_containers(docker_engine, node)
    assert not left, f"containers left behind: {left}"


@pytest.fixture
async def drivers(node_id: str) -> AsyncIterator[Callable[[Exits], DockerDriver]]:
    """Make drivers for this test's node; all are closed at teardown, and none may leave its
    event thread running."""
    made: list[DockerDriver] = []

    def make(exits: Exits) -> DockerDriver:
        driver = DockerDriver(node_id, exits)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await driver.close()
    threads = [t.name for t in threading.enumerate() if t.name == "corral-docker-events"]
    assert not threads, "the event thread outlived close()"


def launch(node: str, image: str, command: list[str], replica: str = "", **template) -> Launch:
    return Launch(
        replica=replica or f"r-{uuid.uuid4().hex[:6]}",
        service="svc",
        node=node,
        template=Template(image=image, command=command, **template),
        generation=4,
    )


def container(client: docker.DockerClient, node: str, replica: str):
    return client.containers.get(f"corral-{node}-{replica}")


def gone(client: docker.DockerClient, node: str, replica: str) -> bool:
    try:
        container(client, node, replica)
    except NotFound:
        return True
    return False


async def no_report_pending(driver: DockerDriver, exits: Exits, node: str, image: str) -> None:
    """Events arrive in order: once a later replica's own exit is reported, any report due
    for what happened before it would have come too."""
    marker = launch(node, image, sh("exit 0"))
    before = len(exits.seen)
    await driver.start(marker)
    await eventually(lambda: exits.of(marker.replica), within=5, what="the marker's exit")
    assert exits.seen[before:] == [(marker.replica, 0, "")]


async def test_httpd_on_its_port_with_labels_env_and_limits(
    docker_engine, busybox, node_id, drivers
) -> None:
    exits = Exits()
    driver = drivers(exits)
    spec = launch(
        node_id,
        busybox,
        [BB, "httpd", "-f", "-p", "127.0.0.1:${PORT}", "-h", "/"],
        ports=["http", "admin"],
        env={"GREETING": "hello on ${PORT_ADMIN}"},
        resources=Resources(cpu=0.5, memory="64Mi"),
    )
    started = await driver.start(spec)
    port = started.ports["http"]
    assert started.pid is not None
    assert started.pid > 0
    assert set(started.ports) == {"http", "admin"}
    assert driver.running() == {spec.replica}

    def get() -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/etc/hostname", timeout=2) as r:
                return bytes(r.read())
        except OSError:
            return None

    body = await eventually(lambda: asyncio.to_thread(get), within=10, what="httpd to answer")
    assert body.strip()

    attrs = container(docker_engine, node_id, spec.replica).attrs
    assert attrs["Config"]["Labels"] == {
        "corral.service": "svc",
        "corral.replica": spec.replica,
        "corral.generation": "4",
        "corral.node": node_id,
        "corral.ports": f'{{"http": {port}, "admin": {started.ports["admin"]}}}',
    }
    host = attrs["HostConfig"]
    assert host["NetworkMode"] == "host"
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == 64 * 1024 * 1024
    env = dict(item.split("=", 1) for item in attrs["Config"]["Env"])
    assert env["GREETING"] == f"hello on {started.ports['admin']}"
    assert env["PORT"] == env["PORT_HTTP"] == str(port)
    assert env["CORRAL_REPLICA_ID"] == spec.replica
    assert env["CORRAL_SERVICE"] == "svc"
    assert env["CORRAL_NODE"] == node_id

    # httpd is pid 1 and sets no TERM handler, so the kernel ignores TERM: killed after 1 s
    assert await driver.stop(spec.replica, grace=1) == 137
    assert gone(docker_engine, node_id, spec.replica)
    assert driver.running() == set()
    assert await driver.stop(spec.replica, grace=1) is None
    await no_report_pending(driver, exits, node_id, busybox)


async def test_exits_are_reported_once_from_the_event_stream(
    docker_engine, busybox, node_id, drivers
) -> None:
    exits = Exits()
    driver = drivers(exits)
    instant = launch(node_id, busybox, sh("exit 3"))
    await driver.start(instant)
    await eventually(lambda: exits.of(instant.replica), within=5, what="the instant exit")

    later = launch(node_id, busybox, sh(f"{BB} sleep 1; exit 3"))
    await driver.start(later)
    started_at = time.monotonic()
    await eventually(lambda: exits.of(later.replica), within=5, what="the exit after 1 s")
    latency = exits.at[-1] - started_at - 1.0
    print(f"die -> on_exit within about {latency * 1000:.0f} ms of the 1 s run")

    assert exits.seen == [(instant.replica, 3, ""), (later.replica, 3, "")]
    assert driver.running() == set()
    for replica in (instant.replica, later.replica):
        assert gone(docker_engine, node_id, replica)


async def test_a_break_in_the_event_stream_loses_no_death(
    docker_engine, busybox, node_id, drivers
) -> None:
    exits = Exits()
    driver = drivers(exits)
    spec = launch(node_id, busybox, sh(f"while [ ! -f /stop ]; do {BB} sleep 0.1; done; exit 5"))
    await driver.start(spec)
    # as when the engine restarts: the stream ends under the reader, which connects again
    # and looks for deaths it may have missed meanwhile
    events = driver._events
    assert events is not None
    stream = events._stream
    assert stream is not None
    stream.close()
    container(docker_engine, node_id, spec.replica).exec_run([BB, "touch", "/stop"])
    await eventually(lambda: exits.of(spec.replica), within=5, what="the exit after the break")
    assert exits.seen == [(spec.replica, 5, "")]
    await eventually(lambda: events._stream is not stream, within=5, what="a new stream")
    await no_report_pending(driver, exits, node_id, busybox)


async def test_a_command_that_cannot_start_is_a_driver_error(
    docker_engine, busybox, node_id, drivers
) -> None:
    exits = Exits()
    driver = drivers(exits)
    spec = launch(node_id, busybox, ["/no/such/binary"])
    with pytest.raises(DriverError, match="/no/such/binary"):
        await driver.start(spec)
    assert driver.running() == set()
    assert gone(docker_engine, node_id, spec.replica)
    await no_report_pending(driver, exits, node_id, busybox)


async def test_stop_waits_the_grace_then_kills(docker_engine, busybox, node_id, drivers) -> None:
    exits = Exits()
    driver = drivers(exits)
    polite = launch(node_id, busybox, sh(f'trap "exit 7" TERM; {BB} touch /ready; {FOREVER}'))
    stubborn = launch(node_id, busybox, sh(f'trap "" TERM; {BB} touch /ready; {FOREVER}'))
    for spec in (polite, stubborn):
        await driver.start(spec)
    for spec in (polite, stubborn):

        async def ready(replica: str = spec.replica) -> bool:
            return await driver.exec(replica, [BB, "test", "-f", "/ready"], 5) == 0

        await eventually(ready, within=10, what="the trap to be set")

    began = time.monotonic()
    assert await driver.stop(polite.replica, grace=20) == 7
    assert time.monotonic() - began < 5, "a replica that exits on TERM is not waited for"

    began = time.monotonic()
    assert await driver.stop(stubborn.replica, grace=1) == 137
    took = time.monotonic() - began
    assert 0.9 <= took < 10, f"killed after {took:.1f}s, not after the 1 s grace"

    for spec in (polite, stubborn):
        assert gone(docker_engine, node_id, spec.replica)
    assert driver.running() == set()
    assert exits.seen == []
    await no_report_pending(driver, exits, node_id, busybox)
    assert len(exits.seen) == 1, "stop called on_exit"


async def test_a_missing_image_is_not_pulled(docker_engine, node_id, drivers) -> None:
    driver = drivers(Exits())
    image = f"corral-test/absent-{uuid.uuid4().hex[:6]}:never"
    began = time.monotonic()
    with pytest.raises(DriverError, match="is not on this node; Corral does not pull"):
        await driver.start(launch(node_id, image, []))
    assert time.monotonic() - began < 5
    with pytest.raises(ImageNotFound):
        docker_engine.images.get(image)
    assert remove_node_containers(docker_engine, node_id) == []
    assert driver.running() == set()


async def test_a_later_agent_adopts_what_is_claimed_and_removes_the_rest(
    docker_engine, busybox, node_id, drivers
) -> None:
    first = drivers(Exits())
    keep = launch(
        node_id,
        busybox,
        sh(f"while [ ! -f /stop ]; do {BB} sleep 0.2; done; exit 5"),
        ports=["http"],
    )
    drop = launch(node_id, busybox, sh(FOREVER))
    kept = await first.start(keep)
    await first.start(drop)
    await first.close()
    for spec in (keep, drop):
        assert container(docker_engine, node_id, spec.replica).status == "running"

    exits = Exits()
    second = drivers(exits)
    found = await second.recover({keep.replica: None})
    assert found.adopted == {keep.replica: kept}
    assert found.removed == [drop.replica]
    assert gone(docker_engine, node_id, drop.replica)
    assert second.running() == {keep.replica}

    again = await second.recover({keep.replica: None})
    assert again.adopted == {keep.replica: kept}
    assert again.removed == []

    assert await second.exec(keep.replica, [BB, "touch", "/stop"], 5) == 0
    await eventually(lambda: exits.of(keep.replica), within=5, what="the adopted one's exit")
    assert exits.seen == [(keep.replica, 5, "")]
    assert gone(docker_engine, node_id, keep.replica)
    assert second.running() == set()


async def test_a_leftover_container_of_the_same_name_is_replaced(
    docker_engine, busybox, node_id, drivers
) -> None:
    first = drivers(Exits())
    spec = launch(node_id, busybox, sh(FOREVER))
    old = await first.start(spec)
    await first.close()
    second = drivers(Exits())
    new = await second.start(spec)
    assert new.pid != old.pid
    assert second.running() == {spec.replica}
    assert await second.stop(spec.replica, grace=0) == 137


async def test_exec_returns_exit_codes_and_times_out(busybox, node_id, drivers) -> None:
    driver = drivers(Exits())
    spec = launch(node_id, busybox, sh(FOREVER))
    await driver.start(spec)
    assert await driver.exec(spec.replica, [BB, "true"], 5) == 0
    assert await driver.exec(spec.replica, [BB, "false"], 5) == 1
    assert await driver.exec(spec.replica, sh("exit 42"), 5) == 42
    with pytest.raises(TimeoutError):
        await driver.exec(spec.replica, [BB, "sleep", "10"], 0.5)
    with pytest.raises(DriverError, match="not running"):
        await driver.exec("nobody", [BB, "true"], 5)
    with pytest.raises(DriverError, match="/no/such/probe"):
        await driver.exec(spec.replica, ["/no/such/probe"], 5)
    await driver.stop(spec.replica, grace=0)


async def test_out_of_memory_is_the_reason(docker_engine, busybox, node_id, drivers) -> None:
    if not docker_engine.info().get("MemoryLimit", False):
        pytest.skip("this engine cannot enforce memory limits")
    exits = Exits()
    driver = drivers(exits)
    hog = launch(
        node_id,
        busybox,
        sh("x=0123456789; while true; do x=$x$x; done"),
        resources=Resources(memory="8Mi"),
    )
    await driver.start(hog)
    await eventually(lambda: exits.of(hog.replica), within=30, what="the OOM kill")
    assert exits.seen == [(hog.replica, 137, OOM_REASON)]
    assert gone(docker_engine, node_id, hog.replica)
