"""`Bus.connect`'s first connection against real sockets and a real nats-server: bounded by
`connect_timeout`, retried while NATS starts, and unlimited reconnects once connected."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from nats_support import NatsServer
from support import eventually

from corral.bus.connection import Bus
from corral.bus.embedded import free_port
from corral.bus.settings import Settings
from corral.bus.unreachable import InvalidNatsUrl, NatsUnreachableError

pytestmark = pytest.mark.timeout(30)
LOGGER = "corral.bus.connecting"


def settings_for(url: str, tmp_path: Path, connect_timeout: float) -> Settings:
    return Settings(
        nats_url=url,
        prefix=f"t{uuid.uuid4().hex[:10]}",
        data_dir=tmp_path / ".corral",
        node_id="local",
        docker="off",
        connect_timeout=connect_timeout,
        pipeline_log_bytes=16 * 1024**2,
    )


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


async def test_a_closed_port_fails_within_the_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with pytest.raises(NatsUnreachableError) as caught:
        # the bound is only this test's guard; the deadline itself is 1.5 s
        await asyncio.wait_for(Bus.connect(settings_for(url, tmp_path, 1.5)), 20)
    text = str(caught.value)
    assert text.startswith(f"cannot reach NATS at {url} within 1.5 s (")
    assert "Connect call failed" in text
    assert "CORRAL_CONNECT_TIMEOUT" in text
    # attempts every half second, but one warning: the next is due 5 s after the first
    said = warnings(caplog)
    assert len(said) == 1, said
    assert said[0].startswith(f"cannot reach NATS at {url} yet: ")
    # `no_leaked_tasks` (conftest) fails the test if a nats-py task is still running


async def test_the_password_stays_out_of_the_error(tmp_path: Path) -> None:
    url = f"nats://corral:hunter2-{uuid.uuid4().hex}@127.0.0.1:{free_port()}"
    with pytest.raises(NatsUnreachableError) as caught:
        await asyncio.wait_for(Bus.connect(settings_for(url, tmp_path, 0.5)), 20)
    assert "hunter2" not in str(caught.value)
    assert "nats://corral:***@127.0.0.1:" in str(caught.value)


async def test_an_unusable_url_fails_at_once(tmp_path: Path) -> None:
    url = "nats://127.0.0.1:not-a-port"
    with pytest.raises(InvalidNatsUrl) as caught:
        await asyncio.wait_for(Bus.connect(settings_for(url, tmp_path, 25)), 20)
    assert str(caught.value).startswith(f"cannot use NATS URL '{url}': ")
    assert caught.value.exit_code == 2


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A port that accepts connections and never says a word (not NATS)."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for writer in writers:
        writer.close()
    await server.wait_closed()


async def test_a_server_that_never_answers_fails_within_the_deadline(
    tmp_path: Path, silent_server: int
) -> None:
    url = f"nats://127.0.0.1:{silent_server}"
    with pytest.raises(NatsUnreachableError) as caught:
        await asyncio.wait_for(Bus.connect(settings_for(url, tmp_path, 1.5)), 20)
    assert "no attempt finished" in str(caught.value)


async def test_the_first_connection_waits_for_a_nats_that_starts_late(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, own_nats: NatsServer
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    connecting = asyncio.create_task(Bus.connect(settings_for(own_nats.url, tmp_path, 25)))
    try:
        await eventually(lambda: warnings(caplog), within=10, what="a failed first attempt")
        assert not connecting.done()
        await own_nats.start()
        bus = await asyncio.wait_for(connecting, 20)
    finally:
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
    try:
        assert bus.nc.is_connected
        await bus.buckets.services.items()  # provisioned
    finally:
        await bus.close()


async def test_once_connected_a_restarted_nats_is_rejoined(
    tmp_path: Path, own_nats: NatsServer
) -> None:
    """The deadline is for the first connection only: past it, a NATS outage is waited out."""
    await own_nats.start()
    bus = await Bus.connect(settings_for(own_nats.url, tmp_path, 1.0))
    try:
        await own_nats.stop()
        await eventually(lambda: not bus.nc.is_connected, within=10, what="disconnected")
        # not a wait for a condition: the outage must outlast connect_timeout (1 s), which
        # bounds the first connection only
        await asyncio.sleep(1.5)
        assert not bus.nc.is_closed
        await own_nats.start()
        await eventually(lambda: bus.nc.is_connected, within=15, what="reconnected")
        await eventually(_kv_works(bus), within=10, what="a KV write after the restart")
    finally:
        await bus.close()


async def test_closing_while_nats_is_away_does_not_hang_or_raise(
    tmp_path: Path, own_nats: NatsServer
) -> None:
    await own_nats.start()
    bus = await Bus.connect(settings_for(own_nats.url, tmp_path, 1.0))
    await own_nats.stop()
    await eventually(lambda: not bus.nc.is_connected, within=10, what="disconnected")
    await asyncio.wait_for(bus.close(), 10)
    assert bus.nc.is_closed


async def test_a_nats_without_jetstream_is_a_clear_error(
    tmp_path: Path, own_nats: NatsServer
) -> None:
    await own_nats.start(jetstream=False)
    with pytest.raises(NatsUnreachableError) as caught:
        await asyncio.wait_for(Bus.connect(settings_for(own_nats.url, tmp_path, 5)), 20)
    assert str(caught.value).startswith(
        f"NATS at {own_nats.url} answers, but its JetStream does not ("
    )
    assert "-js" in str(caught.value)
    # and the connection it made is closed: `no_leaked_tasks` checks its tasks are gone


def _kv_works(bus: Bus) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        try:
            await bus.buckets.leases.put("probe", b"1")
        except Exception:
            return False
        return True

    return probe
