"""The api worker's thin handler: decode, validate, compare-and-set, announce.

Commands arrive in batches. Each batch is grouped by service; a group is applied in order, in
memory (`applying.fold`), and written with one compare-and-set per service, pipelined with
every other write of the batch. The `…accepted` events go out pipelined too, and only then
are the commands acked. A group whose write loses the race falls back to the one-at-a-time
path, which reads again and decides again.

Batches are pulled with `bus.pulling.Puller` and written with `bus.publishing.Pipeline`, and
several are under way at once when they hold different services (see `_consume`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from corral.bus.codec import decode, encode
from corral.bus.edge import CommandEdge, headers_of
from corral.bus.events import accepted_id
from corral.bus.lifecycle import Loops, unsubscribe_quietly
from corral.bus.publishing import Pipeline
from corral.bus.pulling import Puller
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
IN_FLIGHT = 4
"""batches applied at once: one deciding and writing, the others waiting for the server. A
batch of 256 takes about 40 ms of CPU and its writes and events about as long again, up to
70 ms on a busy machine, so four keep the worker busy with some slack"""
STOP_WITHIN = 5.0
"""how long stopping waits for the batches under way"""
"""CloudEvents ids here are at most 256 characters (`corral.schemas.envelope.CloudEvent`)"""
Group = list[tuple[Msg, Command]]


@dataclass
class Sorted:
    """A fetched batch, decoded: the commands grouped by service, in order; the messages that
    did not parse (the edge answers them one by one); and those another worker owns."""

    groups: dict[str, Group] = field(default_factory=lambda: defaultdict(list))
    one_by_one: list[Msg] = field(default_factory=list)
    others: list[Msg] = field(default_factory=list)


class ApiWorker:
    name = "api"

    def __init__(self, ctx: Context, *, batch_size: int = 1024) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.emitter = ctx.emitter("api")
        self.edge = CommandEdge(self.bus, self.emitter, max_deliver=MAX_DELIVER)
        self.batch_size = batch_size
        # what this worker last read or wrote of each service: a hint, never the truth. The
        # compare-and-set decides; a stale entry only costs a conflict and a fresh read.
        self.known: dict[str, Versioned[ServiceRecord] | None] = {}
        self._sub: JetStreamContext.PullSubscription | None = None
        self._puller: Puller | None = None
        self.pipeline = Pipeline(self.bus.nc)
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
        await self.pipeline.start()
        self._sub = await self.bus.js.pull_subscribe(
            names.all_cmd,
            durable=f"{names.prefix}-api",
            stream=names.cmd_stream,
            config=ConsumerConfig(ack_wait=10, max_deliver=MAX_DELIVER + 1, max_ack_pending=10_000),
        )
        # nats-py's pull subscription above makes (or finds) the durable consumer; the batches
        # are pulled through our own `Puller`, which costs a fraction per message
        self._puller = Puller(self.bus.nc, names.cmd_stream, f"{names.prefix}-api")
        await self._puller.start()
        self.loops.spawn(self._consume(), "commands")

    async def stop(self) -> None:
        await self.loops.stop()
        await self.pipeline.stop()
        if self._puller is not None:
            await self._puller.stop()
            self._puller = None
        if self._sub is not None:
            await unsubscribe_quietly(self._sub)
            self._sub = None

    async def _consume(self) -> None:
        # Batches overlap where they can without changing what any command sees:
        # - the next batch is fetched, decoded and validated while this one is applied;
        # - a batch starts while up to IN_FLIGHT - 1 earlier ones wait for their writes, events
        #   and acks, unless it holds a service one of them holds: then it waits until that
        #   batch has written (its one-at-a-time retries included), so that each service's
        #   commands still apply in the order sent. Without the wait the compare-and-set would
        #   still refuse a write on a stale record, but a retry of the earlier batch could then
        #   land after the later one.
        ahead: asyncio.Task[Sorted | None] | None = None
        flying: list[tuple[asyncio.Task[None], set[str], asyncio.Event]] = []
        try:
            while self.loops.running:
                fetching = ahead or asyncio.create_task(self._fetch())
                ahead = None
                batch = await fetching
                flying = [entry for entry in flying if not entry[0].done()]
                if batch is None:
                    continue
                if self.loops.running:
                    ahead = asyncio.create_task(self._fetch())
                names = set(batch.groups)
                for _, held, written in flying:
                    if held & names:
                        await written.wait()
                while len(flying) >= IN_FLIGHT:
                    tasks = [entry[0] for entry in flying]
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    flying = [entry for entry in flying if not entry[0].done()]
                written = asyncio.Event()
                task = asyncio.create_task(self._run(batch, written), name="api:batch")
                flying.append((task, names, written))
        finally:
            if ahead is not None:
                ahead.cancel()  # what it fetched is delivered again after ack_wait
                with contextlib.suppress(BaseException):
                    await ahead
            if flying:  # let the batches under way be written and acked: it takes milliseconds
                tasks = [entry[0] for entry in flying]
                _, late = await asyncio.wait(tasks, timeout=STOP_WITHIN)
                for task in late:  # their commands are delivered again after ack_wait
                    task.cancel()
                if late:
                    await asyncio.wait(late)

    async def _run(self, batch: Sorted, written: asyncio.Event) -> None:
        try:
            finish = await self.handle_sorted(batch)
        except Exception:
            log.exception("a batch of commands failed; they are delivered again after ack_wait")
            return
        finally:
            written.set()
        if finish is not None:
            await finish

    async def _fetch(self) -> Sorted | None:
        assert self._puller is not None
        try:
            msgs = await self._puller.fetch(self.batch_size, timeout=1.0)
        except (TimeoutError, NatsTimeoutError):
            return None
        except Exception as exc:  # a disconnect: the client reconnects; try again soon
            log.warning("fetching commands failed: %s", exc)
            await self.loops.sleep(0.5)
            return None
        return self.sort(msgs) if msgs else None

    # the batch path ---------------------------------------------------------------------
    def parse(self, msg: Msg) -> Command:
        parsed = self.bus.names.parse_cmd(msg.subject)
        if parsed is None:
            expected = f"{self.bus.names.prefix}.cmd.<resource>.<name>.<verb>"
            raise UnknownCommand(f"subject {msg.subject!r} is not {expected}")
        return parse_command(*parsed, decode(headers_of(msg), msg.data))

    def sort(self, msgs: list[Msg]) -> Sorted:
        """Decode and validate a batch, and group it by service. Reads no state."""
        batch = Sorted()
        parse_cmd = self.bus.names.parse_cmd
        for msg in msgs:
            parsed = parse_cmd(msg.subject)
            if parsed is None:
                batch.one_by_one.append(msg)  # the edge rejects it: not a command subject
                continue
            if OWNERS.get(parsed[0], "api") != "api":
                batch.others.append(msg)
                continue
            try:
                command = parse_command(*parsed, decode(msg.headers, msg.data))
            except Exception:
                batch.one_by_one.append(msg)  # the edge turns the error into its outcome
                continue
            batch.groups[command.name].append((msg, command))
        return batch

    async def handle_batch(self, msgs: list[Msg]) -> Coroutine[Any, Any, None] | None:
        """Apply a batch. Returns its last step, for the caller to await (soon): waiting for
        the `…accepted` events to be stored, then acking the commands."""
        return await self.handle_sorted(self.sort(msgs))

    async def handle_sorted(self, batch: Sorted) -> Coroutine[Any, Any, None] | None:
        groups, one_by_one, others = batch.groups, batch.one_by_one, batch.others
        finish: Coroutine[Any, Any, None] | None = None
        try:
            retry, settle = await asyncio.wait_for(self._apply_groups(groups), BATCH_DEADLINE)
            finish = self._finish(groups, settle)
        except Exception as exc:
            await self._redeliver(groups, exc)
            retry = []
        for msg in others:
            await msg.ack()  # another worker consumes it from the same stream
        for msg in one_by_one:
            await self.edge.run(msg, self.handle)
        for group in retry:
            for msg, _ in group:
                await self.edge.run(msg, self.handle)
        return finish

    async def _redeliver(self, groups: dict[str, Group], exc: BaseException) -> None:
        # nothing was acked: every command of the batch is delivered again, and the
        # services' recent command ids make the ones already applied act once
        count = sum(len(group) for group in groups.values())
        log.warning("batch of %d commands failed, redelivering: %s", count, exc)
        await asyncio.gather(
            *(msg.nak(delay=1.0) for group in groups.values() for msg, _ in group),
            return_exceptions=True,
        )

    async def _finish(
        self, groups: dict[str, Group], settle: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            await asyncio.wait_for(settle(), BATCH_DEADLINE)
        except Exception as exc:
            await self._redeliver(groups, exc)

    async def _apply_groups(
        self, groups: dict[str, Group]
    ) -> tuple[list[Group], Callable[[], Awaitable[None]]]:
        """Folds and writes every group, and sends the `…accepted` events. Returns the groups
        whose compare-and-set lost, for the one-at-a-time path, and the step that waits for
        the events to be stored and then acks (or rejects) each command."""
        now = utcnow()
        bucket = self.bus.names.services
        planned: list[
            tuple[str, list[tuple[Msg, Command]], ServiceRecord | None, list[Result]]
        ] = []
        writes = self.pipeline.batch()
        written: dict[str, int] = {}  # service -> its write's index in `writes`
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
                written[name] = await writes.publish(
                    f"$KV.{bucket}.{name}",
                    record.model_dump_json().encode(),
                    {"Nats-Expected-Last-Subject-Sequence": expected},
                )
        acks = await writes.wait(BATCH_DEADLINE)
        retry: list[Group] = []
        announced = self.pipeline.batch()
        settled: list[tuple[Msg, Result]] = []
        for name, group, record, results in planned:
            ack = acks[written[name]] if name in written else None
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
                    await announced.publish(subject, payload, headers)
                settled.append((msg, result))

        async def settle() -> None:
            for outcome in await announced.wait(BATCH_DEADLINE):
                if isinstance(outcome, BaseException):
                    raise outcome  # nothing acked yet: the batch is delivered again
            for msg, result in settled:
                if result.error is not None:
                    await self.edge.reject(
                        msg, result.error.reason_code, result.error.reason, result.error.errors
                    )
                await msg.ack()

        return retry, settle

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
            event_id=None if result.duplicate else accepted_id(command.id),
        )
