"""Preemption planning: the batch planner (`workers/scheduler/preemption.py`) against a
per-replica baseline, in the same run.

A cluster of N nodes is full of low-priority replicas (one cpu each, five services of
priorities -10..-6); a high-priority class wants K replicas of `--cpu` cpus. The batch planner
plans all K at once. The baseline works the way kube-scheduler's preemption does, one replica at
a time: for every node, evict every lower-priority replica, check the replica fits, spare
victims from the highest priority down while it still fits, rank the nodes (highest victim
priority, then victim count, then sum of priorities), commit the best, and start again. It is
timed on a subset of K, large enough to time. Both count the evictions, so that the speed does
not come from evicting more.

    .venv/bin/python bench/preemption.py [--nodes 1000] [--per-node 16] [--want 1000]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from corral.workers.scheduler.placement import ClassRequest, NodeTable, NodeView
from corral.workers.scheduler.preemption import Running, preempt


def cluster(nodes: int, per_node: int) -> tuple[NodeTable, list[Running]]:
    running: list[Running] = []
    views = []
    for i in range(nodes):
        mine = [
            Running(f"r{i}-{j}", f"low{j % 5}", f"n{i}", j % 5 - 10, {"cpu": 1.0})
            for j in range(per_node)
        ]
        running += mine
        views.append(
            NodeView(
                id=f"n{i}",
                labels={},
                capacity={"cpu": float(per_node), "memory": 64.0},
                allocated={"cpu": float(per_node)},
                total=per_node,
                services=dict(Counter(r.service for r in mine)),
            )
        )
    return NodeTable.build(views), running


def by_node(running: list[Running]) -> dict[str, list[Running]]:
    out: dict[str, list[Running]] = {}
    for r in running:
        out.setdefault(r.node, []).append(r)
    return out


def per_replica(
    free: dict[str, float], left: dict[str, list[Running]], cpu: float, priority: int, want: int
) -> int:
    """One replica at a time, every node looked at for each; returns the evictions."""
    evicted = 0
    for _ in range(want):
        best: tuple[tuple[int, int, int], str, list[Running]] | None = None
        for node, here in left.items():
            lower = [r for r in here if r.priority < priority]
            room = free[node] + sum(r.resources["cpu"] for r in lower)
            if room < cpu:
                continue
            victims = []
            for r in sorted(lower, key=lambda r: (-r.priority, r.resources["cpu"], r.replica)):
                if room - r.resources["cpu"] >= cpu:
                    room -= r.resources["cpu"]  # spared
                else:
                    victims.append(r)
            if not victims:
                continue
            key = (
                max(v.priority for v in victims),
                len(victims),
                sum(v.priority for v in victims),
            )
            if best is None or key < best[0]:
                best = (key, node, victims)
        if best is None:
            break
        _, node, victims = best
        gone = {v.replica for v in victims}
        left[node] = [r for r in left[node] if r.replica not in gone]
        free[node] += sum(v.resources["cpu"] for v in victims) - cpu
        evicted += len(victims)
    return evicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--per-node", type=int, default=16)
    parser.add_argument("--want", type=int, default=1000)
    parser.add_argument("--cpu", type=float, default=2.0)
    parser.add_argument("--baseline-want", type=int, default=50)
    args = parser.parse_args()

    table, running = cluster(args.nodes, args.per_node)
    request = ClassRequest(
        count=args.want, resources={"cpu": args.cpu}, service="urgent", priority=100
    )
    start = time.perf_counter()
    got = preempt(request, args.want, table, running)
    batch = time.perf_counter() - start
    print(
        f"cluster: {args.nodes} nodes x {args.per_node} low-priority replicas; "
        f"{args.want} replicas of {args.cpu:g} cpu to place by preemption"
    )
    print(
        f"batch planner:   {got.placed} placed, {len(got.victims)} evicted in {batch:.3f}s "
        f"= {got.placed / batch:,.0f} placements/s "
        f"({len(got.victims) / max(got.placed, 1):.2f} evictions each)"
    )

    free = {f"n{i}": 0.0 for i in range(args.nodes)}
    grouped = by_node(running)
    some = min(args.baseline_want, args.want)
    start = time.perf_counter()
    evicted = per_replica(free, grouped, args.cpu, 100, some)
    base = time.perf_counter() - start
    rate = some / base
    print(
        f"per-replica:     {some} placed, {evicted} evicted in {base:.3f}s "
        f"= {rate:,.1f} placements/s ({evicted / max(some, 1):.2f} evictions each)"
    )
    print(f"speed-up: {got.placed / batch / rate:.0f}x")


if __name__ == "__main__":
    main()
