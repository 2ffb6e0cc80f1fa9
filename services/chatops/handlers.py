"""`ChatOps`: a verified slash command -> an acknowledgement at once, then, in the background,
the RBAC check, the command on the bus (as the CLI sends it, plus who asked), and progress and
the outcome posted to the command's `response_url`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from corral.bus.connection import Bus
from corral.bus.events import Emitter
from corral.bus.settings import Settings
from corral.schemas.chat import ChatCommandEvent
from corral.schemas.errors import InvalidInput
from corral.services.chatops import grammar, replies
from corral.services.chatops.config import ChatConfig
from corral.services.chatops.rbac import Decision, decide, visible
from corral.services.chatops.sending import Sender, load_spec
from corral.services.cli.client import service_views

log = logging.getLogger(__name__)
Message = dict[str, Any]


class Poster(Protocol):
    """Where replies go: the chat's response_url (a seam, so the transport is ours)."""

    async def post(self, url: str, message: Message) -> None: ...


class HttpPoster:
    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.client: httpx.AsyncClient | None = None

    async def post(self, url: str, message: Message) -> None:
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        response = await self.client.post(url, json=message)
        if response.status_code >= 400:
            log.warning("chat reply to %s: HTTP %d %s", url, response.status_code, response.text)

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


@dataclass(frozen=True)
class Caller:
    platform: str
    user_id: str
    user_name: str = ""
    team: str = ""
    channel: str = ""
    command: str = "/corral"
    response_url: str = ""

    @property
    def identities(self) -> list[str]:
        return [i for i in (self.user_id, self.user_name) if i]

    @property
    def requested_by(self) -> str:
        """`slack:alice (U024BE7LH)`, in every command's `corral-requested-by` header."""
        if self.user_name and self.user_name != self.user_id:
            return f"{self.platform}:{self.user_name} ({self.user_id})"
        return f"{self.platform}:{self.user_id}"


def ephemeral(text: str) -> Message:
    return {"response_type": "ephemeral", "text": text}


def in_channel(text: str) -> Message:
    return {"response_type": "in_channel", "text": text}


