"""`on_server`: once it returns, the server has read the subscription made before it, so a
request from another connection finds it. nats-py's own `flush()` sends its PING ahead of
commands still queued for its flusher task; this test records what goes on the wire."""

from __future__ import annotations

from typing import Any

import nats
import pytest

from corral.bus.lifecycle import on_server

pytestmark = pytest.mark.timeout(30)


def record_writes(nc: Any) -> list[bytes]:
    """Everything the connection writes to its socket from now on, in order."""
    wire: list[bytes] = []
    transport = nc._transport
    write, writelines = transport.write, transport.writelines

    def one(data: bytes) -> None:
        wire.append(bytes(data))
        write(data)

    def many(lines: list[bytes]) -> None:
        wire.extend(bytes(line) for line in lines)
        writelines(lines)

    transport.write, transport.writelines = one, many
    return wire


def ping_after_sub(wire: list[bytes], subject: str) -> bool:
    text = b"".join(wire)
    sub, ping = text.find(f"SUB {subject}".encode()), text.rfind(b"PING\r\n")
    return 0 <= sub < ping


async def test_on_server_pings_after_the_subscription_is_written(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    other = await nats.connect(nats_url)
    try:
        wire = record_writes(nc)

        async def answer(msg: Any) -> None:
            await nc.publish(msg.reply, b"here")

        # with nats-py 2.16 a plain `flush()` here writes its PING before the SUB (checked
        # when this was written): the assertion below fails with it
        await nc.subscribe("on-server.settled", queue="q", cb=answer)
        await on_server(nc)
        assert ping_after_sub(wire, "on-server.settled"), b"".join(wire)
        reply = await other.request("on-server.settled", b"", timeout=5)
        assert reply.data == b"here"
    finally:
        await nc.close()
        await other.close()
