"""`corral autoscale ...`: what the autoscaler decided for a service, and why."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from corral.bus.connection import Bus
from corral.services.cli import render
from corral.services.cli.client import CliError
from corral.services.cli.render import Output

autoscale_app = typer.Typer(no_args_is_help=True, help="What the autoscaler decided, and why.")
out = Console()


@autoscale_app.command("status")
def status(
    name: str,
    output: Annotated[
        Output, typer.Option("-o", "--output", help="table, json or yaml")
    ] = Output.table,
) -> None:
    """Show a service's autoscale policy and its recent decisions, newest last."""
    # the helpers live in main, which imports this module: import them when called
    from corral.services.cli.main import _run, _settings, _with_bus

    settings = _settings()
    view = _run(_with_bus(settings, lambda bus: autoscale_view(bus, name)))
    if output == Output.table:
        print_view(view)
    else:
        render.dump(view, output.value, out)


async def autoscale_view(bus: Bus, name: str) -> dict[str, Any]:
    service = await bus.buckets.services.get(name)
    if service is None or service.value.deleted:
        raise CliError(f"service {name!r} not found")
    spec = service.value.spec
    if spec.autoscale is None:
        raise CliError(f"service {name!r} has no autoscale policy")
    found = await bus.buckets.autoscale.get(name)
    status = found.value if found is not None else None
    return {
        "name": name,
        "replicas": spec.replicas,
        "policy": spec.autoscale.model_dump(mode="json"),
        "decisions": [d.model_dump(mode="json") for d in status.decisions] if status else [],
        "cold_start": status.cold_start.model_dump(mode="json")
        if status and status.cold_start
        else None,
        "invalid_samples": status.invalid_samples if status else 0,
    }


def _metrics(decision: dict[str, Any]) -> str:
    parts = []
    for proposal in decision.get("proposals", []):
        value = proposal.get("value")
        shown = "?" if value is None else f"{value:.4g}"
        asks = proposal.get("replicas")
        path = proposal.get("path")  # behavior.smoothing: what the rules were fed
        parts.append(
            f"{proposal['metric']}={shown}/{proposal['target']:g}"
            + (f"->{asks}" if asks is not None else "")
            + (f" ({path})" if path else "")
        )
    return " ".join(parts) or "-"


def print_view(view: dict[str, Any]) -> None:
    policy = view["policy"]
    out.print(
        f"{view['name']}: {view['replicas']} replicas, min {policy['min']}, max {policy['max']}"
        + (f", {view['invalid_samples']} unreadable samples" if view["invalid_samples"] else "")
    )
    cold = view.get("cold_start")
    if cold:
        out.print(f"last cold start: {cold['seconds']:.3f}s ({cold['trigger']})")
    if not view["decisions"]:
        out.print("no decisions yet")
        return
    table = Table(box=None, header_style="bold")
    for column in ("TIME", "REPLICAS", "CODE", "METRICS", "REASON"):
        table.add_column(column)
    for decision in view["decisions"]:
        at = (decision.get("at") or "")[11:23] or "-"
        change = f"{decision['current']} -> {decision['desired']}"
        table.add_row(at, change, decision["code"], _metrics(decision), decision["reason"])
    out.print(table)
