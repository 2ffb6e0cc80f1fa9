"""Carrying out rebalance moves as rolling moves, with the commands every caller has: for each
service, `scale` up by the number of its moves (the scheduler places the surge by the
service's own rules, so the new replicas go where the plan's targets are: the emptiest zone,
or the packed nodes), wait until every replica is ready, then `scale` back with
`prefer_remove` naming the replicas to move, so exactly those stop. A new replica is healthy
before an old one stops, and every step is a command in the audit log.

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
    bus: Bus, name: str, replicas: int, prefer_remove: list[str], within: float
) -> None:
    outcome = await send_command(
        bus,
        "service",
        name,
        "scale",
        {"replicas": replicas, "prefer_remove": prefer_remove},
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
    bus: Bus, name: str, replicas: list[str], within: float, command_timeout: float
) -> dict[str, Any]:
    """Move these replicas of one service; returns what was started and stopped."""
    view = await _view(bus, name)
    record = view.record
    assert record is not None
    if record.spec.autoscale is not None:
        return {"service": name, "skipped": "autoscaled: the autoscaler owns its replica count"}
    desired = record.spec.replicas
    before = {a.replica: a.node for a in view.active}
    leaving = [r for r in replicas if r in before]
    if not leaving or len(before) != desired or view.ready != desired:
        return {"service": name, "skipped": "not settled (a rollout, scale or heal under way)"}
    deadline = time.monotonic() + within
    await _scale(bus, name, desired + len(leaving), [], command_timeout)
    surged = await _settled(bus, name, desired + len(leaving), deadline)
    if surged is None:
        current = await _view(bus, name)
        new = [a.replica for a in current.assignments if a.replica not in before]
        await _scale(bus, name, desired, new, command_timeout)
        raise CliError(
            f"{name}: the new replicas were not ready within {within:.0f}s; scaled back, "
            "the old replicas stay"
        )
    started = {a.replica: a.node for a in surged.active if a.replica not in before}
    await _scale(bus, name, desired, leaving, command_timeout)
    done = await _settled(bus, name, desired, time.monotonic() + within)
    if done is None:
        raise CliError(f"{name}: the old replicas did not stop within {within:.0f}s")
    return {
        "service": name,
        "stopped": {r: before[r] for r in leaving},
        "started": started,
    }
