"""A simulated node, like KWOK: every replica 'runs' at once and costs nothing."""

from __future__ import annotations

from corral.workers.agent.drivers.base import ExitCallback, Launch, Started


class FakeDriver:
    name = "fake"

    def __init__(
        self, on_exit: ExitCallback | None = None, provides: tuple[str, ...] = ("process",)
    ) -> None:
        self.provides = provides
        self._running: set[str] = set()
        self.on_exit = on_exit

    async def start(self, launch: Launch) -> Started:
        self._running.add(launch.replica)
        ports = {name: 0 for name in launch.template.ports}
        return Started(pid=None, ports=ports)

    async def stop(self, replica: str, grace: float) -> int | None:
        self._running.discard(replica)
        return 0

    def running(self) -> set[str]:
        return set(self._running)

    async def clean_stale(self, pids: dict[str, int]) -> list[str]:
        return []

    async def crash(self, replica: str, code: int = 1) -> None:
        """Simulate a replica dying on its own (for tests)."""
        self._running.discard(replica)
        if self.on_exit is not None:
            await self.on_exit(replica, code)

    async def close(self) -> None:
        return None
