"""The rebalance search sharded over a real local Ray (2 CPUs, no dashboard): started lazily
only when the services hold more replicas than the threshold, the same moves as one process,
and `corral rebalance --plan` searching on Ray above CORRAL_REBALANCE_SHARD_ABOVE. Slow:
ray.init takes seconds on 2 cores."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from support import acli, command, corral_env, eventually

from corral.workers.scheduler.executors import Sharded
from corral.workers.scheduler.placement import ClassRequest, NodeTable, NodeView
from corral.workers.scheduler.rebalance import plan_moves
from corral.workers.scheduler.searching import MoveSearch, RayShards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def crowded(seed: int) -> tuple[list[NodeView], list[ClassRequest]]:
    rng = random.Random(seed)
    per: list[dict[str, int]] = [{} for _ in range(60)]
    for s in range(12):
        hot = rng.randrange(3)
        for _ in range(rng.randint(10, 30)):
            zone = hot if rng.random() < 0.8 else rng.randrange(3)
            i = rng.choice(range(zone, 60, 3))
            per[i][f"s{s}"] = per[i].get(f"s{s}", 0) + 1
    nodes = [
        NodeView(
            id=f"n{i:02d}",
            labels={"zone": f"z{i % 3}"},
            capacity={"cpu": 16.0},
            allocated={"cpu": float(sum(per[i].values()))},
            services=per[i],
            total=sum(per[i].values()),
        )
        for i in range(60)
    ]
    services = [
        ClassRequest(count=0, service=f"s{s}", resources={"cpu": 1.0}, spread_by="zone")
        for s in range(12)
    ]
    return nodes, services


async def test_the_search_shards_over_ray_above_the_threshold() -> None:
    ray = pytest.importorskip("ray")
    nodes, services = crowded(5)
    table = NodeTable.build(nodes)
    size = MoveSearch.size(table, services)
    search = MoveSearch(above=size, shards=2, runner=RayShards(Sharded(0, 2, num_cpus=2)))
    try:
        small = await search.plan(table, services, 10)
        assert small.shards == 0
        assert not ray.is_initialized()  # at the threshold, never started
        search.above = size - 1
        found = await search.plan(table, services, 10)
        assert ray.is_initialized()
        assert (found.shards, search.used) == (2, 1)
        assert found.moves == plan_moves(table, services, 10) == small.moves
    finally:
        await search.close()
    assert not ray.is_initialized()


async def test_corral_rebalance_searches_on_ray_above_the_threshold(
    settings, bus, control_plane
) -> None:
    pytest.importorskip("ray")
    env = {**corral_env(settings), "CORRAL_REBALANCE_SHARD_ABOVE": "3", "CORRAL_SCHED_SHARDS": "2"}
    env.pop("RAY_ADDRESS", None)
    agents: list[dict[str, Any]] = [
        {
            "node_id": node_id,
            "driver": "fake",
            "capacity": {"cpu": 8.0, "memory": "8Gi"},
            "labels": {"zone": zone},
        }
        for node_id, zone in (("a0", "a"), ("b0", "b"))
    ]
    async with control_plane(agents=agents[:1]) as host:
        for name in ("web", "api"):
            spec = {
                "replicas": 2,
                "command": ["x"],
                "resources": {"cpu": 1},
                "placement": {"spread_by": "zone"},
            }
            await command(bus, "deploy", name, spec)

        async def four() -> bool:
            items = await bus.buckets.assignments.items()
            return len(items) == 4

        await eventually(four, what="four replicas on a0")
        from corral.schemas.spec import Resources
        from corral.services.runner import make_agent

        joining: dict[str, Any] = {
            **agents[1],
            "capacity": Resources.model_validate(agents[1]["capacity"]),
        }
        await host.add([make_agent(host.ctx, **joining)])

        async def joined() -> bool:
            return await bus.buckets.nodes.get("b0") is not None

        await eventually(joined, what="b0 joined")
        result = await acli(env, "rebalance", "--plan", "-o", "json")
        assert result.returncode == 0, result
        view = json.loads(result.stdout)
        assert view["searched"] == "ray: 2 shards"
        assert sorted((m["service"], m["from"], m["to"]) for m in view["moves"]) == [
            ("api", "a0", "b0"),
            ("web", "a0", "b0"),
        ]
