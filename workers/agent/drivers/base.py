"""The seam between the agent and whatever runs replicas."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from corral.schemas.state import Template


@dataclass(frozen=True)
class Launch:
    replica: str
    service: str
    node: str
    template: Template
    generation: int = 0


@dataclass(frozen=True)
class Started:
    pid: int | None
    ports: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Recovered:
    """What `recover` found of a previous agent's replicas on this node."""

    adopted: dict[str, Started] = field(default_factory=dict)
    """replicas still running that this driver now owns again (containers, found by label)"""
    removed: list[str] = field(default_factory=list)
    """replicas it stopped and removed: not claimed, or not adoptable (processes)"""


ExitCallback = Callable[[str, int, str], Awaitable[None]]
"""Called with (replica id, exit code, reason) when a replica ends on its own. The reason is
empty, or says more than the code can (for example "out of memory")."""


class DriverError(Exception):
    """A replica could not be started; the message says why, for the user."""


class Driver(Protocol):
    name: str
    provides: tuple[str, ...]
    """the kinds of spec it can run, which the node advertises to the scheduler"""

    async def start(self, launch: Launch) -> Started:
        """Start a replica; raise DriverError with a user-readable reason if it cannot."""

    async def stop(self, replica: str, grace: float) -> int | None:
        """Stop a replica (SIGTERM, then kill after `grace`), remove what it leaves, and
        return its exit code (None if it was not running)."""

    def running(self) -> set[str]:
        """Replica ids this driver runs now."""

    async def recover(self, claimed: dict[str, int | None]) -> Recovered:
        """Deal with what a previous agent on this node left running. `claimed` maps the ids
        of replicas still assigned here to the pid last reported for them. Adopt the claimed
        ones where the driver can; stop and remove everything else it owns."""

    async def exec(self, replica: str, argv: list[str], timeout: float) -> int:
        """Run `argv` beside (or inside) a running replica, for an exec probe; return its exit
        code. Raise DriverError if it cannot run, TimeoutError past `timeout`."""

    async def stats(self, replica: str) -> dict[str, float] | None:
        """What a running replica uses now: `cpu` in cores (averaged since the previous call)
        and `memory` in bytes, either left out when unknown; None if it is not running or the
        driver cannot tell (a simulated node)."""

    async def close(self) -> None:
        """Release resources; does not stop replicas."""
