"""A simulated node, like KWOK: every replica 'runs' at once and costs nothing."""

from __future__ import annotations

from corral.workers.agent.drivers.base import DriverError, ExitCallback, Launch, Recovered, Started


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

    async def recover(self, claimed: dict[str, int | None]) -> Recovered:
        return Recovered()

    async def exec(self, replica: str, argv: list[str], timeout: float) -> int:
        if replica not in self._running:
            raise DriverError(f"replica {replica} is not running")
        return 0

    async def stats(self, replica: str) -> dict[str, float] | None:
        return None  # it runs nothing, so it uses nothing worth reporting

    async def crash(self, replica: str, code: int = 1) -> None:
        """Simulate a replica dying on its own (for tests)."""
        self._running.discard(replica)
        if self.on_exit is not None:
            await self.on_exit(replica, code, "")

    async def close(self) -> None:
        return None
