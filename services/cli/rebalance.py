"""`corral rebalance --plan|--apply`: moves, within a disruption budget, that lower spread skew or
free nodes under binpack, computed by the scheduler's pure planner on the cluster as it is
(nodes, the schedulers' ledgers, assignments, and each service's placement rules). The search
runs in this process, sharded by service over Ray tasks above `rebalance_shard_above`
replicas; `--apply` pins each new replica to its move's target node (see `moving.py`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from corral.bus.connection import Bus
from corral.bus.settings import Settings
from corral.services.cli import render
from corral.services.cli.render import Output

if TYPE_CHECKING:
    from corral.workers.scheduler.searching import MoveSearch

out = Console()
err = Console(stderr=True)


def rebalance(
    plan: Annotated[bool, typer.Option("--plan", help="compute the moves and print them")] = False,
    apply: Annotated[
        bool, typer.Option("--apply", help="compute the moves and carry them out, rolling")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="seconds per service for --apply")
    ] = 120.0,
    budget: Annotated[
        int, typer.Option("--budget", min=1, max=10_000, help="at most this many moves")
    ] = 10,
    service: Annotated[
        list[str] | None, typer.Option("--service", "-s", help="only these services")
    ] = None,
    output: Annotated[
        Output, typer.Option("-o", "--output", help="table, json or yaml")
    ] = Output.table,
) -> None:
    """Plan moves that lower spread skew (or free nodes under binpack), at most --budget."""
    from corral.services.cli.main import _run, _settings, _with_bus

    if plan == apply:
        err.print("[red]error:[/red] pass one of --plan (print the moves) or --apply (make them)")
        raise typer.Exit(2)
    settings = _settings()

    async def work(bus: Bus) -> dict[str, Any]:
        search = move_search(settings)
        try:
            view = await plan_view(bus, budget, service or [], settings.node_grace, search)
        finally:
            await search.close()
        if apply:
            view["applied"] = await apply_moves(
                bus, view["moves"], timeout, settings.command_timeout
            )
        return view

    view = _run(_with_bus(settings, work))
    if output == Output.table:
        print_view(view)
    else:
        render.dump(view, output.value, out)


def move_search(settings: Settings) -> MoveSearch:
    """The search runs here, in the CLI's process; above `rebalance_shard_above` replicas it
    is sharded by service over Ray tasks (Ray started lazily, as the scheduler starts it)."""
    from corral.workers.scheduler.executors import Sharded
    from corral.workers.scheduler.searching import MoveSearch, RayShards

    ray = Sharded(settings.sched_shard_above, settings.sched_shards)
    return MoveSearch(settings.rebalance_shard_above, settings.sched_shards, RayShards(ray))


async def plan_view(
    bus: Bus, budget: int, only: list[str], grace: float, search: MoveSearch | None = None
) -> dict[str, Any]:
    # NumPy and the solver load only for this command, not for every `corral` call
    from corral.workers.scheduler.accounting import Accounts, Usage
    from corral.workers.scheduler.placement import ClassRequest, NodeTable
    from corral.workers.scheduler.searching import MoveSearch
    from corral.workers.scheduler.worker import node_ready

    b = bus.buckets
    nodes = [v.value for v in (await b.nodes.items()).values()]
    ledgers = await b.allocations.items()
    assignments = [v.value for v in (await b.assignments.items()).values()]
    records = [v.value for v in (await b.services.items()).values() if not v.value.deleted]
    accounts = Accounts()
    for node, item in ledgers.items():
        accounts.set_ledger(node, item.value)
    for a in assignments:
        usage = Usage(a.service, a.node, a.template.resources.as_dict())
        accounts.set_assigned(f"{a.node}.{a.replica}", usage)
    now = datetime.now(UTC)
    table = NodeTable.build(
        [accounts.view(n, node_ready(n, grace, now)) for n in sorted(nodes, key=lambda n: n.id)],
        avoids={r.spec.name: r.spec.placement.avoid for r in records if r.spec.placement.avoid},
    )
    classes = [
        ClassRequest.of(r.spec.name, 0, r.spec.resources.as_dict(), r.spec.placement, r.spec.driver)
        for r in records
        if not only or r.spec.name in only
    ]
    # without a runner the search stays in this process whatever the size
    searched = await (search or MoveSearch(0)).plan(table, classes, budget)
    moves = searched.moves
    # name a replica for each move: one that runs on the source node and is not leaving
    free: dict[tuple[str, str], list[str]] = {}
    for a in sorted(assignments, key=lambda a: a.replica):
        if not a.draining:
            free.setdefault((a.service, a.node), []).append(a.replica)
    rows = []
    for m in moves:
        candidates = free.get((m.service, m.source), [])
        rows.append(
            {
                "service": m.service,
                "replica": candidates.pop() if candidates else "",
                "from": m.source,
                "to": m.target,
                "why": m.reason,
            }
        )
    where = f"ray: {searched.shards} shards" if searched.shards else "in process"
    if searched.fallback:
        where = f"in process (Ray failed: {searched.fallback})"
    return {"budget": budget, "moves": rows, "searched": where}


async def apply_moves(
    bus: Bus, moves: list[dict[str, Any]], within: float, command_timeout: float
) -> list[dict[str, Any]]:
    """Service by service, as rolling moves (see `moving.py`)."""
    from corral.services.cli.moving import move_service

    by_service: dict[str, list[str]] = {}
    targets: dict[str, list[str]] = {}
    for m in moves:
        if m["replica"]:
            by_service.setdefault(m["service"], []).append(m["replica"])
            targets.setdefault(m["service"], []).append(m["to"])
    return [
        await move_service(bus, name, replicas, within, command_timeout, targets[name])
        for name, replicas in by_service.items()
    ]


def print_view(view: dict[str, Any]) -> None:
    searched = view.get("searched", "in process")
    if searched.startswith("in process ("):
        err.print(f"[yellow]warning:[/yellow] searched {searched}")
    if not view["moves"]:
        out.print("nothing to move: every service is as even (or as packed) as it can be")
        return
    table = Table(box=None, header_style="bold")
    for column in ("SERVICE", "REPLICA", "FROM", "TO", "WHY"):
        table.add_column(column)
    for m in view["moves"]:
        table.add_row(m["service"], m["replica"], m["from"], m["to"], m["why"])
    out.print(table)
    out.print(f"{len(view['moves'])} move(s) within a budget of {view['budget']}")
    if searched.startswith("ray"):
        out.print(f"searched on {searched}")
    for result in view.get("applied", []):
        if "skipped" in result:
            out.print(f"{result['service']}: skipped: {result['skipped']}")
            continue
        started = ", ".join(f"{r} on {n}" for r, n in result["started"].items())
        stopped = ", ".join(f"{r} on {n}" for r, n in result["stopped"].items())
        out.print(f"{result['service']}: started {started}; then stopped {stopped}")
        for miss in result.get("missed", []):
            out.print(
                f"  not on {miss['planned']} as planned: started on {miss['node']} instead "
                f"({miss['why']})"
            )
