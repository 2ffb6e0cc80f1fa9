"""The autoscaler on a real nats-server, with the control plane in-process: metric samples
scale a service out at once and back in through its stabilisation window, removing the least
busy replicas; a JetStream backlog scales out and back in; a service cools down to zero and
wakes on a message, with its cold start measured; Prometheus answers through its HTTP API;
bad samples are counted, never fatal."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from support import acli, collect, command, corral_env, eventually, replica_states

from corral.bus.settings import Settings
from corral.schemas.state import LIVE_STATES
from corral.workers.autoscaler.worker import AutoscalerWorker

pytestmark = pytest.mark.timeout(60)
WORKERS = ("api", "deployer", "scheduler", "autoscaler")
FAKE = {"node_id": "sim", "driver": "fake", "capacity": {"cpu": 64, "memory": "64Gi"}}
LOCAL = {"node_id": "local", "driver": "process"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"autoscale_poll_interval": 0.2, "metrics_interval": 0.2})


def spec(replicas: int, autoscale: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"replicas": replicas, "command": ["sleep", "600"], "autoscale": autoscale, **extra}


async def live(bus: Any, service: str) -> list[str]:
    return sorted(s.replica for s in await replica_states(bus, service) if s.state in LIVE_STATES)


async def desired(bus: Any, service: str) -> int:
    item = await bus.buckets.services.get(service)
    return -1 if item is None else int(item.value.spec.replicas)


async def publish(bus: Any, service: str, samples: list[dict[str, Any]]) -> None:
    await bus.nc.publish(bus.names.metrics(service), json.dumps(samples).encode())
    await bus.nc.flush()


def decisions(seen: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [json.loads(text) for _, text in seen]


def autoscaler(host: Any) -> AutoscalerWorker:
    return next(w for w in host.workers if isinstance(w, AutoscalerWorker))


async def test_samples_above_target_scale_up_at_once_and_explain_why(
    settings, bus, control_plane
) -> None:
    policy = {"min": 1, "max": 10, "metrics": [{"type": "metric", "name": "load", "target": 10}]}
    seen = await collect(bus, bus.names.evt("autoscale", "web", "decision"))
    accepted = await collect(bus, bus.names.evt("service", "web", "accepted"))
    async with control_plane(workers=WORKERS, agents=[FAKE]):
        await command(bus, "deploy", "web", spec(2, policy))
        replicas = await _wait_live(bus, "web", 2)
        started = time.monotonic()

        async def scaled() -> bool:
            await publish(
                bus, "web", [{"name": "load", "value": 30, "replica": r} for r in replicas]
            )
            return await desired(bus, "web") == 6

        await eventually(scaled, within=5, every=0.1, what="a scale to 6")
        reaction = time.monotonic() - started
        assert reaction < 5
        scale_ups = [d for d in decisions(seen) if d["action"] == "scale_up"]
        assert scale_ups, decisions(seen)
        decision = scale_ups[0]
        # the decision carries its inputs: values, the formula, the limit and the trigger
        assert (decision["current"], decision["desired"]) == (2, 6)
        assert decision["trigger"] == "sample load"
        [proposal] = decision["proposals"]
        assert proposal["metric"] == "metric load"
        assert proposal["value"] == 30
        assert proposal["formula"] == "ceil(30 / 10 x 2) = 6"
        assert decision["command_id"].startswith("autoscale.web.g1.r6")
        # the command went through the api like any other caller's
        await eventually(
            lambda: any(decision["command_id"] in text for _, text in accepted),
            what="the scale command accepted",
        )
        await _wait_live(bus, "web", 6)
        # `corral autoscale status` shows the decision
        result = await acli(corral_env(settings), "autoscale", "status", "web", "-o", "json")
        assert result.returncode == 0, result
        view = json.loads(result.stdout)
        assert view["policy"]["max"] == 10
        assert any(d["code"] == "scale_up" for d in view["decisions"])
        table = await acli(corral_env(settings), "autoscale", "status", "web")
        assert "2 -> 6" in table.stdout, table
    await seen.close()
    await accepted.close()


async def _wait_live(bus: Any, service: str, count: int, within: float = 20) -> list[str]:
    async def probe() -> tuple[list[str]] | None:
        found = await live(bus, service)
        return (found,) if len(found) == count else None  # a tuple: truthy even when empty

    (result,) = await eventually(probe, within=within, what=f"{count} live replicas")
    return list(result)


async def test_below_target_scales_in_removing_the_least_busy(settings, bus, control_plane) -> None:
    policy = {
        "min": 1,
        "max": 10,
        "metrics": [{"type": "metric", "name": "inflight", "target": 10}],
        "behavior": {"scale_down": {"stabilization_window": "1s"}},
    }
    seen = await collect(bus, bus.names.evt("autoscale", "quiet", "decision"))
    async with control_plane(workers=WORKERS, agents=[FAKE]):
        await command(bus, "deploy", "quiet", spec(4, policy))
        a, b, c, d = await _wait_live(bus, "quiet", 4)
        load = {a: 9.0, b: 0.0, c: 8.0, d: 1.0}  # average 4.5: ceil(0.45 x 4) = 2

        async def two_left() -> list[str] | None:
            samples = [{"name": "inflight", "value": v, "replica": r} for r, v in load.items()]
            await publish(bus, "quiet", samples)
            found = await live(bus, "quiet")
            return found if await desired(bus, "quiet") == 2 and len(found) == 2 else None

        remaining = await eventually(two_left, within=15, every=0.2, what="a scale-in to 2")
        assert remaining == sorted([a, c])  # the busiest stay
        held = [x for x in decisions(seen) if x["code"] == "stabilized"]
        assert held, "the first decisions are held by the 1 s stabilisation window"
        assert "the highest recommendation of the last 1s was 4" in held[0]["reason"]
        down = next(x for x in decisions(seen) if x["action"] == "scale_down")
        assert down["prefer_remove"][:2] == [b, d]
        record = await bus.buckets.services.get("quiet")
        assert record.value.prefer_remove[:2] == [b, d]
    await seen.close()


async def test_a_backlog_on_a_jetstream_consumer_scales_out_then_in(
    settings, bus, control_plane
) -> None:
    stream = f"{settings.prefix.upper()}_JOBS"
    subject = f"{settings.prefix}.jobs.work"
    await bus.js.add_stream(StreamConfig(name=stream, subjects=[f"{settings.prefix}.jobs.>"]))
    await bus.js.add_consumer(
        stream, ConsumerConfig(durable_name="workers", ack_policy=AckPolicy.EXPLICIT)
    )
    policy = {
        "min": 1,
        "max": 5,
        "poll_interval": "200ms",
        "metrics": [{"type": "queue", "stream": stream, "consumer": "workers", "target": 10}],
        "behavior": {"scale_down": {"stabilization_window": 0}},
    }
    try:
        async with control_plane(workers=WORKERS, agents=[FAKE]):
            await command(bus, "deploy", "jobs", spec(1, policy))
            await _wait_live(bus, "jobs", 1)
            for i in range(35):
                await bus.js.publish(subject, f"job {i}".encode())
            await eventually(
                lambda: desired_is(bus, "jobs", 4), within=10, what="ceil(35 / 10) = 4 replicas"
            )
            await _wait_live(bus, "jobs", 4)
            consumer = await bus.js.pull_subscribe(subject, durable="workers", stream=stream)
            done = 0
            while done < 35:
                for msg in await consumer.fetch(35 - done, timeout=5):
                    await msg.ack()
                    done += 1
            await eventually(lambda: desired_is(bus, "jobs", 1), within=10, what="back to min 1")
            await _wait_live(bus, "jobs", 1)
            await consumer.unsubscribe()
    finally:
        await bus.js.delete_stream(stream)


async def desired_is(bus: Any, service: str, count: int) -> bool:
    return await desired(bus, service) == count


async def test_cooldown_to_zero_then_a_message_wakes_it_with_a_cold_start(
    settings, bus, control_plane, kill_on_exit
) -> None:
    subject = f"{settings.prefix}.wake.sleepy"
    policy = {"min": 0, "max": 3, "cooldown": "1s", "activation": {"subject": subject}}
    seen = await collect(bus, bus.names.evt("autoscale", "sleepy", "*"))
    async with control_plane(workers=WORKERS, agents=[LOCAL]):
        await command(bus, "deploy", "sleepy", spec(1, policy, stop_grace_period="2s"))
        [first] = await _wait_live(bus, "sleepy", 1)
        kill_on_exit.extend(s.pid for s in await replica_states(bus, "sleepy") if s.pid)
        await eventually(lambda: desired_is(bus, "sleepy", 0), within=10, what="cooled to 0")
        await _wait_live(bus, "sleepy", 0)
        woken = time.monotonic()
        await bus.nc.publish(subject, b"work")
        await eventually(lambda: desired_is(bus, "sleepy", 1), within=5, what="woken to 1")
        [second] = await _wait_live(bus, "sleepy", 1)
        assert second != first
        kill_on_exit.extend(s.pid for s in await replica_states(bus, "sleepy") if s.pid)
        cold = await eventually(
            lambda: [json.loads(t) for s, t in seen if s.endswith(".cold_start")],
            what="a cold_start event",
        )
        took = time.monotonic() - woken
        assert 0 < cold[0]["seconds"] <= took
        assert cold[0]["replica"] == second
        assert cold[0]["trigger"] == f"a message on {subject}"
        codes = [json.loads(t)["code"] for s, t in seen if s.endswith(".decision")]
        assert "cooldown" in codes
        assert "activated" in codes
        status = await bus.buckets.autoscale.get("sleepy")
        assert status.value.cold_start is not None
    await seen.close()


async def test_a_bad_metric_payload_is_counted_and_never_crashes(
    settings, bus, control_plane
) -> None:
    policy = {"min": 1, "max": 4, "metrics": [{"type": "metric", "name": "load", "target": 1}]}
    async with control_plane(workers=WORKERS, agents=[FAKE]) as host:
        await command(bus, "deploy", "sturdy", spec(1, policy))
        [replica] = await _wait_live(bus, "sturdy", 1)
        subject = bus.names.metrics("sturdy")
        bad = [
            b"not json",
            b"42",
            b'{"name": "load"}',
            b'{"name": "load", "value": "lots", "replica": "x"}',
            b'{"name": "load", "value": 1e999, "replica": "x"}',
            b'{"name": "bad name!", "value": 1, "replica": "x"}',
            b'[{"name": "load", "value": 1}]',
            b"\xff\xfe",
        ]
        for payload in bad:
            await bus.nc.publish(subject, payload)
        await bus.nc.flush()
        worker = autoscaler(host)
        await eventually(lambda: worker.invalid_samples >= len(bad), what="bad samples counted")

        async def scaled() -> bool:
            await publish(bus, "sturdy", [{"name": "load", "value": 3, "replica": replica}])
            return await desired(bus, "sturdy") == 3

        await eventually(scaled, within=5, every=0.1, what="a good sample still scales")
        status = await bus.buckets.autoscale.get("sturdy")
        assert status.value.invalid_samples >= len(bad)


class _Prometheus:
    """A tiny stand-in answering /api/v1/query in Prometheus' JSON shape."""

    def __init__(self) -> None:
        self.value = "0"
        self.queries: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query).get("query", [""])[0]
                owner.queries.append(query)
                body = {
                    "status": "success",
                    "data": {
                        "resultType": "vector",
                        "result": [{"metric": {}, "value": [time.time(), owner.value]}],
                    },
                }
                if url.path != "/api/v1/query":
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Prometheus:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def prometheus() -> Iterator[_Prometheus]:
    with _Prometheus() as server:
        yield server


