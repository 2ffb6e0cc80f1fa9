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


@dataclass(frozen=True)
class Started:
    pid: int | None
    ports: dict[str, int] = field(default_factory=dict)


ExitCallback = Callable[[str, int], Awaitable[None]]
"""Called with (replica id, exit code) when a replica ends on its own."""


class DriverError(Exception):
    """A replica could not be started; the message says why, for the user."""


class Driver(Protocol):
    name: str
    provides: tuple[str, ...]
    """the kinds of spec it can run, which the node advertises to the scheduler"""

    async def start(self, launch: Launch) -> Started:
        """Start a replica; raise DriverError with a user-readable reason if it cannot."""

    async def stop(self, replica: str, grace: float) -> int | None:
        """Stop a replica (SIGTERM, then kill after `grace`); return its exit code."""

    def running(self) -> set[str]:
        """Replica ids this driver runs now."""

    async def clean_stale(self, pids: dict[str, int]) -> list[str]:
        """Kill replicas a previous agent on this node left running; return their ids."""

    async def close(self) -> None:
        """Release resources; does not stop replicas."""
