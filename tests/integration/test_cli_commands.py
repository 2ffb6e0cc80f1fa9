"""The CLI against in-process workers: clear errors, exit codes, fake nodes and selectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from support import acli, corral_env, eventually

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[2]


async def test_invalid_spec_prints_field_and_publishes_nothing(settings, bus, tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: Bad_Name\nreplicas: -2\ncommand: [sleep, '1']\nbogus: 1\n")
    result = await acli(corral_env(settings), "deploy", "-f", str(bad))
    assert result.returncode == 2, result
    for field in ("name", "replicas", "bogus"):
        assert f"{field}:" in result.stderr, result
    assert "Traceback" not in result.stderr
    info = await bus.js.stream_info(bus.names.cmd_stream)
    assert info.state.messages == 0

    missing = await acli(corral_env(settings), "deploy", "-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "no such file" in missing.stderr

    port_less = tmp_path / "ports.yaml"
    port_less.write_text("name: web\ncommand: [serve, '${PORT}']\n")
    result = await acli(corral_env(settings), "deploy", "-f", str(port_less))
    assert result.returncode == 2
    assert "${PORT}" in result.stderr
    assert "ports" in result.stderr


async def test_unknown_service_is_not_found(settings, control_plane) -> None:
    async with control_plane():
        env = corral_env(settings)
        for args in (("scale", "ghost", "3"), ("delete", "ghost")):
            result = await acli(env, *args)
            assert result.returncode == 1, result
            assert "not found" in result.stderr
            assert "Traceback" not in result.stderr
        status = await acli(env, "status", "ghost")
        assert status.returncode == 1
        assert "not found" in status.stderr


async def test_cli_without_nats_says_so(settings, tmp_path) -> None:
    env = corral_env(settings, CORRAL_NATS_URL="nats://127.0.0.1:9")
    result = await acli(env, "status", within=30)
    assert result.returncode == 1
    assert "NATS" in result.stderr
    assert "Traceback" not in result.stderr


async def test_fake_nodes_selectors_and_pending(
    settings, control_plane, processes, tmp_path
) -> None:
    env = corral_env(settings)
    processes.start(
        "agent",
        "--node-id",
        "n2",
        "--driver",
        "fake",
        "--capacity",
        "cpu=4,memory=8Gi",
        "--label",
        "zone=b",
        name="n2",
    )
    processes.start(
        "agent",
        "--node-id",
        "n3",
        "--driver",
        "fake",
        "--capacity",
        "cpu=1,memory=1Gi",
        "--label",
        "zone=a",
        name="n3",
    )
    async with control_plane(
        agents=[{"node_id": "local", "driver": "fake", "capacity": {"cpu": 2, "memory": "2Gi"}}]
    ):

        async def nodes() -> list[dict]:
            result = await acli(env, "nodes", "-o", "json")
            assert result.returncode == 0, result
            return json.loads(result.stdout)["nodes"]

        found = await eventually(lambda: _three(nodes), what="three nodes")
        by_id = {n["id"]: n for n in found}
        assert by_id["n2"]["labels"] == {"zone": "b"}
        assert by_id["n2"]["capacity"]["cpu"] == 4
        assert by_id["n2"]["capacity"]["memory"] == 8 * 2**30
        assert by_id["n2"]["state"] == "ready"
        assert set(by_id["n2"]) >= {"id", "state", "labels", "capacity", "allocated"}

        spec = {
            "name": "zoned",
            "replicas": 3,
            "command": ["sleep", "1000"],
            "resources": {"cpu": 1, "memory": "1Gi"},
            "placement": {"node_selector": {"zone": "b"}},
        }
        path = tmp_path / "zoned.yaml"
        path.write_text(yaml.safe_dump(spec))
        result = await acli(env, "deploy", "-f", str(path), "--timeout", "30")
        assert result.returncode == 0, result
        status = json.loads((await acli(env, "status", "zoned", "-o", "json")).stdout)
        service = status["services"][0]
        assert {"name", "generation", "desired", "running", "replicas"} <= set(service)
        assert service["running"] == service["desired"] == 3
        assert {r["node"] for r in service["replicas"]} == {"n2"}
        assert all({"id", "node", "state"} <= set(r) for r in service["replicas"])
        n2 = {n["id"]: n for n in await nodes()}["n2"]
        assert n2["allocated"] == {"cpu": 3.0, "memory": 3.0 * 2**30}

        # zone b has room for one more (4 cpus): two of three extra replicas stay pending
        result = await acli(env, "scale", "zoned", "6", "--timeout", "3")
        assert result.returncode == 1
        assert "ran out of cpu" in result.stderr or "lacks cpu" in result.stderr, result
        status = json.loads((await acli(env, "status", "zoned", "-o", "json")).stdout)
        service = status["services"][0]
        assert service["pending"] == 2
        assert "fail node_selector" in service["reason"]
        table = await acli(env, "status")
        assert "2 pending" in table.stdout

        # nothing anywhere matches zone c
        spec.update(name="nowhere", placement={"node_selector": {"zone": "c"}}, replicas=1)
        path.write_text(yaml.safe_dump(spec))
        result = await acli(env, "deploy", "-f", str(path), "--timeout", "2")
        assert result.returncode == 1
        assert "3 nodes fail node_selector" in result.stderr, result


async def _three(nodes):
    found = await nodes()
    return found if len(found) == 3 else None


async def test_schema_export(tmp_path, settings) -> None:
    result = await acli(corral_env(settings), "schema", "export", str(tmp_path / "out"))
    assert result.returncode == 0, result
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {
        "spec.service.json",
        "io.corral.service.scale.json",
        "io.corral.service.rejected.json",
        "io.corral.replica.started.json",
    } <= files
    spec = json.loads((tmp_path / "out" / "spec.service.json").read_text())
    assert "replicas" in spec["properties"]
    assert spec["additionalProperties"] is False
