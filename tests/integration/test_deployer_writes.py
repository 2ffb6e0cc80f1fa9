"""The deployer's assignment writes on a real bus: sent back to back, at most WRITES_IN_FLIGHT
awaiting their acks across the services it reconciles at once, none lost, none stuck."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import pytest
from support import command, eventually

from corral.bus.store import Bucket
from corral.workers.deployer import worker as deployer_worker

pytestmark = pytest.mark.timeout(60)


def fake(node_id: str) -> dict[str, Any]:
    return {"node_id": node_id, "driver": "fake", "capacity": {"cpu": 16, "memory": "64Gi"}}


async def test_writes_stay_bounded_across_services_and_none_is_lost(
    bus, control_plane, monkeypatch
) -> None:
    monkeypatch.setattr(deployer_worker, "WRITES_IN_FLIGHT", 4)
    outstanding = {"now": 0, "most": 0, "sent": 0}
    original = Bucket.create_started

    async def counting(
        self: Bucket[Any], key: str, value: Any, *, raw: bytes | None = None
    ) -> Coroutine[Any, Any, int]:
        ack = await original(self, key, value, raw=raw)
        outstanding["now"] += 1
        outstanding["sent"] += 1
        outstanding["most"] = max(outstanding["most"], outstanding["now"])

        async def settled() -> int:
            try:
                return await ack
            finally:
                outstanding["now"] -= 1

        return settled()

    monkeypatch.setattr(Bucket, "create_started", counting)
    spec = {"replicas": 15, "command": ["sleep", "1"], "resources": {"cpu": 0.1}}
    async with control_plane(agents=[fake(f"n{i}") for i in range(4)]):
        for name in ("a", "b", "c"):
            await command(bus, "deploy", name, spec)

        async def all_assigned() -> bool:
            items = await bus.buckets.assignments.items()
            return len(items) == 45

        await eventually(all_assigned, what="45 assignments written")
    assert outstanding["sent"] == 45  # none written twice, none lost
    assert 1 < outstanding["most"] <= 4
    assert outstanding["now"] == 0
