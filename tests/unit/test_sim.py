"""`corral sim`'s simulated nodes: zones round-robin, mixed shapes, deterministic by seed."""

from __future__ import annotations

from collections import Counter

from corral.services.cli.sim import sim_nodes


def test_zones_shapes_and_ids() -> None:
    nodes = sim_nodes(1000, 4, "sim", seed=1)
    assert [n.id for n in nodes[:2]] == ["sim-00000", "sim-00001"]
    assert Counter(n.labels["zone"] for n in nodes) == {f"z{i}": 250 for i in range(4)}
    shapes = Counter(n.labels["shape"] for n in nodes)
    assert set(shapes) == {"small", "medium", "large", "gpu"}
    assert shapes["small"] > shapes["gpu"]
    for n in nodes:
        gpu = n.capacity.as_dict().get("gpu", 0.0)
        assert (gpu > 0) == (n.labels["shape"] == "gpu")
        assert n.capacity.cpu > 0
        assert n.capacity.memory > 0


def test_same_seed_same_cluster() -> None:
    a = sim_nodes(50, 3, "x", seed=7)
    b = sim_nodes(50, 3, "x", seed=7)
    c = sim_nodes(50, 3, "x", seed=8)
    assert a == b
    assert a != c
