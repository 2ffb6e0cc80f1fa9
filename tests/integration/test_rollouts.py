"""Rollouts with real processes: a rolling update that keeps every replica ready, a failed
rollout that rolls itself back (and the CLI's exit code says so), a rollback by hand, the
revision history, and a canary promoted by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from support import acli, collect, command, corral_env, eventually

from corral.bus.store import Mirror
from corral.schemas.state import Assignment, ReplicaStatus, RolloutState

pytestmark = pytest.mark.timeout(120)
LOCAL = {"node_id": "local", "driver": "process"}


def spec(version: str, replicas: int = 4, **extra: object) -> dict:
    base = {
        "replicas": replicas,
        "ports": ["http"],
        "command": [sys.executable, "-m", "http.server", "${PORT}", "--bind", "127.0.0.1"],
        "env": {"VERSION": version},
        "health": {"http": {"path": "/", "port": "http"}, "period": "200ms"},
        "update": {"min_healthy": "300ms", "max_surge": 1},
        "restart": {"backoff": {"initial": "100ms", "max": "200ms"}},
    }
    base.update(extra)
    return base


class Watch:
    """Mirrors of assignments and replica statuses for one service."""

    def __init__(self, bus, service: str) -> None:
        self.service = service
        self.assignments: Mirror[Assignment] = Mirror(bus.buckets.assignments)
        self.replicas: Mirror[ReplicaStatus] = Mirror(bus.buckets.replicas)
        self.lowest_ready: int | None = None
        self.replicas.listen(lambda *_: self._sample())
        self.assignments.listen(lambda *_: self._sample())

    async def __aenter__(self) -> Watch:
        await self.assignments.start()
        await self.replicas.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.replicas.stop()
        await self.assignments.stop()

    def versions(self, *, ready_only: bool = True) -> list[str]:
        out = []
        statuses = {s.replica: s for s in self.replicas.values()}
        for a in self.assignments.values():
            if a.service != self.service or a.draining:
                continue
            status = statuses.get(a.replica)
            if ready_only and (status is None or not status.ready):
                continue
            out.append(a.template.env.get("VERSION", "?"))
        return sorted(out)

    def ready_count(self) -> int:
        statuses = {s.replica: s for s in self.replicas.values()}
        return sum(
            1
            for a in self.assignments.values()
            if a.service == self.service and (s := statuses.get(a.replica)) is not None and s.ready
        )

    def _sample(self) -> None:
        if self.lowest_ready is not None:
            self.lowest_ready = min(self.lowest_ready, self.ready_count())

    def start_sampling(self) -> None:
        self.lowest_ready = self.ready_count()


async def test_rolling_update_keeps_every_replica_ready(settings, bus, control_plane) -> None:
    events = await collect(bus, bus.names.evt("service", "web", "*"))
    async with control_plane(agents=[LOCAL]), Watch(bus, "web") as watch:
        await command(bus, "deploy", "web", spec("1"))
        await eventually(lambda: watch.versions() == ["1"] * 4, what="four v1 replicas ready")
        watch.start_sampling()
        await command(bus, "deploy", "web", spec("2"))
        await eventually(
            lambda: watch.versions(ready_only=False) == ["2"] * 4 and watch.ready_count() == 4,
            within=60,
            what="four v2 replicas ready and no v1 left",
        )
        assert watch.lowest_ready is not None
        assert watch.lowest_ready >= 4

        async def complete():
            item = await bus.buckets.service_status.get("web")
            rollout = item.value.rollout if item else None
            return rollout is not None and rollout.state == RolloutState.COMPLETE and item

        status = await eventually(complete, what="the rollout complete")
        assert status.value.rollout.from_revision == 1
        assert status.value.revision == 2
        await eventually(
            lambda: any(s.endswith(".rollout_complete") for s, _ in events),
            what="a rollout_complete event",
        )
        assert any(s.endswith(".rollout_started") for s, _ in events)
    await events.close()


async def test_a_failed_rollout_rolls_back_and_deploy_exits_4(
    settings, bus, control_plane, tmp_path: Path
) -> None:
    env = corral_env(settings)
    bad = spec("2", replicas=3, command=["sh", "-c", "exit 1"])
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps({"name": "web", **bad}))
    async with control_plane(agents=[LOCAL]), Watch(bus, "web") as watch:
        await command(bus, "deploy", "web", spec("1", replicas=3))
        await eventually(lambda: watch.versions() == ["1"] * 3, what="three v1 replicas ready")
        result = await acli(env, "deploy", "-f", str(bad_file), "--timeout", "60")
        assert result.returncode == 4, result
        assert "rolled back" in result.stderr or "failed" in result.stderr
        record = (await bus.buckets.services.get("web")).value
        assert record.revision == 3
        assert record.rollback_of == 2
        assert record.revisions[-1].cause == "rollback to 1"
        await eventually(
            lambda: watch.versions(ready_only=False) == ["1"] * 3 and watch.ready_count() == 3,
            within=60,
            what="back to three v1 replicas, no v2 left",
        )
        history = await acli(env, "history", "web", "-o", "json")
        assert history.returncode == 0, history
        rows = json.loads(history.stdout)["revisions"]
        assert [r["revision"] for r in rows] == [1, 2, 3]
        assert rows[-1]["current"]
        assert rows[-1]["cause"] == "rollback to 1"
        trace = await acli(env, "events", "--trace", record.revisions[1].command_id)
        assert "rollout_failed" in trace.stdout, trace
        assert "rollback" in trace.stdout, trace


async def test_rollback_by_hand_and_a_canary_promoted(settings, bus, control_plane) -> None:
    env = corral_env(settings)
    async with control_plane(agents=[LOCAL]), Watch(bus, "web") as watch:
        await command(bus, "deploy", "web", spec("1", replicas=3))
        await eventually(lambda: watch.versions() == ["1"] * 3, what="three v1 replicas ready")
        canary = spec("2", replicas=3, update={"canary": 1, "min_healthy": "200ms"})
        await command(bus, "deploy", "web", canary)
        await eventually(
            lambda: watch.versions() == ["1", "1", "1", "2"], what="one canary beside three v1"
        )

        async def paused():
            item = await bus.buckets.service_status.get("web")
            rollout = item.value.rollout if item else None
            return rollout is not None and rollout.state == RolloutState.PAUSED

        await eventually(paused, what="the rollout paused for the canary")
        result = await acli(env, "promote", "web", "--timeout", "60")
        assert result.returncode == 0, result
        assert watch.versions(ready_only=False) == ["2"] * 3
        result = await acli(env, "rollback", "web", "--timeout", "60")
        assert result.returncode == 0, result
        await eventually(
            lambda: watch.versions(ready_only=False) == ["1"] * 3 and watch.ready_count() == 3,
            what="three v1 replicas again",
        )
        bad = await acli(env, "rollback", "web", "--to", "9")
        assert bad.returncode == 1, bad
        assert "no revision 9" in bad.stderr, bad
