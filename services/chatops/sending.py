"""Chat-ops on the bus: specs to deploy, commands sent with who asked, and what happened
since (a run's events, recent events)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from corral.bus.codec import CORRELATION, decode, encode
from corral.bus.connection import Bus
from corral.bus.settings import Settings
from corral.schemas.commands import command_type
from corral.schemas.envelope import CloudEvent, new_id
from corral.schemas.errors import InvalidInput, field_errors_from_pydantic
from corral.schemas.spec import ServiceSpec
from corral.services.chatops import grammar
from corral.services.cli.client import Outcome, read_events
from corral.services.cli.render import event_line

if TYPE_CHECKING:
    from corral.services.chatops.handlers import Caller

REQUESTED_BY = "corral-requested-by"
RUN_DONE = ("succeeded", "failed", "cancelled")
MAX_DOCUMENT = 64 * 1024


def load_spec(request: grammar.Request, specs_dir: Path | None) -> ServiceSpec:
    """`deploy NAME`: NAME.yaml (.yml, .json) in the specs directory; else the inline spec."""
    if request.document:
        if len(request.document) > MAX_DOCUMENT:
            raise InvalidInput(f"the inline spec is larger than {MAX_DOCUMENT} bytes")
        where, text = "the inline spec", request.document
    else:
        if specs_dir is None:
            raise InvalidInput(
                "deploy by name needs a specs directory (CORRAL_CHATOPS_SPECS); or paste the "
                "spec inline: deploy {name: web, replicas: 2, command: [...]}"
            )
        found = [
            specs_dir / f"{request.name}{suffix}"
            for suffix in (".yaml", ".yml", ".json")
            if (specs_dir / f"{request.name}{suffix}").is_file()
        ]
        if not found:
            raise InvalidInput(f"no spec {request.name}.yaml (.yml, .json) in {specs_dir}")
        where, text = found[0].name, found[0].read_text()
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{where} is not valid YAML or JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"{where} must be a mapping (name:, replicas:, ...)")
    try:
        spec = ServiceSpec.model_validate(document)
    except ValidationError as exc:
        raise InvalidInput(
            f"{where}: invalid service spec", field_errors_from_pydantic(exc)
        ) from exc
    if request.name and spec.name != request.name:
        raise InvalidInput(f"{where} names the service {spec.name!r}, not {request.name!r}")
    return spec


class Sender:
    def __init__(self, bus: Bus, settings: Settings) -> None:
        self.bus = bus
        self.settings = settings

    @staticmethod
    def new_id() -> str:
        return new_id()

    async def send(
        self,
        resource: str,
        name: str,
        verb: str,
        data: dict[str, Any],
        *,
        command_id: str,
        requested_by: Caller,
    ) -> Outcome:
        """Publish like the CLI, with `corral-requested-by`; wait for accepted or rejected
        (from the api worker, or the worker that owns the resource)."""
        names = self.bus.names
        sub = await self.bus.nc.subscribe(names.evt(resource, name, "*"))
        try:
            event = CloudEvent(
                id=command_id,
                source=f"{self.settings.source}/chatops/{requested_by.platform}",
                type=command_type(resource, verb),
                subject=name,
                data=data,
            )
            headers, payload = encode(event)
            headers[REQUESTED_BY] = requested_by.requested_by
            await self.bus.js.publish(
                names.cmd(resource, name, verb), payload, headers=headers, stream=names.cmd_stream
            )
            deadline = time.monotonic() + self.settings.command_timeout
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=remaining)
                except TimeoutError:
                    break
                if (msg.headers or {}).get(CORRELATION) != command_id:
                    continue
                what = msg.subject.rsplit(".", 1)[-1]
                if what in ("accepted", "rejected"):
                    return Outcome(what == "accepted", decode(msg.headers, msg.data))
            timeout = CloudEvent(
                source="chatops",
                type="timeout",
                data={
                    "reason": f"no answer within {self.settings.command_timeout:.0f}s; the "
                    "command stays queued and applies when its worker runs",
                    "code": "timeout",
                },
            )
            return Outcome(False, timeout)
        finally:
            await sub.unsubscribe()

    async def watch_runs(self) -> Subscription:
        return await self.bus.nc.subscribe(self.bus.names.evt("run", "*", "*"))

    async def follow_run(
        self, sub: Subscription, run: str, within: float, say: Callable[[str], Awaitable[None]]
    ) -> None:
        """Report a pipeline run's events (from `watch_runs`) until it ends or `within`
        passes."""
        prefix = f"{self.bus.names.prefix}.evt.run.{run}."
        deadline = time.monotonic() + within
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=remaining)
            except TimeoutError:
                break
            if not msg.subject.startswith(prefix):
                continue
            what = msg.subject.rsplit(".", 1)[-1]
            if what in ("accepted", "rejected"):
                continue
            try:
                data = decode(msg.headers, msg.data).data or {}
            except InvalidInput:
                continue
            await say(_run_line(run, what, data if isinstance(data, dict) else {}))
            if what in RUN_DONE:
                return

    async def recent_events(self, name: str | None, count: int) -> list[str]:
        wanted: list[str] = []
        async for event in read_events(self.bus, follow=False, limit=count if not name else 500):
            if name and not _about(event, name):
                continue
            wanted.append(event_line(event))
        return wanted[-count:]


def _about(event: CloudEvent, name: str) -> bool:
    data = event.data if isinstance(event.data, dict) else {}
    return event.subject == name or data.get("service") == name or data.get("name") == name


def _run_line(run: str, what: str, data: dict[str, Any]) -> str:
    pipeline = data.get("pipeline", "")
    head = f"run `{run}`" + (f" of {pipeline}" if pipeline else "")
    if what == "approval_needed":
        approvers = ", ".join(str(a) for a in data.get("approvers") or []) or "?"
        return (
            f":raised_hand: {head}: job `{data.get('job')}` waits for approval by {approvers}: "
            f"`/corral approve {run} {data.get('job')}`"
        )
    if what == "failed":
        jobs = data.get("jobs")
        detail = json.dumps(jobs, default=str)[:500] if jobs else ""
        return f":x: {head} failed" + (f": {detail}" if detail else "")
    icon = {"succeeded": ":white_check_mark:", "cancelled": ":heavy_minus_sign:"}.get(what, "")
    return f"{icon} {head}: {what}".strip()
