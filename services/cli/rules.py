"""`corral rules apply|list|delete`: automation rules, stored by the rules worker."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from corral.bus.connection import Bus
from corral.schemas.errors import FieldError, InvalidInput, field_errors_from_pydantic
from corral.schemas.rules import Rule
from corral.services.cli import render
from corral.services.cli.client import CliError, send_command
from corral.services.cli.render import Output
from corral.workers.rules.templating import check

rules_app = typer.Typer(no_args_is_help=True, help="Automation rules: event -> command.")
out = Console()
err = Console(stderr=True)


def load_rules(path: str) -> list[Rule]:
    """Every rule in a YAML or JSON file (`-` for standard input): one rule per document, a
    list of rules, or `{rules: [...]}`. Each is validated, templates included."""
    import sys

    if path == "-":
        text, where = sys.stdin.read(), "standard input"
    else:
        file = Path(path)
        if not file.is_file():
            raise InvalidInput(f"{path}: no such file")
        text, where = file.read_text(), path
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{where} is not valid YAML or JSON: {exc}") from None
    items: list[tuple[str, Any]] = []
    for number, document in enumerate(documents, 1):
        if isinstance(document, dict) and set(document) == {"rules"}:
            document = document["rules"]
        if isinstance(document, list):
            items.extend((f"document {number}, rule {i + 1}", d) for i, d in enumerate(document))
        else:
            items.append((f"document {number}", document))
    if not items:
        raise InvalidInput(f"{where} holds no rules")
    rules: list[Rule] = []
    errors: list[FieldError] = []
    for label, item in items:
        if not isinstance(item, dict):
            errors.append(FieldError(label, "a rule must be a mapping (name:, when:, then:)"))
            continue
        who = f"{label} ({item.get('name', '?')})"
        try:
            rule = Rule.model_validate(item)
        except ValidationError as exc:
            errors.extend(
                FieldError(f"{who}: {e.loc}", e.msg) for e in field_errors_from_pydantic(exc)
            )
            continue
        errors.extend(FieldError(f"{who}: {e.loc}", e.msg) for e in check(rule.then))
        rules.append(rule)
    names = [r.name for r in rules]
    errors.extend(
        FieldError(name, "defined more than once")
        for name in sorted(set(names))
        if names.count(name) > 1
    )
    if errors:
        raise InvalidInput(f"{where}: invalid rules", errors)
    return rules


@rules_app.command("apply")
def apply(
    file: Annotated[str, typer.Option("-f", "--file", help="YAML/JSON with one or many rules")],
) -> None:
    """Store (create or replace) the rules in a file."""
    from corral.services.cli.main import _run, _settings, _with_bus

    settings = _settings()

    async def work(bus: Bus) -> list[tuple[str, dict[str, Any]]]:
        rules = load_rules(file)
        outcomes = await asyncio.gather(
            *(
                send_command(
                    bus,
                    "rule",
                    rule.name,
                    "apply",
                    rule.model_dump(mode="json"),
                    within=settings.command_timeout,
                )
                for rule in rules
            )
        )
        failed = []
        for rule, outcome in zip(rules, outcomes, strict=True):
            if outcome.accepted:
                verb = "configured" if outcome.data.get("changed", True) else "unchanged"
                out.print(f"rule {rule.name} {verb} (generation {outcome.data.get('generation')})")
            else:
                failed.append((rule.name, outcome.data))
        return failed

    failed = _run(_with_bus(settings, work))
    for name, data in failed:
        err.print(f"[red]rejected:[/red] rule {name}: {data.get('reason')}")
        for item in data.get("errors", []):
            err.print(f"  {item.get('loc') or '(rule)'}: {item.get('msg')}")
    if failed:
        raise typer.Exit(1)


@rules_app.command("list")
def list_rules(
    output: Annotated[Output, typer.Option("-o", "--output", help="table, json or yaml")] = (
        Output.table
    ),
) -> None:
    """The stored rules, and when each last fired."""
    from corral.services.cli.main import _run, _settings, _with_bus

    rows = _run(_with_bus(_settings(), rule_views))
    if output == Output.table:
        out.print(rules_table(rows) if rows else "no rules")
    else:
        render.dump({"rules": rows}, output.value, out)


@rules_app.command("delete")
def delete(name: str) -> None:
    """Delete a rule."""
    from corral.services.cli.main import _run, _settings, _with_bus

    settings = _settings()

    async def work(bus: Bus) -> None:
        outcome = await send_command(
            bus, "rule", name, "delete", {}, within=settings.command_timeout
        )
        if not outcome.accepted:
            raise CliError(str(outcome.data.get("reason") or "rejected"))
        out.print(f"rule {name} deleted")

    _run(_with_bus(settings, work))


async def rule_views(bus: Bus) -> list[dict[str, Any]]:
    records, states = await asyncio.gather(
        bus.buckets.rules.items(), bus.buckets.rule_state.items()
    )
    rows = []
    for name in sorted(records):
        record = records[name].value
        state = states.get(name)
        firings = state.value.firings if state else []
        last = max((f.at for f in firings), default=None)
        rows.append(
            {
                **record.rule.model_dump(mode="json"),
                "generation": record.generation,
                "updated_at": record.updated_at.isoformat(),
                "requested_by": record.requested_by,
                "last_fired": datetime.fromtimestamp(last, UTC).isoformat() if last else None,
                "recent_firings": len(firings),
            }
        )
    return rows


def _then(then: dict[str, Any]) -> str:
    if then.get("notify"):
        return f"notify: {then['notify']['text'][:40]}"
    return f"{then['resource']} {then['verb']} {then['name']}"


def rules_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "ENABLED", "WHEN", "THEN", "LIMITS", "LAST FIRED"):
        table.add_column(column)
    for row in rows:
        when = row["when"]
        matched = " ".join(f"{k}={v}" for k, v in when["match"].items())
        limits = []
        if row["cooldown"]:
            limits.append(f"cooldown {row['cooldown']:g}s")
        if row["rate_limit"]:
            limits.append(f"{row['rate_limit']['count']}/{row['rate_limit']['per']:g}s")
        table.add_row(
            row["name"],
            "yes" if row["enabled"] else "no",
            f"{when['type']} {when['subject']} {matched}".strip(),
            _then(row["then"]),
            ", ".join(limits) or "-",
            (row["last_fired"] or "-")[:19],
        )
    return table
