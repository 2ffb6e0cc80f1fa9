"""`corral explain SERVICE`: why each replica went to its node, and why pending ones fit
nowhere. The scheduler's reasons are kept in the assignments (one per replica) and the
deployer's service status (for the replicas no node could take)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from corral.bus.connection import Bus
from corral.schemas.quantities import format_bytes
from corral.services.cli import render
from corral.services.cli.client import CliError
from corral.services.cli.render import Output

out = Console()


def explain(
    name: Annotated[str, typer.Argument(help="the service")],
    output: Annotated[
        Output, typer.Option("-o", "--output", help="table, json or yaml")
    ] = Output.table,
) -> None:
    """Show, for each replica, the node it went to and why; for pending replicas, why no
    node fits."""
    # the helpers live in main, which imports this module: import them when called
    from corral.services.cli.main import _run, _settings, _with_bus

    settings = _settings()
    view = _run(_with_bus(settings, lambda bus: explain_view(bus, name)))
    if output == Output.table:
        print_view(view)
    else:
        render.dump(view, output.value, out)


def _rules(placement: dict[str, Any]) -> dict[str, Any]:
    """The placement fields that differ from their defaults."""
    defaults: dict[str, Any] = {
        "node_selector": {},
        "node_affinity": [],
        "max_per_node": None,
        "avoid": [],
        "spread_by": None,
        "prefer": [],
        "strategy": "spread",
        "priority": 0,
    }
    return {k: v for k, v in placement.items() if defaults.get(k, object()) != v}


async def explain_view(bus: Bus, name: str) -> dict[str, Any]:
    service = await bus.buckets.services.get(name)
    if service is None or service.value.deleted:
        raise CliError(f"service {name!r} not found")
    spec = service.value.spec
    items = await bus.buckets.assignments.items()
    statuses = await bus.buckets.replicas.items(f"{name}.>")
    state = {s.value.replica: s.value.state.value for s in statuses.values()}
    replicas = sorted(
        (
            {
                "replica": a.value.replica,
                "node": a.value.node,
                "state": "stopping"
                if a.value.draining
                # a preemptor's replica waits for its victims to stop before it starts
                else state.get(a.value.replica, "waiting" if a.value.waits_for else "assigned"),
                "why": a.value.reason or "-",
                "assigned_at": a.value.assigned_at.isoformat(),
            }
            for a in items.values()
            if a.value.service == name
        ),
        key=lambda r: (r["node"], r["replica"]),
    )
    found = await bus.buckets.service_status.get(name)
    status = found.value if found is not None else None
    return {
        "name": name,
        "desired": spec.replicas,
        "resources": spec.resources.as_dict(),
        "placement": _rules(spec.placement.model_dump(mode="json")),
        "replicas": replicas,
        "pending": status.pending if status is not None else 0,
        "pending_reason": status.reason if status is not None and status.pending else "",
    }


def print_view(view: dict[str, Any]) -> None:
    asks = (
        ", ".join(
            f"{k}={format_bytes(v) if k == 'memory' else f'{v:g}'}"
            for k, v in view["resources"].items()
            if v
        )
        or "nothing"
    )
    rules = ", ".join(f"{k}={v}" for k, v in view["placement"].items()) or "defaults (spread)"
    out.print(f"{view['name']}: {view['desired']} replicas, each asks {asks}; placement: {rules}")
    if view["replicas"]:
        table = Table(box=None, header_style="bold")
        for column in ("REPLICA", "NODE", "STATE", "WHY"):
            table.add_column(column)
        for r in view["replicas"]:
            table.add_row(r["replica"], r["node"], r["state"], r["why"])
        out.print(table)
    else:
        out.print("no replica is placed")
    if view["pending"]:
        out.print(f"{view['pending']} pending: {view['pending_reason']}")
