"""The autoscaler against a real Prometheus (Debian's `prometheus`, which `.ci/run` installs),
started here on 127.0.0.1 and scraping a test exporter every second: a gauge above the target
scales a service out, and back in when it drops. Skipped where `prometheus` is not installed,
unless CORRAL_REQUIRE_PROMETHEUS=1 (as in CI), where that fails instead."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from support import collect, command, eventually, replica_states

from corral.bus.settings import Settings
from corral.schemas.state import LIVE_STATES

pytestmark = pytest.mark.timeout(90)
WORKERS = ("api", "deployer", "scheduler", "autoscaler")
FAKE = {"node_id": "sim", "driver": "fake", "capacity": {"cpu": 64, "memory": "64Gi"}}
GAUGE = "corral_test_queue_depth"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"autoscale_poll_interval": 0.2, "metrics_interval": 0.2})


class _Exporter:
    """A test exporter: `/metrics` in the Prometheus text format, one gauge we set."""

    def __init__(self) -> None:
        self.value = 0.0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_response(404)
                    self.end_headers()
                    return
                data = (
                    f"# HELP {GAUGE} A gauge the test sets.\n"
                    f"# TYPE {GAUGE} gauge\n"
                    f"{GAUGE} {owner.value}\n"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Exporter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class _Server:
    def __init__(self, url: str, exporter: _Exporter) -> None:
        self.url = url
        self.exporter = exporter


def _prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None
    )
    if found:
        return found
    reason = "prometheus is not installed: `apt-get install prometheus` (.ci/run does)"
    if os.environ.get("CORRAL_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(f"CORRAL_REQUIRE_PROMETHEUS=1 but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bytes(response.read()) if response.status == 200 else None
    except (OSError, urllib.error.URLError):
        return None


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[_Server]:
    binary = _prometheus_binary()
    with _Exporter() as exporter:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: corral-test\n"
            "    static_configs:\n"
            f"      - targets: ['{exporter.address}']\n"
        )
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + 30
            while _get(f"{url}/-/ready") is None:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"prometheus did not become ready:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
            yield _Server(url, exporter)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _scraped(prometheus: _Server, value: float) -> bool:
    body = _get(f"{prometheus.url}/api/v1/query?query={GAUGE}")
    if body is None:
        return False
    result = json.loads(body)["data"]["result"]
    return bool(result) and float(result[0]["value"][1]) == value


async def _live(bus: Any, service: str) -> int:
    return sum(1 for s in await replica_states(bus, service) if s.state in LIVE_STATES)


async def _desired(bus: Any, service: str) -> int:
    item = await bus.buckets.services.get(service)
    return -1 if item is None else int(item.value.spec.replicas)


async def _settled(bus: Any, service: str, count: int) -> bool:
    return await _desired(bus, service) == count and await _live(bus, service) == count


async def test_a_real_prometheus_gauge_scales_out_and_back_in(
    settings, bus, control_plane, prometheus
) -> None:
    policy = {
        "min": 1,
        "max": 5,
        "poll_interval": "200ms",
        "metrics": [{"type": "prometheus", "query": GAUGE, "target": 10, "url": prometheus.url}],
        "behavior": {"scale_down": {"stabilization_window": 0}},
    }
    spec = {"replicas": 1, "command": ["sleep", "600"], "autoscale": policy}
    seen = await collect(bus, bus.names.evt("autoscale", "depth", "decision"))
    async with control_plane(workers=WORKERS, agents=[FAKE]):
        await command(bus, "deploy", "depth", spec)
        await eventually(lambda: _settled(bus, "depth", 1), within=20, what="1 live replica")

        prometheus.exporter.value = 35
        await eventually(lambda: _scraped(prometheus, 35), within=15, what="35 scraped")
        await eventually(
            lambda: _settled(bus, "depth", 4), within=20, what="ceil(35 / 10) = 4 replicas"
        )
        up = next(json.loads(t) for _, t in seen if json.loads(t)["action"] == "scale_up")
        assert up["proposals"][0]["metric"] == f"prometheus {GAUGE}"
        assert up["proposals"][0]["value"] == 35

        prometheus.exporter.value = 0
        await eventually(lambda: _scraped(prometheus, 0), within=15, what="0 scraped")
        await eventually(lambda: _settled(bus, "depth", 1), within=20, what="back to min 1")
    await seen.close()
