"""What every worker shares: the context handed to it and the protocol it implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from faststream.nats import NatsBroker

from corral.bus.connection import Bus
from corral.bus.events import Emitter
from corral.bus.settings import Settings


@dataclass
class Context:
    settings: Settings
    bus: Bus

    def emitter(self, source: str) -> Emitter:
        return Emitter(self.bus, f"{self.settings.source}/{source}")


class Worker(Protocol):
    name: str

    def register(self, broker: NatsBroker) -> None:
        """Add the worker's subscribers to the broker (before it starts)."""

    async def start(self) -> None:
        """Start watches and loops, once the broker is connected."""

    async def stop(self) -> None:
        """Stop everything it started; leave no task behind."""
