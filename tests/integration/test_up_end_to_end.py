"""The walkthrough a user does, through `corral up` with its embedded NATS and real replica
processes: deploy, HTTP, scale, events, trace, stop, restart, delete; nothing left behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from support import CORRAL, acli, eventually

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


def up_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(
        {
            "CORRAL_DATA_DIR": str(data_dir),
            "CORRAL_NODE_ID": "local",
            "COLUMNS": "200",
            "NO_COLOR": "1",
        }
    )
    return env


class Up:
    """`corral up` as a user runs it, in its own data directory."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir = data_dir
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.log.write_text("")
        handle = self.log.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            CORRAL,
            "up",
            "--port",
            "0",
            "--gateway-port",
            "0",
            env=up_env(self.data_dir),
            stdout=handle,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
        handle.close()
        proc = self.proc
        await eventually(
            lambda: "Corral is ready" in self.log.read_text() or proc.returncode is not None,
            within=30,
            what="corral up ready",
        )
        assert proc.returncode is None, self.log.read_text()

    def children(self) -> list[psutil.Process]:
        assert self.proc is not None
        return psutil.Process(self.proc.pid).children(recursive=True)

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


async def status(env: dict[str, str], *args: str) -> dict:
    result = await acli(env, "status", *args, "-o", "json")
    assert result.returncode == 0, result
    return json.loads(result.stdout)


def http_ok(port: int) -> bool:
    return http_ok_url(f"http://127.0.0.1:{port}/")


def http_ok_url(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200


async def test_walkthrough(tmp_path: Path) -> None:
    up = Up(tmp_path / ".corral", tmp_path / "up.log")
    env = up_env(tmp_path / ".corral")
    seen_pids: set[int] = set()
    try:
        await up.start()
        assert "NATS: nats://127.0.0.1:" in up.log.read_text()
        nats_pids = [p.pid for p in up.children() if p.name() == "nats-server"]
        assert len(nats_pids) == 1
        gateway = up.log.read_text().split("gateway: ")[1].split()[0]
        assert gateway.startswith("http://127.0.0.1:")
        assert await asyncio.to_thread(http_ok_url, f"{gateway}/healthz")

        result = await acli(env, "deploy", "-f", str(ROOT / "examples" / "hello.yaml"))
        assert result.returncode == 0, result
        deploy_id = result.stderr.split("(command ")[1].split(")")[0]
        service = (await status(env, "hello"))["services"][0]
        assert service["running"] == service["desired"] == 3
        for replica in service["replicas"]:
            assert replica["state"] == "healthy"  # hello.yaml has an http probe
            assert await asyncio.to_thread(http_ok, replica["ports"]["http"])
            seen_pids.add(replica["pid"])

        nodes = json.loads((await acli(env, "nodes", "-o", "json")).stdout)["nodes"]
        assert [n["id"] for n in nodes] == ["local"]
        assert nodes[0]["state"] == "ready"

        assert (await acli(env, "scale", "hello", "5")).returncode == 0
        service = (await status(env, "hello"))["services"][0]
        assert service["running"] == 5
        pids = {r["pid"] for r in service["replicas"]}
        seen_pids |= pids

        result = await acli(env, "scale", "hello", "1")
        assert result.returncode == 0, result
        service = (await status(env, "hello"))["services"][0]
        assert service["running"] == 1
        assert len(service["replicas"]) == 1
        survivor = service["replicas"][0]["pid"]
        for pid in pids - {survivor}:
            await eventually(_gone(pid), within=10, what=f"replica process {pid} to exit")

        # events: one JSON CloudEvent per line, and the whole chain of the deploy command
        lines = (await acli(env, "events", "-o", "json", "-n", "100")).stdout.splitlines()
        events = [json.loads(line) for line in lines]
        assert {e["specversion"] for e in events} == {"1.0"}
        types = [e["type"] for e in events]
        assert "io.corral.service.accepted" in types
        assert types.count("io.corral.replica.started") == 5
        assert types.count("io.corral.replica.stopped") == 4
        trace = (await acli(env, "events", "--trace", deploy_id, "-o", "json")).stdout
        chain = [json.loads(line) for line in trace.splitlines()]
        assert chain[0]["id"] == deploy_id
        assert chain[0]["type"] == "io.corral.service.deploy"
        assert [e["type"] for e in chain[1:]].count("io.corral.replica.started") == 3
        assert all(e.get("corralcorrelation") == deploy_id for e in chain[1:])

        # --follow prints events as they happen
        follower = await asyncio.create_subprocess_exec(
            CORRAL,
            "events",
            "--follow",
            "-n",
            "1",
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert follower.stdout is not None
            # the last past event comes first: once it is printed, the follower is subscribed
            await asyncio.wait_for(follower.stdout.readline(), 20)
            assert (await acli(env, "scale", "hello", "2")).returncode == 0
            line = await asyncio.wait_for(follower.stdout.readline(), 20)
            assert b"service.accepted" in line, line
            assert b"scale -> generation" in line, line
        finally:
            follower.terminate()
            await follower.wait()

        # Ctrl-C (SIGTERM here) stops everything it started
        children = up.children()
        assert await up.stop() == 0
        for child in children:
            assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, child

        # a restart brings the same service back to its count, with no duplicates
        await up.start()
        service = await eventually(lambda: _running(env, 2), within=30, what="2 replicas back")
        assert len(service["replicas"]) == 2
        for replica in service["replicas"]:
            assert replica["pid"] not in seen_pids
            assert await asyncio.to_thread(http_ok, replica["ports"]["http"])
        hello = [p for p in up.children() if "http.server" in " ".join(p.cmdline())]
        assert len(hello) == 2

        result = await acli(env, "delete", "hello")
        assert result.returncode == 0, result
        assert (await status(env))["services"] == []
        assert not [p for p in up.children() if "http.server" in " ".join(p.cmdline())]
        assert await up.stop() == 0
    finally:
        up.kill()


async def _running(env: dict[str, str], count: int) -> dict | None:
    services = (await status(env))["services"]
    if services and services[0]["running"] == count and len(services[0]["replicas"]) == count:
        return services[0]
    return None


def _gone(pid: int) -> Callable[[], bool]:
    return lambda: not psutil.pid_exists(pid)
