"""The api worker's thin handler: decode, validate, compare-and-set, announce."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from corral.bus.codec import decode
from corral.bus.edge import CommandEdge, headers_of
from corral.bus.lifecycle import Loops
from corral.bus.store import Versioned
from corral.schemas.envelope import utcnow
from corral.schemas.errors import ConflictError, TemporaryError, UnknownCommand
from corral.schemas.events import CommandAccepted
from corral.schemas.state import CommandSeen, ServiceRecord
from corral.workers.api.applying import Command, apply, parse_command
from corral.workers.runtime import Context

log = logging.getLogger(__name__)
MAX_DELIVER = 5
CAS_ATTEMPTS = 8


class ApiWorker:
    name = "api"

    def __init__(self, ctx: Context, *, batch_size: int = 256) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.emitter = ctx.emitter("api")
        self.edge = CommandEdge(self.bus, self.emitter, max_deliver=MAX_DELIVER)
        self.batch_size = batch_size
        self._sub: JetStreamContext.PullSubscription | None = None
        self.loops = Loops("api")

    def register(self, broker: NatsBroker) -> None:
        # FastStream 0.7.8's batch pull loop imports nats.errors.TimeoutError, while nats-py's
        # fetch raises the builtin asyncio.TimeoutError when a pull expires; FastStream then
        # treats every idle poll as a crash and restarts the loop with growing delays, which
        # stalled commands for seconds. The api worker therefore pulls with nats-py itself,
        # inside the FastStream app's lifecycle.
        return None

    async def start(self) -> None:
        names = self.bus.names
        self._sub = await self.bus.js.pull_subscribe(
            names.all_cmd,
            durable=f"{names.prefix}-api",
            stream=names.cmd_stream,
            config=ConsumerConfig(ack_wait=10, max_deliver=MAX_DELIVER + 1, max_ack_pending=10_000),
        )
        self.loops.spawn(self._consume(), "commands")

    async def stop(self) -> None:
        await self.loops.stop()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _consume(self) -> None:
        assert self._sub is not None
        while self.loops.running:
            try:
                msgs = await self._sub.fetch(self.batch_size, timeout=1.0)
            except (TimeoutError, NatsTimeoutError):
                continue
            except Exception as exc:  # a disconnect: the client reconnects; try again soon
                log.warning("fetching commands failed: %s", exc)
                await self.loops.sleep(0.5)
                continue
            await self.handle_batch(msgs)

    async def handle_batch(self, msgs: list[Msg]) -> None:
        """Commands for one service run in order; different services run concurrently."""
        groups: dict[str, list[Msg]] = defaultdict(list)
        for msg in msgs:
            parsed = self.bus.names.parse_cmd(msg.subject)
            groups[f"{parsed[0]}.{parsed[1]}" if parsed else msg.subject].append(msg)

        async def run_group(group: list[Msg]) -> None:
            for msg in group:
                await self.edge.run(msg, self.handle)

        await asyncio.gather(*(run_group(group) for group in groups.values()))

    async def handle(self, msg: Msg) -> None:
        parsed = self.bus.names.parse_cmd(msg.subject)
        if parsed is None:
            expected = f"{self.bus.names.prefix}.cmd.<resource>.<name>.<verb>"
            raise UnknownCommand(f"subject {msg.subject!r} is not {expected}")
        event = decode(headers_of(msg), msg.data)
        command = parse_command(*parsed, event)
        buckets = self.bus.buckets
        # round trips are the cost here: read both at once, write both at once
        seen, current = await asyncio.gather(
            buckets.commands.get(command.id), buckets.services.get(command.name)
        )
        if seen is not None:
            await self._accepted(command, seen.value.generation, changed=False, duplicate=True)
            return
        generation, changed = await self._write(command, current)
        await asyncio.gather(
            buckets.commands.put(
                command.id, CommandSeen(outcome="accepted", generation=generation)
            ),
            self._accepted(command, generation, changed=changed, duplicate=False),
        )

    async def _write(
        self, command: Command, current: Versioned[ServiceRecord] | None
    ) -> tuple[int, bool]:
        services = self.bus.buckets.services
        for attempt in range(CAS_ATTEMPTS):
            if attempt:
                current = await services.get(command.name)
            outcome = apply(command, current.value if current else None, utcnow())
            generation = outcome.record.generation
            try:
                if not outcome.changed:
                    return generation, False
                if current is None:
                    await services.create(command.name, outcome.record)
                else:
                    await services.update(command.name, outcome.record, current.revision)
                return generation, True
            except ConflictError:
                continue  # somebody else wrote: read again and decide again
        raise TemporaryError(f"service {command.name!r} kept changing under us", delay=0.5)

    async def _accepted(
        self, command: Command, generation: int, *, changed: bool, duplicate: bool
    ) -> None:
        data = CommandAccepted(
            command=command.verb,
            command_id=command.id,
            name=command.name,
            generation=generation,
            changed=changed,
            duplicate=duplicate,
        )
        await self.emitter.emit(
            command.resource,
            command.name,
            "accepted",
            data,
            correlation=command.id,
            event_id=f"{command.id}.accepted" if not duplicate else None,
        )
