"""`behavior.smoothing.mode: two_speed` in the real autoscaler, on a real nats-server with the
control plane in-process: noisy samples and a noise peak leave the count alone, a burst
scales out at once, and every decision says which value it was fed."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from support import acli, collect, command, corral_env, eventually, replica_states

from corral.bus.settings import Settings
from corral.schemas.state import LIVE_STATES
from corral.workers.autoscaler.worker import AutoscalerWorker

pytestmark = pytest.mark.timeout(60)
WORKERS = ("api", "deployer", "scheduler", "autoscaler")
FAKE = {"node_id": "sim", "driver": "fake", "capacity": {"cpu": 64, "memory": "64Gi"}}
TICK = 1.05
"""the samples' cadence: the noise is measured over readings at least 1 s apart"""


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"autoscale_poll_interval": 0.2, "metrics_interval": 0.2})


async def live(bus: Any, service: str) -> list[str]:
    return sorted(s.replica for s in await replica_states(bus, service) if s.state in LIVE_STATES)


async def desired(bus: Any, service: str) -> int:
    item = await bus.buckets.services.get(service)
    return -1 if item is None else int(item.value.spec.replicas)


async def send(bus: Any, service: str, replicas: list[str], value: float) -> None:
    samples = [{"name": "load", "value": value, "replica": r} for r in replicas]
    await bus.nc.publish(bus.names.metrics(service), json.dumps(samples).encode())
    await bus.nc.flush()


async def test_noise_is_averaged_and_a_burst_scales_out_at_once(
    settings: Settings, bus: Any, control_plane: Any
) -> None:
    policy = {
        "min": 1,
        "max": 10,
        "metrics": [{"type": "metric", "name": "load", "target": 10}],
        "behavior": {"smoothing": {"mode": "two_speed", "window": "30s"}},
    }
    seen = await collect(bus, bus.names.evt("autoscale", "calm", "decision"))
    async with control_plane(workers=WORKERS, agents=[FAKE]) as host:
        worker = next(w for w in host.workers if isinstance(w, AutoscalerWorker))
        await command(
            bus, "deploy", "calm", {"replicas": 4, "command": ["sleep", "600"], "autoscale": policy}
        )

        async def four() -> list[str] | None:
            found = await live(bus, "calm")
            return found if len(found) == 4 else None

        replicas = await eventually(four, within=20, what="4 live replicas")
        # the load source: 5.5 and 8.5 per replica in turn, one reading a tick; a demand of
        # 2.8 +- 0.6 replicas, so the average plus its headroom stays within 10 % of 4
        for i in range(10):
            await send(bus, "calm", replicas, 8.5 if i % 2 else 5.5)
            await asyncio.sleep(TICK)  # the cadence of the samples, not a wait for a result
        # a noise peak, 15 % over the target: the reading alone would ask for 5
        await send(bus, "calm", replicas, 11.5)

        def peak_taken() -> bool:
            fresh = worker.samples.fresh("calm", "load", time.monotonic(), 30.0, replicas)
            return sorted(fresh.values()) == [11.5] * 4

        await eventually(peak_taken, within=5, what="the peak's samples taken")
        # the worker's own evaluation of that reading (a decision that changes nothing is not
        # always published, so ask for it)
        peak = await worker.evaluate("calm", "test")
        assert peak is not None
        [proposal] = peak.proposals
        assert proposal.demand == pytest.approx(4.6)
        assert proposal.path == "smoothed"
        assert proposal.noise is not None
        assert proposal.noise > 1.0
        assert "the reading alone: ceil(11.5 / 10 x 4) = 5" in proposal.note
        assert (peak.desired, peak.action) == (4, "none")
        assert await desired(bus, "calm") == 4
        # a burst: 30 per replica, a demand of 12 - far beyond 3 noise deviations
        await send(bus, "calm", replicas, 30.0)

        async def scaled_out() -> bool:
            return await desired(bus, "calm") == 8

        await eventually(scaled_out, within=5, what="a scale-out to 8 at once")
        ups = [json.loads(t) for _, t in seen if json.loads(t)["action"] == "scale_up"]
        assert len(ups) == 1, ups
        [burst] = ups[0]["proposals"]
        assert burst["path"] == "burst"
        assert burst["demand"] == pytest.approx(12.0)
        # ceil(12 - 1 deviation) asked; max(100 %, 4) from 4 allowed 8
        assert ups[0]["recommended"] in (11, 12)
        assert (ups[0]["desired"], ups[0]["limited_by"]) == (8, "scale_up_limit")
        assert "burst: 12.00 replicas is above the average" in ups[0]["reason"]
        # `corral autoscale status` names what each decision was fed
        table = await acli(corral_env(settings), "autoscale", "status", "calm")
        assert table.returncode == 0, table
        assert "(burst)" in table.stdout, table.stdout
    await seen.close()
