"""The Ray-sharded solver on a real local Ray (2 CPUs, no dashboard), started lazily by the
first large batch and shut down after. Slow: ray.init takes seconds on 2 cores."""

from __future__ import annotations

import random

import numpy as np
import pytest

from corral.workers.scheduler.executors import Sharded
from corral.workers.scheduler.placement import ClassRequest, NodeTable, NodeView

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def test_large_batches_go_to_ray_and_match_the_rules() -> None:
    ray = pytest.importorskip("ray")
    rng = random.Random(3)
    nodes = [
        NodeView(
            id=f"n{i:03d}",
            labels={"zone": f"z{i % 3}"},
            capacity={"cpu": 8.0, "memory": 32.0 * 2**30},
            allocated={},
        )
        for i in range(90)
    ]
    classes = [
        ClassRequest(
            count=rng.randint(10, 60), service=f"s{i}", resources={"cpu": 0.25}, spread_by="zone"
        )
        for i in range(30)
    ]
    executor = Sharded(above=100, shards=2, num_cpus=2, placements_above=0)
    try:
        small = await executor.solve(classes[:1], NodeTable.build(nodes))
        assert executor.used == 0
        assert not ray.is_initialized()  # a small batch never starts Ray
        assert small[0].placed == classes[0].count
        table = NodeTable.build(nodes)
        solutions = await executor.solve(classes, table)
        assert executor.used == 1
        zone = table.domains("zone")
        for c, s in zip(classes, solutions, strict=True):
            assert s.placed == c.count
            per_zone = np.bincount(zone[s.where], weights=s.take, minlength=3)
            assert per_zone.max() - per_zone.min() <= 1
            assert all(note.startswith("spread by zone") for note in s.why.values())
        assert (table.used("cpu") <= 8.0).all()
    finally:
        await executor.close()
    assert not ray.is_initialized()
