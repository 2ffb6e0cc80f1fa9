"""Reading pipeline files (with `deploy:` files inlined) and drawing runs: the DAG as a
layered table on a terminal, the same data as JSON or YAML for machines."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from corral.schemas.envelope import utcnow
from corral.schemas.errors import InvalidInput, field_errors_from_pydantic
from corral.schemas.pipeline import PipelineSpec
from corral.schemas.runs import JobRun, RunRecord
from corral.services.cli.specs import load_service_spec, read_document

COLOURS = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
    "skipped": "dim",
    "running": "cyan",
    "dispatched": "cyan",
    "scheduled": "yellow",
    "manual": "bold yellow",
    "pending": "white",
}


def load_pipeline(path: str) -> PipelineSpec:
    """A validated pipeline spec; a job's `deploy: FILE` is read (relative to the pipeline
    file) and sent as the service spec itself."""
    document = read_document(path)
    if not isinstance(document, dict):
        raise InvalidInput(f"{path}: a pipeline spec must be a mapping (name:, jobs:, ...)")
    base = Path(path).parent if path != "-" else Path.cwd()
    for job in (document.get("jobs") or {}).values():
        if isinstance(job, dict) and isinstance(job.get("deploy"), str):
            file = Path(job["deploy"])
            file = file if file.is_absolute() else base / file
            job["deploy"] = load_service_spec(str(file)).model_dump(mode="json")
    try:
        return PipelineSpec.model_validate(document)
    except ValidationError as exc:
        raise InvalidInput(
            f"{path}: invalid pipeline spec", field_errors_from_pydantic(exc)
        ) from exc


def layers(run: RunRecord) -> dict[str, int]:
    """Each job's depth in the DAG: 0 for jobs that need nothing."""
    depth: dict[str, int] = {}
    for name, job in run.jobs.items():  # jobs are kept in a topological order
        depth[name] = 1 + max((depth[n] for n in job.needs), default=-1)
    return depth


def seconds(job: JobRun, now: datetime) -> float | None:
    if job.started_at is None:
        return None
    return ((job.finished_at or now) - job.started_at).total_seconds()


def run_view(run: RunRecord) -> dict[str, Any]:
    now = utcnow()
    depth = layers(run)
    return {
        "run": run.id,
        "pipeline": run.pipeline,
        "state": run.state.value,
        "round": run.rounds,
        "requested_by": run.requested_by,
        "trigger": run.trigger,
        "created_at": run.created_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "variables": run.variables,
        "jobs": [
            {
                "name": job.name,
                "job": job.job,
                "layer": depth[job.name],
                "needs": job.needs,
                "matrix": job.matrix,
                "state": job.state.value,
                "attempt": job.attempt,
                "node": job.node,
                "seconds": seconds(job, now),
                "exit_code": job.exit_code,
                "reason": job.reason,
                "message": job.message,
                "approved_by": job.approved_by,
                "started_at": job.started_at.isoformat() if job.started_at else None,
                "finished_at": job.finished_at.isoformat() if job.finished_at else None,
                "attempts": [a.model_dump(mode="json") for a in job.history],
            }
            for job in run.jobs.values()
        ],
    }


def _duration(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.2f}s"
    return f"{int(value // 60)}m{int(value % 60):02d}s"


def print_run(view: dict[str, Any], console: Console) -> None:
    state = view["state"]
    console.print(
        Text.assemble(
            (f"run {view['run']}", "bold"),
            f"  pipeline {view['pipeline']}  ",
            (state, COLOURS.get(state, "white")),
            f"  round {view['round']}" if view["round"] > 1 else "",
            f"  by {view['requested_by']}" if view["requested_by"] else "",
        )
    )
    table = Table(box=None, pad_edge=False, show_edge=False)
    for column in ("", "job", "state", "try", "node", "time", "needs", "detail"):
        table.add_column(column)
    last = -1
    for job in view["jobs"]:
        if job["layer"] != last:
            if last >= 0:
                table.add_section()
            last = job["layer"]
        marker = "└─" if job["layer"] else "●"
        indent = "  " * max(0, job["layer"] - 1) + marker
        detail = job["message"] or job["reason"]
        if job["approved_by"]:
            detail = f"approved by {job['approved_by']}" + (f"; {detail}" if detail else "")
        needs = ", ".join(job["needs"]) if len(job["needs"]) <= 3 else f"{len(job['needs'])} jobs"
        table.add_row(
            indent,
            job["name"],
            Text(job["state"], style=COLOURS.get(job["state"], "white")),
            str(job["attempt"] or "-"),
            job["node"] or "-",
            _duration(job["seconds"]),
            needs or "-",
            detail,
        )
    console.print(table)