class ChatOps:
    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        config: ChatConfig,
        *,
        poster: Poster | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.config = config
        self.clock = clock
        self._own_poster = poster is None
        self.poster: Poster = poster or HttpPoster()
        self.emitter = Emitter(bus, f"{settings.source}/chatops")
        self.sender = Sender(bus, settings)
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()

    async def aclose(self, grace: float = 2.0) -> None:
        """Let commands in flight report and end (following progress stops at once), then
        cancel whatever is still waiting."""
        self.stopping.set()
        tasks, self.tasks = set(self.tasks), set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._own_poster and isinstance(self.poster, HttpPoster):
            await self.poster.aclose()

    def accept(self, caller: Caller, text: str) -> Message:
        """The immediate answer (Slack wants one within 3 s); the work goes on in the
        background and reports to `response_url`."""
        try:
            request = grammar.parse(text)
        except grammar.Usage as exc:
            self._spawn(self._record(caller, text, None, Decision(False, [], str(exc)), "invalid"))
            return ephemeral(f":warning: {exc}")
        if request.verb == "help":
            return ephemeral(grammar.help_text(caller.command))
        if not caller.response_url:
            return ephemeral(":warning: the request has no response_url to report to")
        self._spawn(self._run(caller, request, text))
        return ephemeral(f"On it: `{caller.command} {text.strip()}`")

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work, name="chatops")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def reply(self, caller: Caller, message: Message) -> None:
        try:
            await self.poster.post(caller.response_url, message)
        except Exception as exc:  # the chat is down: the command itself stands
            log.warning("chat reply to %s failed: %s", caller.platform, exc)

    async def _record(
        self,
        caller: Caller,
        text: str,
        request: grammar.Request | None,
        decision: Decision,
        what: str,
        command_id: str = "",
    ) -> None:
        data = ChatCommandEvent(
            platform=caller.platform,
            user_id=caller.user_id,
            user_name=caller.user_name,
            team=caller.team,
            channel=caller.channel,
            text=text[:2000],
            verb=request.verb if request else "",
            target=request.target if request else "",
            roles=decision.roles,
            allowed=decision.allowed,
            reason=decision.reason,
            command_id=command_id,
        )
        try:
            await self.emitter.emit(
                "chat", caller.platform, what, data, correlation=command_id or None
            )
        except Exception as exc:
            log.warning("recording a chat command failed: %s", exc)

    async def _run(self, caller: Caller, request: grammar.Request, text: str) -> None:
        try:
            await self._dispatch(caller, request, text)
        except asyncio.CancelledError:
            raise
        except InvalidInput as exc:
            details = "".join(f"\n• `{e.loc or '(spec)'}`: {e.msg}" for e in exc.errors)
            await self._record(caller, text, request, Decision(False, [], exc.reason), "invalid")
            await self.reply(caller, ephemeral(f":warning: {exc.reason}{details}"))
        except Exception as exc:
            log.exception("chat command %r failed", text)
            await self.reply(caller, ephemeral(f":x: {request.verb} failed: {exc}"))

    async def _dispatch(self, caller: Caller, request: grammar.Request, text: str) -> None:
        policy, ids, verb = self.config.policy, caller.identities, request.verb
        if verb in ("status", "events"):
            await self._read(caller, request, text)
            return
        spec: dict[str, Any] | None = None
        labels: dict[str, str] = {}
        if verb == "deploy":
            parsed = load_spec(request, self.config.specs_dir)
            request = grammar.Request("deploy", name=parsed.name)
            spec = parsed.model_dump(mode="json", exclude_unset=True)
            labels = dict(parsed.labels)
        decision = Decision(True, [], "")
        if verb in ("deploy", "scale", "rollback"):
            current = await self.bus.buckets.services.get(request.name)
            existing = dict(current.value.spec.labels) if current else {}
            # both the labels it has and the labels it would get must be allowed, so that a
            # deploy cannot move a service out of (or into) a protected set
            checks = [existing] if spec is None else [labels]
            if spec is not None and current is not None:
                checks.insert(0, existing)
            for these in checks:
                decision = decide(policy, ids, verb, service=request.name, labels=these)
                if not decision.allowed:
                    break
        elif verb == "pipeline":
            decision = decide(policy, ids, verb, pipeline=request.name)
        else:
            decision = decide(policy, ids, verb)
        if not decision.allowed:
            await self._record(caller, text, request, decision, "denied")
            await self.reply(caller, ephemeral(f":no_entry: denied: {decision.reason}"))
            return
        resource, name, command_verb, data = self._command(caller, request, decision, spec)
        command_id = self.sender.new_id()
        await self._record(caller, text, request, decision, "requested", command_id)
        # a run's events are watched from before the command, so a quick run is not missed
        runs = await self.sender.watch_runs() if verb in ("pipeline", "approve") else None
        try:
            outcome = await self.sender.send(
                resource, name, command_verb, data, command_id=command_id, requested_by=caller
            )
            if outcome.data.get("code") == "timeout":
                await self.reply(
                    caller, in_channel(f":hourglass: `{text.strip()}`: {outcome.data['reason']}")
                )
                return
            if not outcome.accepted:
                await self.reply(caller, in_channel(replies.rejected(caller, text, outcome.data)))
                return
            await self.reply(caller, in_channel(replies.accepted(caller, text, outcome.data)))
            if verb in ("deploy", "scale", "rollback"):
                result = await replies.follow_service(
                    self.bus, name, outcome.data, self.config.wait, command_id, self.stopping
                )
                await self.reply(caller, in_channel(result))
            elif runs is not None:
                run = str(outcome.data.get("run") or name)
                await self.sender.follow_run(
                    runs, run, self.config.wait, lambda line: self.reply(caller, in_channel(line))
                )
        finally:
            if runs is not None:
                await runs.unsubscribe()

    def _command(
        self,
        caller: Caller,
        request: grammar.Request,
        decision: Decision,
        spec: dict[str, Any] | None,
    ) -> tuple[str, str, str, dict[str, Any]]:
        who = caller.requested_by
        if request.verb == "deploy":
            assert spec is not None
            return "service", request.name, "deploy", spec
        if request.verb == "scale":
            return "service", request.name, "scale", {"replicas": request.replicas}
        if request.verb == "rollback":
            data: dict[str, Any] = {"reason": f"chat: {who}"}
            if request.revision is not None:
                data["to_revision"] = request.revision
            return "service", request.name, "rollback", data
        if request.verb == "pipeline":
            data = {"spec": None, "variables": request.variables, "requested_by": who}
            return "pipeline", request.name, "run", data
        user = caller.user_name or caller.user_id
        data = {"job": request.job, "user": user, "roles": decision.roles}
        return "run", request.name, "approve", data

    async def _read(self, caller: Caller, request: grammar.Request, text: str) -> None:
        policy, ids = self.config.policy, caller.identities
        views = await service_views(self.bus, request.name or None)
        pairs = [(v.name, dict(v.record.spec.labels) if v.record else {}) for v in views]
        if request.name or request.verb == "events":
            labels = dict(pairs[0][1]) if pairs else {}
            decision = decide(policy, ids, request.verb, service=request.name, labels=labels)
        else:
            decision = Decision(True, policy.roles_of(*ids), "")
        if not decision.allowed:
            await self._record(caller, text, request, decision, "denied")
            await self.reply(caller, ephemeral(f":no_entry: denied: {decision.reason}"))
            return
        await self._record(caller, text, request, decision, "requested")
        if request.verb == "events":
            lines = await self.sender.recent_events(request.name or None, request.count)
            await self.reply(caller, ephemeral(replies.events(lines)))
            return
        if request.name and not views:
            await self.reply(caller, ephemeral(f"service {request.name!r} not found"))
            return
        allowed = set(visible(policy, ids, "status", pairs))
        shown = [v for v in views if v.name in allowed]
        if not shown and views:
            why = decide(policy, ids, "status", service=views[0].name, labels=pairs[0][1])
            await self.reply(caller, ephemeral(f":no_entry: denied: {why.reason}"))
            return
        await self.reply(caller, ephemeral(replies.status(shown, len(views) - len(shown))))