async def test_a_prometheus_query_scales_through_the_http_api(
    settings, bus, control_plane, prometheus
) -> None:
    query = 'sum(rate(http_requests_total{service="api"}[1m]))'
    policy = {
        "min": 1,
        "max": 8,
        "poll_interval": "200ms",
        "metrics": [{"type": "prometheus", "query": query, "target": 5, "url": prometheus.url}],
    }
    seen = await collect(bus, bus.names.evt("autoscale", "api", "decision"))
    async with control_plane(workers=WORKERS, agents=[FAKE]):
        await command(bus, "deploy", "api", spec(1, policy))
        await _wait_live(bus, "api", 1)
        prometheus.value = "20"
        await eventually(lambda: desired_is(bus, "api", 4), within=10, what="ceil(20 / 5) = 4")
        assert query in prometheus.queries
        up = next(d for d in decisions(seen) if d["action"] == "scale_up")
        assert up["proposals"][0]["metric"] == f"prometheus {query}"
        assert up["proposals"][0]["value"] == 20
    await seen.close()


async def test_an_unreachable_prometheus_is_a_missing_metric(settings, bus, control_plane) -> None:
    policy = {
        "min": 1,
        "max": 8,
        "poll_interval": "200ms",
        "metrics": [{"type": "prometheus", "query": "up", "target": 5}],
    }
    seen = await collect(bus, bus.names.evt("autoscale", "nowhere", "decision"))
    async with control_plane(workers=WORKERS, agents=[FAKE]):
        await command(bus, "deploy", "nowhere", spec(1, policy))
        found = await eventually(
            lambda: [d for d in decisions(seen) if "CORRAL_PROMETHEUS_URL" in d["reason"]],
            what="a decision naming the missing setting",
        )
        assert found[0]["code"] == "missing_metrics"
        assert await desired(bus, "nowhere") == 1
    await seen.close()


