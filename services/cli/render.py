"""Turning views and events into tables, lines, JSON and YAML."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from corral.schemas.envelope import CloudEvent
from corral.schemas.quantities import format_bytes


class Output(StrEnum):
    """What every `-o` option offers."""

    table = "table"
    json = "json"
    yaml = "yaml"


def dump(data: Any, output: str, console: Console) -> None:
    if output == "json":
        console.print_json(json.dumps(data, default=str)) if console.is_terminal else print(
            json.dumps(data, default=str)
        )
    elif output == "yaml":
        print(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False), end="")


def _resources(values: dict[str, float]) -> str:
    parts = []
    for key, value in sorted(values.items()):
        if key == "memory":
            parts.append(f"memory={format_bytes(value)}")
        else:
            parts.append(f"{key}={value:g}")
    return " ".join(parts) or "-"


def services_table(services: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in (
        "SERVICE",
        "REV",
        "STATE",
        "READY",
        "REPLICA",
        "NODE",
        "R-STATE",
        "PORTS",
        "NOTE",
    ):
        table.add_column(column)
    for service in services:
        ready = f"{service['ready']}/{service['desired']}"
        note = ""
        rollout = service.get("rollout") or {}
        if service["pending"]:
            note = f"{service['pending']} pending: {service['reason']}"
        elif service.get("degraded"):
            note = service["degraded"]
        elif rollout.get("state") in ("progressing", "paused", "failed") and rollout.get("reason"):
            note = f"rev {rollout['revision']}: {rollout['reason']}"
        rows = service["replicas"] or [None]
        for index, replica in enumerate(rows):
            head = (
                [service["name"], str(service["revision"]), service["state"], ready]
                if index == 0
                else ["", "", "", ""]
            )
            if replica is None:
                table.add_row(*head, "-", "-", "-", "-", note)
                continue
            ports = " ".join(f"{k}={v}" for k, v in replica["ports"].items())
            message = replica["message"] if replica["state"] not in ("running", "healthy") else ""
            table.add_row(
                *head,
                replica["id"],
                replica["node"] or "-",
                replica["state"],
                ports or "-",
                note if index == 0 else message,
            )
            if index == 0 and message and note:
                table.add_row("", "", "", "", "", "", "", "", message)
    return table


def history_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("REVISION", "", "CAUSE", "CREATED", "RUNS"):
        table.add_column(column)
    for row in rows:
        runs = row["image"] or ""
        if row["command"]:
            runs = f"{runs} {' '.join(row['command'])}".strip()
        table.add_row(
            str(row["revision"]),
            "current" if row["current"] else "",
            row["cause"],
            row["created_at"][:19].replace("T", " "),
            runs[:60],
        )
    return table


def nodes_table(nodes: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("NODE", "STATE", "RUNTIME", "REPLICAS", "CAPACITY", "ALLOCATED", "LABELS"):
        table.add_column(column)
    for node in nodes:
        table.add_row(
            node["id"],
            node["state"],
            node["runtime"] or ",".join(node["drivers"]),
            str(node["replicas"]),
            _resources(node["capacity"]),
            _resources(node["allocated"]),
            " ".join(f"{k}={v}" for k, v in node["labels"].items()) or "-",
        )
    return table


def event_line(event: CloudEvent) -> str:
    data = event.data if isinstance(event.data, dict) else {}
    stamp = event.time.strftime("%H:%M:%S.%f")[:-3] if event.time else "--:--:--"
    kind = event.type.removeprefix("io.corral.")
    detail = ""
    if "replica" in data:
        detail = f"{data['replica']} on {data.get('node')}"
        if data.get("pid"):
            detail += f" pid {data['pid']}"
        if data.get("ports"):
            detail += " " + " ".join(f"{k}={v}" for k, v in data["ports"].items())
        if data.get("message"):
            detail += f" ({data['message']})"
    elif "reason" in data and kind.endswith("rejected"):
        detail = f"{data.get('code')}: {data['reason']}"
    elif "generation" in data and "command" in data:
        detail = f"{data['command']} -> generation {data['generation']}"
        if not data.get("changed", True):
            detail += " (no change)"
    elif "from_revision" in data:
        detail = f"revision {data.get('revision')}"
        if data.get("from_revision"):
            detail += f" replacing {data['from_revision']}"
        if data.get("reason"):
            detail += f": {data['reason']}"
    elif "degraded" in data or ("node" in data and "state" in data):
        detail = str(data.get("reason", ""))
    elif "code" in data and "current" in data:  # an autoscale decision
        detail = f"{data['current']} -> {data['desired']} {data['code']}: {data.get('reason')}"
    elif "seconds" in data and "trigger" in data:  # an autoscale cold start
        detail = f"cold start {data['seconds']:.3f}s after {data['trigger']}"
    elif "desired" in data:
        detail = f"generation {data.get('generation')}: {data.get('assigned')}/{data['desired']}"
        if data.get("pending"):
            detail += f", {data['pending']} pending: {data.get('reason')}"
    elif data:
        detail = json.dumps(data, default=str)[:200]
    return f"{stamp}  {kind:<28} {event.subject or '-':<16} {detail}"
