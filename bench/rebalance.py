"""Corral benchmark: the rebalance search at scale, in one process beside the Ray-sharded one.

    cd /work/main && .venv/bin/python bench/rebalance.py            # 10,000 nodes, 100,000 replicas
    .venv/bin/python bench/rebalance.py --nodes 1000 --services 100  # a quick check

A cluster of `--nodes` nodes in `--zones` zones runs `--services` spread services of
`--replicas` replicas each (spread_by zone), skewed: most of each service's replicas sit in
one zone, the rest in two others, as after a zone outage or a burst of nodes joining. Then
`plan_moves` looks for `--budget` moves three ways, on the same cluster:
- in this process (what `corral rebalance` does below `CORRAL_REBALANCE_SHARD_ABOVE`);
- sharded by service, the shards searched one after another in this process (the split and
  merge without Ray: what the sharding itself costs);
- sharded over Ray tasks (a local Ray with `--ray-cpus`, started before the clock; its start
  is printed apart).
For each it prints the time, the moves, and the skew after (the sum over services of the
largest minus the smallest zone count, and the worst service), beside the skew before.

It prints a table; it is not a test. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Callable

import numpy as np

from corral.workers.scheduler.executors import Sharded
from corral.workers.scheduler.placement import ClassRequest, NodeTable, NodeView
from corral.workers.scheduler.rebalance import Move
from corral.workers.scheduler.searching import InProcessShards, MoveSearch, RayShards, Searched


def cluster(args: argparse.Namespace) -> tuple[list[NodeView], list[ClassRequest]]:
    rng = random.Random(args.seed)
    zones = args.zones
    in_zone = [list(range(z, args.nodes, zones)) for z in range(zones)]
    per: list[dict[str, int]] = [{} for _ in range(args.nodes)]
    for s in range(args.services):
        hot, *warm = rng.sample(range(zones), min(3, zones))
        for _ in range(args.replicas):
            zone = hot if rng.random() < 0.7 or not warm else rng.choice(warm)
            i = rng.choice(in_zone[zone])
            per[i][f"s{s}"] = per[i].get(f"s{s}", 0) + 1
    cpu = [rng.choice([32.0, 64.0]) for _ in range(args.nodes)]
    nodes = [
        NodeView(
            id=f"n{i:05d}",
            labels={"zone": f"z{i % zones}"},
            capacity={"cpu": cpu[i]},
            allocated={"cpu": 0.25 * sum(per[i].values())},
            services=per[i],
            total=sum(per[i].values()),
        )
        for i in range(args.nodes)
    ]
    services = [
        ClassRequest(count=0, service=f"s{s}", resources={"cpu": 0.25}, spread_by="zone")
        for s in range(args.services)
    ]
    return nodes, services


def skew(table: NodeTable, services: list[ClassRequest], moves: list[Move]) -> tuple[int, int]:
    """(the sum over services, the worst service) of max minus min zone counts."""
    zone = table.domains("zone")
    zones = len(table.vocab["zone"])
    position = {node: i for i, node in enumerate(table.ids)}
    per = {}
    for s in services:
        where, take = table.placed.get(s.service, (np.zeros(0, np.intp), np.zeros(0, np.int64)))
        per[s.service] = np.bincount(zone[where], weights=take, minlength=zones)
    for m in moves:
        per[m.service][zone[position[m.source]]] -= 1
        per[m.service][zone[position[m.target]]] += 1
    gaps = [int(c.max() - c.min()) for c in per.values()]
    return sum(gaps), max(gaps, default=0)


def timed(search: MoveSearch, run: Callable[[MoveSearch], Searched]) -> tuple[float, Searched]:
    """Seconds and the result of one search."""
    start = time.perf_counter()
    found = run(search)
    return time.perf_counter() - start, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--zones", type=int, default=10)
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--replicas", type=int, default=100)
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--shards", type=int, default=0, help="0: one per Ray CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray run")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the fastest counts")
    args = parser.parse_args()

    nodes, services = cluster(args)
    table = NodeTable.build(nodes)
    replicas = MoveSearch.size(table, services)
    print(
        f"rebalance search: {args.nodes:,} nodes in {args.zones} zones, {args.services:,} "
        f"spread services, {replicas:,} replicas, budget {args.budget}"
    )
    before = skew(table, services, [])
    shards = args.shards or max(1, args.ray_cpus)
    searches: list[tuple[str, MoveSearch]] = [
        ("one process (baseline)", MoveSearch(above=replicas)),  # no runner: one process
        (f"{shards} shards, one after another", MoveSearch(0, shards, InProcessShards())),
    ]
    started = 0.0
    ray = Sharded(above=0, shards=args.shards, num_cpus=args.ray_cpus)
    if not args.no_ray:
        clock = time.perf_counter()
        ray.ray()
        started = time.perf_counter() - clock
        searches.append(
            (f"Ray, {shards} shards on {args.ray_cpus} CPUs", MoveSearch(0, shards, RayShards(ray)))
        )
    # the machine is shared: each search runs --repeat times, interleaved, and the fastest
    # run counts (the moves are the same every time)
    best: dict[str, tuple[float, Searched]] = {}
    try:
        for _ in range(args.repeat):
            for name, search in searches:
                seconds, found = timed(search, lambda s: s.plan_now(table, services, args.budget))
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, found)
    finally:
        asyncio.run(ray.close())
    rows = [(name, best[name][0], best[name][1]) for name, _ in searches]

    baseline = rows[0][1]
    print(f"skew before: sum {before[0]:,}, worst {before[1]}")
    print(
        f"{'search':<34} {'seconds':>8} {'vs one':>7} {'moves':>6} {'skew sum':>9} "
        f"{'worst':>6} {'repaired':>9} {'dropped':>8} {'same moves':>11}"
    )
    for name, seconds, found in rows:
        total, worst = skew(table, services, found.moves)
        same = "yes" if found.moves == rows[0][2].moves else "no"
        print(
            f"{name:<34} {seconds:>8.2f} {baseline / seconds:>6.2f}x {len(found.moves):>6} "
            f"{total:>9,} {worst:>6} {found.repaired:>9} {found.dropped:>8} {same:>11}"
        )
    if started:
        print(f"(Ray started in {started:.1f}s before the clock)")


if __name__ == "__main__":
    main()