async def test_agents_publish_every_replicas_cpu_and_memory(
    settings, bus, control_plane, kill_on_exit
) -> None:
    seen = await collect(bus, bus.names.metrics("busy"))
    async with control_plane(agents=[LOCAL]):
        await command(bus, "deploy", "busy", {"replicas": 1, "command": ["sleep", "600"]})
        [replica] = await _wait_live(bus, "busy", 1)
        kill_on_exit.extend(s.pid for s in await replica_states(bus, "busy") if s.pid)

        def names() -> set[str]:
            return {
                sample["name"]
                for _, text in seen
                for sample in json.loads(text)
                if sample["replica"] == replica
            }

        await eventually(lambda: {"cpu", "memory"} <= names(), what="cpu and memory samples")
        memory = [s["value"] for _, t in seen for s in json.loads(t) if s["name"] == "memory"]
        assert memory[-1] > 100_000
    await seen.close()


async def test_of_two_autoscalers_one_decides_and_the_other_takes_over(
    settings, bus, control_plane
) -> None:
    policy = {"min": 1, "max": 10, "metrics": [{"type": "metric", "name": "load", "target": 10}]}
    seen = await collect(bus, bus.names.evt("autoscale", "pair", "decision"))
    async with control_plane(workers=(*WORKERS, "autoscaler"), agents=[FAKE]) as host:
        first, second = [w for w in host.workers if isinstance(w, AutoscalerWorker)]
        await eventually(
            lambda: first.lease.held.is_set() or second.lease.held.is_set(), what="a leader"
        )
        await command(bus, "deploy", "pair", spec(1, policy))
        [replica] = await _wait_live(bus, "pair", 1)

        async def scaled_to(count: int, value: float) -> bool:
            await publish(bus, "pair", [{"name": "load", "value": value, "replica": replica}])
            return await desired(bus, "pair") == count

        await eventually(lambda: scaled_to(3, 30), within=5, every=0.1, what="a scale to 3")
        ups = [d for d in decisions(seen) if d["action"] == "scale_up"]
        assert len(ups) == 1, ups  # one leader spoke
        leader, standby = (first, second) if first.lease.held.is_set() else (second, first)
        await leader.lease.stop()  # hands the lease over at once
        await eventually(lambda: standby.lease.held.is_set(), within=10, what="a takeover")
        live3 = await _wait_live(bus, "pair", 3)

        async def scaled_up_again() -> bool:
            samples = [{"name": "load", "value": 20, "replica": r} for r in live3]
            await publish(bus, "pair", samples)
            return await desired(bus, "pair") == 6

        await eventually(scaled_up_again, within=10, every=0.1, what="the standby scaling")
    await seen.close()


async def test_samples_from_before_a_scale_do_not_count_after_it(
    settings, bus, control_plane
) -> None:
    """Half the target on 4 replicas means 2; acting again on the same samples once at 2 would
    go on to 1. The samples measured the load over 4, so after the scale they no longer count."""
    policy = {
        "min": 1,
        "max": 10,
        "metrics": [{"type": "metric", "name": "load", "target": 10}],
        "behavior": {"scale_down": {"stabilization_window": 0}},
    }
    seen = await collect(bus, bus.names.evt("autoscale", "settle", "decision"))
    async with control_plane(workers=WORKERS, agents=[FAKE]):
        await command(bus, "deploy", "settle", spec(4, policy))
        replicas = await _wait_live(bus, "settle", 4)
        await publish(bus, "settle", [{"name": "load", "value": 5, "replica": r} for r in replicas])
        await eventually(lambda: desired_is(bus, "settle", 2), within=5, what="a scale to 2")
        held = await eventually(
            lambda: [d for d in decisions(seen) if "since the last scale" in d["reason"]],
            within=5,
            what="a decision waiting for new samples",
        )
        assert held[0]["code"] == "missing_metrics"
        assert await desired(bus, "settle") == 2
    await seen.close()
