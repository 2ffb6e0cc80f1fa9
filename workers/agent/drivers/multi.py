"""A node with more than one runtime: each replica goes to the driver for its kind of spec
(a container image to docker, a bare command to process)."""

from __future__ import annotations

import asyncio

from corral.workers.agent.drivers.base import Driver, DriverError, Launch, Recovered, Started


class MultiDriver:
    def __init__(self, drivers: list[Driver]) -> None:
        if not drivers:
            raise ValueError("a node needs at least one driver")
        self.drivers = drivers
        self.name = "+".join(d.name for d in drivers)
        self.provides: tuple[str, ...] = tuple(
            dict.fromkeys(kind for d in drivers for kind in d.provides)
        )

    def _for_kind(self, kind: str) -> Driver:
        for driver in self.drivers:
            if kind in driver.provides:
                return driver
        raise DriverError(
            f"this node cannot run {kind} replicas; it has {', '.join(self.provides)}"
        )

    def _running(self, replica: str) -> Driver | None:
        for driver in self.drivers:
            if replica in driver.running():
                return driver
        return None

    async def start(self, launch: Launch) -> Started:
        return await self._for_kind(launch.template.driver).start(launch)

    async def stop(self, replica: str, grace: float) -> int | None:
        driver = self._running(replica)
        return None if driver is None else await driver.stop(replica, grace)

    def running(self) -> set[str]:
        out: set[str] = set()
        for driver in self.drivers:
            out |= driver.running()
        return out

    def driver_of(self, replica: str) -> str | None:
        driver = self._running(replica)
        return None if driver is None else driver.name

    async def recover(self, claimed: dict[str, int | None]) -> Recovered:
        adopted: dict[str, Started] = {}
        removed: list[str] = []
        for driver in self.drivers:
            found = await driver.recover(claimed)
            adopted.update(found.adopted)
            removed.extend(found.removed)
            # a replica adopted by one driver is not another's to clean up
            claimed = {k: v for k, v in claimed.items() if k not in found.adopted}
        return Recovered(adopted=adopted, removed=removed)

    async def exec(self, replica: str, argv: list[str], timeout: float) -> int:
        driver = self._running(replica)
        if driver is None:
            raise DriverError(f"replica {replica} is not running")
        return await driver.exec(replica, argv, timeout)

    async def stats(self, replica: str) -> dict[str, float] | None:
        driver = self._running(replica)
        return None if driver is None else await driver.stats(replica)

    async def close(self) -> None:
        await asyncio.gather(*(driver.close() for driver in self.drivers))
