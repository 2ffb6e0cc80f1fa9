"""The rules worker's thin handlers.

- Rule commands (`<prefix>.cmd.rule.<name>.apply|delete`) come from the command stream through
  a durable consumer of its own, and are stored in KV `<prefix>-rules`.
- Events come from the events stream (webhooks' `ext.*` events included) through a shared
  durable consumer, so copies of the worker split the work. Each event is matched against the
  rules; a match is checked against the rule's cooldown and rate limit (state in KV, written
  with compare-and-set, so every copy agrees), rendered, and sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from corral.bus.codec import decode, encode
from corral.bus.edge import CommandEdge, deliveries, headers_of
from corral.bus.events import accepted_id
from corral.bus.lifecycle import Loops, unsubscribe_quietly
from corral.bus.store import Mirror
from corral.schemas.commands import command_type
from corral.schemas.envelope import CloudEvent, utcnow
from corral.schemas.errors import (
    ConflictError,
    InvalidInput,
    NotFound,
    TemporaryError,
    UnknownCommand,
    field_errors_from_pydantic,
)
from corral.schemas.events import CommandAccepted
from corral.schemas.rules import (
    Rule,
    RuleFailed,
    RuleFired,
    RuleNotification,
    RuleRecord,
    RuleSkipped,
    RuleState,
)
from corral.schemas.state import ServiceRecord
from corral.workers.rules import actions, limits, templating
from corral.workers.rules.matching import event_document, fires
from corral.workers.runtime import Context

log = logging.getLogger(__name__)
MAX_DELIVER = 5
CAS_ATTEMPTS = 8


class RulesWorker:
    name = "rules"

    def __init__(self, ctx: Context, *, batch_size: int = 128) -> None:
        self.ctx = ctx
        self.bus = ctx.bus
        self.emitter = ctx.emitter("rules")
        self.edge = CommandEdge(self.bus, self.emitter, max_deliver=MAX_DELIVER)
        self.batch_size = batch_size
        b = ctx.bus.buckets
        self.rules: Mirror[RuleRecord] = Mirror(b.rules)
        self.services: Mirror[ServiceRecord] = Mirror(b.services)
        self.states: Mirror[RuleState] = Mirror(b.rule_state)
        self.loops = Loops("rules")
        self._subs: list[JetStreamContext.PullSubscription] = []
        self._evt_prefix = f"{self.bus.names.prefix}.evt."

    def register(self, broker: NatsBroker) -> None:
        return None  # pulls with nats-py, as the api worker does (see its note)

    async def start(self) -> None:
        await self.rules.start()
        await self.services.start()
        await self.states.start()
        names = self.bus.names
        commands = await self.bus.js.pull_subscribe(
            names.cmd("rule", "*", "*"),
            durable=f"{names.prefix}-rules-cmd",
            stream=names.cmd_stream,
            config=ConsumerConfig(ack_wait=30, max_deliver=MAX_DELIVER + 1),
        )
        events = await self.bus.js.pull_subscribe(
            names.all_evt,
            durable=f"{names.prefix}-rules",
            stream=names.evt_stream,
            # a new installation starts at the present: rules never fire on the audit log's
            # past; an existing durable resumes where the workers left off
            config=ConsumerConfig(
                ack_wait=30,
                max_deliver=MAX_DELIVER + 1,
                max_ack_pending=10_000,
                deliver_policy=DeliverPolicy.NEW,
            ),
        )
        self._subs = [commands, events]
        self.loops.spawn(self._pull(commands, self._on_commands), "commands")
        self.loops.spawn(self._pull(events, self._on_events), "events")

    async def stop(self) -> None:
        await self.loops.stop()
        for sub in self._subs:
            await unsubscribe_quietly(sub)
        self._subs = []
        await self.states.stop()
        await self.services.stop()
        await self.rules.stop()

    async def _pull(
        self,
        sub: JetStreamContext.PullSubscription,
        handle: Callable[[list[Msg]], Awaitable[None]],
    ) -> None:
        while self.loops.running:
            try:
                msgs = await sub.fetch(self.batch_size, timeout=1.0)
            except (TimeoutError, NatsTimeoutError):
                continue
            except Exception as exc:  # a disconnect: the client reconnects; try again soon
                log.warning("rules: fetching failed: %s", exc)
                await self.loops.sleep(0.5)
                continue
            await handle(msgs)

    # rule commands ------------------------------------------------------------------------
    async def _on_commands(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            await self.edge.run(msg, self.handle_command)

    async def handle_command(self, msg: Msg) -> None:
        parsed = self.bus.names.parse_cmd(msg.subject)
        if parsed is None or parsed[0] != "rule":
            raise UnknownCommand(f"subject {msg.subject!r} is not a rule command")
        _, name, verb = parsed
        command = decode(headers_of(msg), msg.data)
        who = {k.lower(): v for k, v in headers_of(msg).items()}.get(actions.REQUESTED_BY)
        if verb == "apply":
            rule = _parse_rule(command.data)
            if rule.name != name:
                raise InvalidInput(
                    f"the subject names rule {name!r} but the rule is named {rule.name!r}"
                )
            errors = templating.check(rule.then)
            if errors:
                raise InvalidInput(f"rule {name!r} has template errors", errors)
            await self._apply(rule, command, who or command.source)
        elif verb == "delete":
            await self._delete(name, command)
        else:
            raise UnknownCommand(f"rules take apply or delete, not {verb!r}")

    async def _apply(self, rule: Rule, command: CloudEvent, who: str) -> None:
        bucket = self.bus.buckets.rules
        for _ in range(CAS_ATTEMPTS):
            current = await bucket.get(rule.name)
            if current is not None and current.value.command_id == command.id:
                await self._accepted(command, rule.name, current.value.generation, False, True)
                return
            changed = current is None or current.value.rule != rule
            generation = (current.value.generation if current else 0) + int(changed)
            record = RuleRecord(
                rule=rule,
                generation=generation,
                command_id=command.id,
                requested_by=who,
                updated_at=utcnow(),
            )
            try:
                if current is None:
                    revision = await bucket.create(rule.name, record)
                elif changed:
                    revision = await bucket.update(rule.name, record, current.revision)
                else:
                    revision = current.revision
            except ConflictError:
                continue
            if changed:
                self.rules.note_written(rule.name, record, revision)
            await self._accepted(command, rule.name, generation, changed, False)
            return
        raise TemporaryError(f"rule {rule.name!r} kept changing under us", delay=0.5)

    async def _delete(self, name: str, command: CloudEvent) -> None:
        bucket = self.bus.buckets.rules
        for _ in range(CAS_ATTEMPTS):
            current = await bucket.get(name)
            if current is None:
                raise NotFound(f"rule {name!r} not found")
            try:
                await bucket.delete(name, current.revision)
            except ConflictError:
                continue
            self.rules.note_deleted(name)
            try:
                await self.bus.buckets.rule_state.delete(name)
            except Exception as exc:  # the state only holds cooldowns: stale is harmless
                log.debug("rule state of %s: %s", name, exc)
            await self._accepted(command, name, 0, True, False)
            return
        raise TemporaryError(f"rule {name!r} kept changing under us", delay=0.5)

    async def _accepted(
        self, command: CloudEvent, name: str, generation: int, changed: bool, duplicate: bool
    ) -> None:
        verb = command.type.rsplit(".", 1)[-1]
        data = CommandAccepted(
            command=verb,
            command_id=command.id,
            name=name,
            generation=generation,
            changed=changed,
            duplicate=duplicate,
        )
        await self.emitter.emit(
            "rule",
            name,
            "accepted",
            data,
            correlation=command.id,
            event_id=None if duplicate else accepted_id(command.id),
        )

    # events -------------------------------------------------------------------------------
    async def _on_events(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                await self.on_event(msg)
                await msg.ack()
            except TemporaryError as exc:
                await msg.nak(delay=exc.delay)
            except Exception:
                attempt = deliveries(msg)
                if attempt >= MAX_DELIVER:
                    log.exception("rules: giving up on %s after %d attempts", msg.subject, attempt)
                    await msg.ack()
                else:
                    log.exception("rules: error on %s (attempt %d)", msg.subject, attempt)
                    await msg.nak(delay=min(30.0, 0.5 * 2 ** (attempt - 1)))

    async def on_event(self, msg: Msg) -> None:
        rules = [r.value.rule for r in self.rules.items.values() if r.value.rule.enabled]
        if not rules:
            return
        subject = msg.subject.removeprefix(self._evt_prefix)
        try:
            event = decode(headers_of(msg), msg.data)
        except InvalidInput as exc:
            log.debug("rules: skipping an unreadable event on %s: %s", msg.subject, exc)
            return
        document = event_document(event)
        for rule in rules:
            if fires(rule, subject, document):
                await self.fire(rule, event, document)

    def context(self, rule: Rule, document: dict[str, Any]) -> dict[str, Any]:
        services = {}
        for name, item in self.services.items.items():
            record = item.value
            if record.deleted:
                continue
            spec = record.spec
            services[name] = {
                "name": name,
                "replicas": spec.replicas,
                "generation": record.generation,
                "revision": record.revision,
                "labels": dict(spec.labels),
                "image": spec.image,
                "command": list(spec.command),
            }
        return {
            "event": document,
            "data": document.get("data"),
            "services": services,
            "rule": {"name": rule.name, "description": rule.description},
        }

    async def fire(self, rule: Rule, event: CloudEvent, document: dict[str, Any]) -> None:
        trigger = event.id
        command_id = actions.command_id(trigger, rule.name)
        correlation = event.correlation or event.id
        states = self.bus.buckets.rule_state
        for attempt in range(CAS_ATTEMPTS):
            # the watched copy first (no round trip); after a lost race, the bucket itself
            current = (
                self.states.items.get(rule.name) if attempt == 0 else await states.get(rule.name)
            )
            state = current.value if current is not None else RuleState()
            now = time.time()
            verdict = limits.decide(rule, state, trigger, now)
            if not verdict.fire:
                skipped = RuleSkipped(
                    rule=rule.name,
                    trigger=trigger,
                    trigger_type=event.type,
                    reason=verdict.reason,
                    retry_after=round(verdict.retry_after, 3),
                )
                await self.emitter.emit(
                    "rule",
                    rule.name,
                    "skipped",
                    skipped,
                    correlation=correlation,
                    event_id=f"{command_id}.skipped",
                )
                return
            try:
                rendered = templating.render(rule.then, self.context(rule, document))
                data = actions.command_data(rule.name, rendered) if rule.then.is_command else {}
            except templating.TemplateFailure as exc:
                failed = RuleFailed(
                    rule=rule.name,
                    trigger=trigger,
                    trigger_type=event.type,
                    reason=f"rule {rule.name!r} did not fire: {exc}",
                    errors=[{"loc": e.loc, "msg": e.msg} for e in exc.errors],
                )
                await self.emitter.emit(
                    "rule",
                    rule.name,
                    "failed",
                    failed,
                    correlation=correlation,
                    event_id=f"{command_id}.failed",
                )
                log.info("rule %s failed on %s: %s", rule.name, trigger, exc)
                return
            if verdict.repeat is None:
                new_state = limits.record(rule, state, trigger, now, command_id)
                try:
                    if current is None:
                        revision = await states.create(rule.name, new_state)
                    else:
                        revision = await states.update(rule.name, new_state, current.revision)
                except ConflictError:
                    continue  # another copy fired meanwhile: read again and decide again
                self.states.note_written(rule.name, new_state, revision)
            await self._act(rule, rendered, data, command_id, correlation, event)
            return
        raise TemporaryError(f"rule {rule.name!r}: its state kept changing", delay=0.2)

    async def _act(
        self,
        rule: Rule,
        rendered: templating.Rendered,
        data: dict[str, Any],
        command_id: str,
        correlation: str,
        event: CloudEvent,
    ) -> None:
        if rendered.text is not None:
            note = RuleNotification(
                rule=rule.name, trigger=event.id, text=rendered.text, channel=rendered.channel
            )
            action, command = "notify", {}
            sent: Coroutine[Any, Any, object] = self.emitter.emit(
                "rule",
                rule.name,
                "notify",
                note,
                correlation=correlation,
                event_id=f"{command_id}.notify",
            )
        else:
            assert rendered.resource is not None
            assert rendered.name is not None
            assert rendered.verb is not None
            action = f"{rendered.resource} {rendered.verb} {rendered.name}"
            command = {
                "resource": rendered.resource,
                "name": rendered.name,
                "verb": rendered.verb,
                "data": data,
            }
            sent = self.send(
                rule,
                rendered.resource,
                rendered.name,
                rendered.verb,
                data,
                command_id=command_id,
                correlation=correlation,
            )
        fired = RuleFired(
            rule=rule.name,
            trigger=event.id,
            trigger_type=event.type,
            action=action,
            command_id=command_id if command else "",
            command=command,
        )
        # both are deduplicated on their ids, so a redelivered trigger may safely send both again
        await asyncio.gather(
            sent,
            self.emitter.emit(
                "rule",
                rule.name,
                "fired",
                fired,
                correlation=correlation,
                event_id=f"{command_id}.fired",
            ),
        )

    async def send(
        self,
        rule: Rule,
        resource: str,
        name: str,
        verb: str,
        data: dict[str, Any],
        *,
        command_id: str,
        correlation: str,
    ) -> None:
        event = CloudEvent(
            id=command_id,
            source=self.emitter.source,
            type=command_type(resource, verb),
            subject=name,
            data=data,
            correlation=correlation,
        )
        headers, payload = encode(event)
        headers[actions.REQUESTED_BY] = actions.requested_by(rule.name)
        names = self.bus.names
        await self.bus.js.publish(
            names.cmd(resource, name, verb), payload, headers=headers, stream=names.cmd_stream
        )


def _parse_rule(data: Any) -> Rule:
    if not isinstance(data, dict):
        raise InvalidInput("a rule must be a mapping (name:, when:, then:, ...)")
    try:
        return Rule.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput("invalid rule", field_errors_from_pydantic(exc)) from exc
