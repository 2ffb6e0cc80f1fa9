"""The gateway's listening socket says it is TCP, so asyncio turns Nagle off on every
connection it accepts (without it, each response waited ~40 ms on the client's delayed ACK)."""

from __future__ import annotations

import asyncio
import socket

from corral.services.gateway.worker import bind_socket


async def test_accepted_connections_have_nodelay() -> None:
    sock = bind_socket("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    seen: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = writer.get_extra_info("socket")
        seen.append(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=sock)
    try:
        host, port = sock.getsockname()[:2]
        reader, writer = await asyncio.open_connection(host, port)
        await reader.read()
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    assert seen == [1]
