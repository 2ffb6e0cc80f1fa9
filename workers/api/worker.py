"""The api worker's thin handler: decode, validate, compare-and-set, announce."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from faststream import AckPolicy
from faststream.nats import ConsumerConfig, JStream, NatsBroker, NatsMessage, PullSub
from nats.aio.msg import Msg

from corral.bus.codec import decode
from corral.bus.edge import CommandEdge, headers_of
from corral.schemas.envelope import utcnow
from corral.schemas.errors import ConflictError, TemporaryError, UnknownCommand
from corral.schemas.events import CommandAccepted
from corral.schemas.state import CommandSeen
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

    def register(self, broker: NatsBroker) -> None:
        names = self.bus.names

        @broker.subscriber(
            names.all_cmd,
            stream=JStream(names.cmd_stream, declare=False),
            durable=f"{names.prefix}-api",
            pull_sub=PullSub(batch_size=self.batch_size, timeout=0.05, batch=True),
            ack_policy=AckPolicy.MANUAL,
            config=ConsumerConfig(ack_wait=10, max_deliver=MAX_DELIVER + 1),
        )
        async def on_commands(message: NatsMessage) -> None:
            # no body parameter: the edge decodes the raw messages itself, so that a payload
            # FastStream cannot parse is still rejected with a reason instead of vanishing
            raw = message.raw_message
            await self.handle_batch(raw if isinstance(raw, list) else [raw])

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

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
        seen = await buckets.commands.get(command.id)
        if seen is not None:
            await self._accepted(command, seen.value.generation, changed=False, duplicate=True)
            return
        generation, changed = await self._write(command)
        await buckets.commands.put(
            command.id, CommandSeen(outcome="accepted", generation=generation)
        )
        await self._accepted(command, generation, changed=changed, duplicate=False)

    async def _write(self, command: Command) -> tuple[int, bool]:
        services = self.bus.buckets.services
        for _ in range(CAS_ATTEMPTS):
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
