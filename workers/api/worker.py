"""The api worker's thin handler: decode, validate, compare-and-set, announce.

Commands arrive in batches. Each batch is grouped by service; a group is applied in order, in
memory (`applying.fold`), and written with one compare-and-set per service, pipelined with
every other write of the batch. The `…accepted` events go out pipelined too, and only then
are the commands acked. A group whose write loses the race falls back to the one-at-a-time
path, which reads again and decides again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from corral.bus.codec import decode, encode
from corral.bus.edge import CommandEdge, headers_of
from corral.bus.lifecycle import Loops
from corral.bus.store import Versioned
from corral.schemas.commands import OWNERS
from corral.schemas.envelope import CloudEvent, utcnow
from corral.schemas.errors import ConflictError, TemporaryError, UnknownCommand
from corral.schemas.events import CommandAccepted
from corral.schemas.state import ServiceRecord
from corral.workers.api.applying import Command, Result, fold, parse_command
from corral.workers.runtime import Context

log = logging.getLogger(__name__)
MAX_DELIVER = 5
CAS_ATTEMPTS = 8
BATCH_DEADLINE = 15.0
Group = list[tuple[Msg, Command]]


class ApiWorker:
    name = "api"

    def __init__(self, ctx: Context, *, batch_size: int = 256) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.emitter = ctx.emitter("api")
        self.edge = CommandEdge(self.bus, self.emitter, max_deliver=MAX_DELIVER)
        self.batch_size = batch_size
        # what this worker last read or wrote of each service: a hint, never the truth. The
        # compare-and-set decides; a stale entry only costs a conflict and a fresh read.
        self.known: dict[str, Versioned[ServiceRecord] | None] = {}
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
            try:
                await self._sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe: %s", exc)
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

    # the batch path ---------------------------------------------------------------------
    def _owned_elsewhere(self, subject: str) -> bool:
        parsed = self.bus.names.parse_cmd(subject)
        return parsed is not None and OWNERS.get(parsed[0], "api") != "api"

    def parse(self, msg: Msg) -> Command:
        parsed = self.bus.names.parse_cmd(msg.subject)
        if parsed is None:
            expected = f"{self.bus.names.prefix}.cmd.<resource>.<name>.<verb>"
            raise UnknownCommand(f"subject {msg.subject!r} is not {expected}")
        return parse_command(*parsed, decode(headers_of(msg), msg.data))

    async def handle_batch(self, msgs: list[Msg]) -> None:
        groups: dict[str, Group] = defaultdict(list)
        one_by_one: list[Msg] = []
        others: list[Msg] = []
        for msg in msgs:
            if self._owned_elsewhere(msg.subject):
                others.append(msg)
                continue
            try:
                command = self.parse(msg)
            except Exception:
                one_by_one.append(msg)  # the edge turns the error into its outcome
                continue
            groups[command.name].append((msg, command))
        try:
            retry = await asyncio.wait_for(self._apply_groups(groups), BATCH_DEADLINE)
        except Exception as exc:
            # nothing was acked: every command of the batch is delivered again, and the
            # services' recent command ids make the ones already applied act once
            log.warning("batch of %d commands failed, redelivering: %s", len(msgs), exc)
            await asyncio.gather(
                *(msg.nak(delay=1.0) for group in groups.values() for msg, _ in group),
                return_exceptions=True,
            )
            retry = []
        for msg in others:
            await msg.ack()  # another worker consumes it from the same stream
        for msg in one_by_one:
            await self.edge.run(msg, self.handle)
        for group in retry:
            for msg, _ in group:
                await self.edge.run(msg, self.handle)

    async def _apply_groups(self, groups: dict[str, Group]) -> list[Group]:
        """Returns the groups whose compare-and-set lost, for the one-at-a-time path."""
        js = self.bus.js
        now = utcnow()
        bucket = self.bus.names.services
        planned: list[
            tuple[str, list[tuple[Msg, Command]], ServiceRecord | None, list[Result]]
        ] = []
        writes: dict[str, Any] = {}
        missing = [name for name in groups if name not in self.known]
        if missing:
            found = await asyncio.gather(*(self.bus.buckets.services.get(n) for n in missing))
            self.known.update(zip(missing, found, strict=True))
        for name, group in groups.items():
            current = self.known[name]
            record, results = fold([c for _, c in group], current.value if current else None, now)
            planned.append((name, group, record, results))
            if record is not None:
                expected = str(current.revision if current else 0)
                writes[name] = await js.publish_async(
                    f"$KV.{bucket}.{name}",
                    record.model_dump_json().encode(),
                    headers={"Nats-Expected-Last-Subject-Sequence": expected},
                )
        acks = dict(
            zip(writes, await asyncio.gather(*writes.values(), return_exceptions=True), strict=True)
        )
        retry: list[Group] = []
        announced: list[Any] = []
        settled: list[tuple[Msg, Result]] = []
        for name, group, record, results in planned:
            ack = acks.get(name)
            if isinstance(ack, BaseException):
                self.known.pop(name, None)
                retry.append(group)  # lost the race (or the write failed): decide again
                continue
            if record is not None and ack is not None:
                self.known[name] = Versioned(record, int(ack.seq))
            for (msg, _), result in zip(group, results, strict=True):
                if result.error is None:
                    subject, event = self._accepted_event(result)
                    headers, payload = encode(event)
                    announced.append(await js.publish_async(subject, payload, headers=headers))
                settled.append((msg, result))
        await asyncio.gather(*announced)
        for msg, result in settled:
            if result.error is not None:
                await self.edge.reject(
                    msg, result.error.reason_code, result.error.reason, result.error.errors
                )
            await msg.ack()
        return retry

    # the one-at-a-time path ---------------------------------------------------------------
    async def handle(self, msg: Msg) -> None:
        command = self.parse(msg)
        services = self.bus.buckets.services
        for _ in range(CAS_ATTEMPTS):
            current = await services.get(command.name)
            self.known[command.name] = current
            record, [result] = fold([command], current.value if current else None, utcnow())
            if result.error is not None:
                raise result.error
            try:
                if record is not None:
                    revision = await (
                        services.update(command.name, record, current.revision)
                        if current is not None
                        else services.create(command.name, record)
                    )
                    self.known[command.name] = Versioned(record, revision)
            except ConflictError:
                continue  # somebody else wrote: read again and decide again
            subject, event = self._accepted_event(result)
            headers, payload = encode(event)
            await self.bus.js.publish(subject, payload, headers=headers)
            return
        raise TemporaryError(f"service {command.name!r} kept changing under us", delay=0.5)

    def _accepted_event(self, result: Result) -> tuple[str, CloudEvent]:
        command = result.command
        data = CommandAccepted(
            command=command.verb,
            command_id=command.id,
            name=command.name,
            generation=result.generation,
            changed=result.changed,
            duplicate=result.duplicate,
        )
        # the first answer has a fixed id, so a redelivered command's answer is deduplicated;
        # the answer to a command sent twice is an event of its own
        return self.emitter.build(
            command.resource,
            command.name,
            "accepted",
            data,
            correlation=command.id,
            event_id=None if result.duplicate else f"{command.id}.accepted",
        )
