"""`corral sim`: a simulated cluster. Thousands of fake nodes (the `fake` driver runs nothing,
like KWOK) with zones and mixed capacities join a running Corral, so placement, explain and
rebalance can be tried at scale against the real bus. Ctrl-C stops them, and the deployer
reschedules nothing until their heartbeats are missed: they were never real."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console

from corral.schemas.spec import Resources

err = Console(stderr=True)
GiB = 1 << 30
SHAPES = [  # (name, cpu, memory GiB, gpu, weight)
    ("small", 8, 32, 0, 4),
    ("medium", 16, 64, 0, 3),
    ("large", 64, 256, 0, 2),
    ("gpu", 32, 256, 4, 1),
]


@dataclass(frozen=True)
class SimNode:
    id: str
    capacity: Resources
    labels: dict[str, str]


def sim_nodes(count: int, zones: int, prefix: str, seed: int) -> list[SimNode]:
    """`count` nodes: zones round-robin (z0, z1, ...), shapes drawn by weight with `seed`."""
    rng = random.Random(seed)
    weights = [shape[4] for shape in SHAPES]
    out = []
    for i in range(count):
        name, cpu, memory, gpu, _ = rng.choices(SHAPES, weights)[0]
        capacity: dict[str, float] = {"cpu": cpu, "memory": memory * GiB}
        if gpu:
            capacity["gpu"] = gpu
        out.append(
            SimNode(
                id=f"{prefix}-{i:05d}",
                capacity=Resources.model_validate(capacity),
                labels={"zone": f"z{i % zones}", "shape": name},
            )
        )
    return out


def sim(
    nodes: Annotated[int, typer.Option("--nodes", min=1, max=100_000, help="how many")] = 100,
    zones: Annotated[int, typer.Option("--zones", min=1, max=100, help="zone labels")] = 3,
    prefix: Annotated[str, typer.Option("--prefix", help="node ids are <prefix>-00000...")] = "sim",
    seed: Annotated[int, typer.Option("--seed", help="the shapes' random seed")] = 0,
    log_level: Annotated[str, typer.Option("--log-level")] = "warning",
) -> None:
    """Run simulated nodes (zones, mixed capacities, some with GPUs) until Ctrl-C."""
    from corral.services.cli.main import _logging, _run, _settings
    from corral.services.runner import make_agent, serve

    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,40}", prefix):
        err.print(f"[red]error:[/red] --prefix {prefix!r}: lowercase letters, digits and '-'")
        raise typer.Exit(2)
    _logging(log_level)
    settings = _settings()
    plan = sim_nodes(nodes, zones, prefix, seed)
    shapes: dict[str, int] = {}
    for node in plan:
        shapes[node.labels["shape"]] = shapes.get(node.labels["shape"], 0) + 1
    summary = ", ".join(f"{count} {name}" for name, count in sorted(shapes.items()))
    _run(
        serve(
            settings,
            lambda ctx: [
                make_agent(ctx, node_id=n.id, driver="fake", capacity=n.capacity, labels=n.labels)
                for n in plan
            ],
            on_ready=lambda url: err.print(
                f"{nodes} simulated nodes in {zones} zones ({summary}) on {url}; Ctrl-C stops"
            ),
        )
    )
