"""What chat-ops says back: outcomes, progress to convergence, status and events as text."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from corral.bus.connection import Bus
from corral.services.cli.client import ServiceView, service_views

if TYPE_CHECKING:
    from corral.services.chatops.handlers import Caller

POLL = 0.5
MAX_LINES = 40


def _who(caller: Caller) -> str:
    return caller.user_name or caller.user_id


def rejected(caller: Caller, text: str, data: dict[str, Any]) -> str:
    errors = "".join(
        f"\n• `{e.get('loc') or '(data)'}`: {e.get('msg')}"
        for e in data.get("errors") or []
        if isinstance(e, dict)
    )
    return f":x: `{text.strip()}` ({_who(caller)}) rejected: {data.get('reason')}{errors}"


def accepted(caller: Caller, text: str, data: dict[str, Any]) -> str:
    detail = f"generation {data.get('generation')}" if "generation" in data else ""
    if data.get("run"):
        detail = f"run `{data['run']}`"
    if data.get("changed") is False:
        detail += " (no change)"
    command_id = data.get("command_id", "")
    return (
        f":arrow_forward: `{text.strip()}` ({_who(caller)}) accepted: {detail.strip()}; "
        f"`corral events --trace {command_id}`"
    )


async def follow_service(
    bus: Bus,
    name: str,
    outcome: dict[str, Any],
    within: float,
    command_id: str,
    stopping: asyncio.Event,
) -> str:
    """Poll the service until it runs as asked, its rollout fails, `within` passes, or the
    gateway stops."""
    generation = int(outcome.get("generation") or 0)
    deadline = time.monotonic() + within
    view: ServiceView | None = None
    while True:
        views = await service_views(bus, name)
        view = views[0] if views else None
        if view is not None and view.record is not None:
            failure = view.rollout_failure(view.record.revision)
            if not failure and view.record.rollback_of:
                failure = view.rollout_failure(view.record.rollback_of)
            if failure and view.record.generation >= generation:
                return f":x: {name}: {failure}"
            if view.converged and view.record.generation >= generation:
                return (
                    f":white_check_mark: {name}: {view.ready}/{view.desired} ready "
                    f"(revision {view.record.revision})"
                )
        if time.monotonic() >= deadline or stopping.is_set():
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), POLL)
    if view is None:
        return f":grey_question: {name}: not found after {within:.0f}s"
    reason = view.status.reason if view.status and view.status.reason else view.state
    if stopping.is_set():
        reason += "; the gateway is stopping, so this is the last report"
    return (
        f":hourglass: {name}: {view.ready}/{view.desired} ready so far ({reason}); "
        f"`corral events --trace {command_id}`"
    )


def status(views: list[ServiceView], hidden: int) -> str:
    if not views:
        return "no services" + (f" you may see ({hidden} hidden)" if hidden else "")
    lines = []
    for view in views[:MAX_LINES]:
        info = view.as_dict()
        line = f"*{view.name}* {info['state']}: {view.ready}/{view.desired} ready"
        line += f", revision {info['revision']}"
        if info["degraded"]:
            line += f", degraded: {info['degraded']}"
        if info["pending"]:
            line += f", {info['pending']} pending: {info['reason']}"
        lines.append(line)
    if len(views) > MAX_LINES:
        lines.append(f"... and {len(views) - MAX_LINES} more")
    if hidden:
        lines.append(f"({hidden} service(s) you may not see)")
    return "\n".join(lines)


def events(lines: list[str]) -> str:
    if not lines:
        return "no events"
    return "```\n" + "\n".join(lines[-MAX_LINES:]) + "\n```"
