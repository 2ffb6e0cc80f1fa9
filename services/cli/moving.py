"""Carrying out rebalance moves as rolling moves, with the commands every caller has: for each
service, `scale` up by the number of its moves with `place_on` naming the plan's target
nodes (the scheduler books each new replica on its target when that node still keeps the
rules and has room, and places it by the service's usual rules otherwise, saying why), wait
until every replica is ready, then `scale` back with `prefer_remove` naming the replicas to
move, so exactly those stop. A new replica is healthy before an old one stops, and every
step is a command in the audit log.

If the surge is not ready in time, the service is scaled back with `prefer_remove` naming the
new replicas instead: the old layout stays and nothing is lost."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from corral.bus.connection import Bus
from corral.services.cli.client import CliError, ServiceView, send_command, service_views


async def _view(bus: Bus, name: str) -> ServiceView:
    views = await service_views(bus, name)
    if not views or views[0].record is None or views[0].record.deleted:
        raise CliError(f"service {name!r} not found")
    return views[0]


async def _scale(
    bus: Bus,
    name: str,
    replicas: int,
    prefer_remove: list[str],
    within: float,
    place_on: list[str] | None = None,
) -> None:
    data: dict[str, Any] = {"replicas": replicas, "prefer_remove": prefer_remove}
    if place_on:
        data["place_on"] = place_on
    outcome = await send_command(
        bus,
        "service",
        name,
        "scale",
        data,
        within=within,
        source="corral/cli/rebalance",
    )
    if not outcome.accepted:
        raise CliError(f"scale {name} to {replicas} was rejected: {outcome.data.get('reason')}")


async def _settled(bus: Bus, name: str, count: int, deadline: float) -> ServiceView | None:
    """Wait until `count` replicas are assigned, none leaving, and all of them ready."""
    while True:
        view = await _view(bus, name)
        if len(view.active) == count == view.ready and len(view.assignments) == count:
            return view
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.2)


async def move_service(
    bus: Bus,
    name: str,
    replicas: list[str],
    within: float,
    command_timeout: float,
    targets: list[str] | None = None,
) -> dict[str, Any]:
    """Move these replicas of one service, each to its target node (same order) when it
    still fits; returns what was started and stopped, and which targets were missed."""
    view = await _view(bus, name)
    record = view.record
    assert record is not None
    if record.spec.autoscale is not None:
        return {"service": name, "skipped": "autoscaled: the autoscaler owns its replica count"}
    desired = record.spec.replicas
    before = {a.replica: a.node for a in view.active}
    planned = dict(zip(replicas, targets or [], strict=False))
    leaving = [r for r in replicas if r in before]
    place_on = [planned[r] for r in leaving if r in planned]
    if not leaving or len(before) != desired or view.ready != desired:
        return {"service": name, "skipped": "not settled (a rollout, scale or heal under way)"}
    deadline = time.monotonic() + within
    await _scale(bus, name, desired + len(leaving), [], command_timeout, place_on)
    surged = await _settled(bus, name, desired + len(leaving), deadline)
    if surged is None:
        current = await _view(bus, name)
        new = [a.replica for a in current.assignments if a.replica not in before]
        await _scale(bus, name, desired, new, command_timeout)
        raise CliError(
            f"{name}: the new replicas were not ready within {within:.0f}s; scaled back, "
            "the old replicas stay"
        )
    surge = [a for a in surged.active if a.replica not in before]
    started = {a.replica: a.node for a in surge}
    missed = _missed(place_on, [(a.node, a.reason) for a in surge])
    await _scale(bus, name, desired, leaving, command_timeout)
    done = await _settled(bus, name, desired, time.monotonic() + within)
    if done is None:
        raise CliError(f"{name}: the old replicas did not stop within {within:.0f}s")
    return {
        "service": name,
        "stopped": {r: before[r] for r in leaving},
        "started": started,
        "missed": missed,
    }


def _missed(targets: list[str], landed: list[tuple[str, str]]) -> list[dict[str, str]]:
    """The planned targets no new replica landed on: where it went instead, and why (the
    scheduler's reason names the rule the planned node failed)."""
    wanted = list(targets)
    others = []
    for node, reason in landed:
        if node in wanted:
            wanted.remove(node)
        else:
            others.append((node, reason))
    return [
        {"planned": planned, "node": node, "why": reason}
        for planned, (node, reason) in zip(wanted, others, strict=False)
    ]
