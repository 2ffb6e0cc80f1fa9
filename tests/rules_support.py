"""Helpers for the rules' and chat-ops' tests: apply rules as the CLI does, and read events."""

from __future__ import annotations

from typing import Any

from corral.bus.connection import Bus
from corral.services.cli.client import send_command


async def apply_rule(bus: Bus, rule: dict[str, Any]) -> dict[str, Any]:
    outcome = await send_command(bus, "rule", rule["name"], "apply", rule, within=15)
    assert outcome.accepted, outcome.data
    return outcome.data


async def deploy(bus: Bus, name: str, replicas: int, **extra: Any) -> None:
    spec = {"name": name, "replicas": replicas, "command": ["sleep", "3600"], **extra}
    outcome = await send_command(bus, "service", name, "deploy", spec, within=15)
    assert outcome.accepted, outcome.data


async def replicas_of(bus: Bus, name: str) -> int | None:
    found = await bus.buckets.services.get(name)
    return found.value.spec.replicas if found else None
