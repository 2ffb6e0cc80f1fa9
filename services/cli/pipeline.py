"""`corral pipeline ...`: run, store, watch, steer and read pipelines."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import ObjectNotFoundError
from rich.console import Console

from corral.bus.connection import Bus
from corral.bus.pipelines import PipelineStore, pipeline_store
from corral.schemas.errors import InvalidInput
from corral.schemas.runs import RunRecord, RunState
from corral.services.cli import render
from corral.services.cli.client import CliError, send_command
from corral.services.cli.pipeline_view import load_pipeline, print_run, run_view
from corral.services.cli.render import Output
from corral.workers.agent.artifacts import unpack

pipeline_app = typer.Typer(
    no_args_is_help=True, help="CI/CD pipelines: run, status, logs, approve, cancel, retry."
)
out = Console()
err = Console(stderr=True)
RUN_FAILED = 4
"""exit code of `run --wait` and `retry --wait` when the run failed or was cancelled"""


OutputOpt = Annotated[Output, typer.Option("-o", "--output", help="table, json or yaml")]
FileOpt = Annotated[
    str, typer.Option("-f", "--file", help="pipeline spec (YAML/JSON, - for stdin)")
]
WaitOpt = Annotated[bool, typer.Option("--wait", help="follow the run until it finishes")]


def _helpers() -> Any:
    # the helpers live in main, which imports this module: import them when called
    from corral.services.cli import main

    return main


def _me() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _variables(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--var {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


async def _command(bus: Bus, resource: str, name: str, verb: str, data: dict[str, Any]) -> Any:
    outcome = await send_command(
        bus, resource, name, verb, data, within=bus.settings.command_timeout
    )
    if not outcome.accepted:
        reason = outcome.data.get("reason", "rejected")
        for item in outcome.data.get("errors", []):
            reason += f"\n  {item.get('loc') or '(data)'}: {item.get('msg')}"
        code = 1 if outcome.data.get("code") in ("not_found", "rejected", "error") else 2
        raise CliError(f"rejected: {reason}", code=code)
    return outcome.data


async def _run_record(store: PipelineStore, run_id: str) -> RunRecord:
    found = await store.runs.get(run_id)
    if found is None:
        raise CliError(f"run {run_id!r} not found")
    return found.value


async def _follow(bus: Bus, run_id: str, output: Output, *, round_: int = 1) -> RunRecord:
    """Print each job's changes until the run (in this round) finishes."""
    store = await pipeline_store(bus)
    watcher = await store.runs.kv.watch(run_id)
    seen: dict[str, tuple[str, int]] = {}
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=5.0)
            except (TimeoutError, NatsTimeoutError):
                continue
            if entry is None or not entry.value:
                continue
            run = store.runs.decode(entry.value)
            if run.rounds < round_:
                continue
            for job in run.jobs.values():
                mark = (job.state.value, job.attempt)
                if seen.get(job.name) != mark and output == Output.table:
                    detail = job.message or job.reason
                    err.print(f"  {job.name:<24} {job.state.value:<10} {detail}")
                seen[job.name] = mark
            if run.finished:
                return run
    finally:
        await watcher.stop()


def _finish(run: RunRecord, output: Output) -> None:
    if output == Output.table:
        print_run(run_view(run), out)
    else:
        render.dump(run_view(run), output.value, out)
    if run.state != RunState.SUCCEEDED:
        raise typer.Exit(RUN_FAILED)


@pipeline_app.command("run")
def run(
    file: FileOpt,
    var: Annotated[list[str] | None, typer.Option("--var", help="KEY=VALUE, repeatable")] = None,
    wait: WaitOpt = False,
    output: OutputOpt = Output.table,
) -> None:
    """Start a run of a pipeline file (the spec is stored under its name too)."""
    main = _helpers()
    spec = main._run(_load(file))
    variables = main._run(_as_async(_variables, var or []))
    settings = main._settings()

    async def work(bus: Bus) -> RunRecord | str:
        data = await _command(
            bus,
            "pipeline",
            spec.name,
            "run",
            {
                "spec": spec.model_dump(mode="json", exclude_defaults=True),
                "variables": variables,
                "requested_by": _me(),
            },
        )
        run_id = str(data["run"])
        if not wait:
            return run_id
        err.print(f"run {run_id} started")
        return await _follow(bus, run_id, output)

    result = main._run(main._with_bus(settings, work))
    if isinstance(result, str):
        if output == Output.table:
            out.print(result)
        else:
            render.dump({"run": result}, output.value, out)
        return
    _finish(result, output)


@pipeline_app.command("apply")
def apply(file: FileOpt) -> None:
    """Store a pipeline without running it (its cron trigger starts runs)."""
    main = _helpers()
    spec = main._run(_load(file))
    settings = main._settings()

    async def work(bus: Bus) -> None:
        await _command(
            bus,
            "pipeline",
            spec.name,
            "apply",
            {"spec": spec.model_dump(mode="json", exclude_defaults=True), "requested_by": _me()},
        )

    main._run(main._with_bus(settings, work))
    cron = f" (cron {spec.triggers.cron})" if spec.triggers.cron else ""
    out.print(f"pipeline {spec.name} stored{cron}")


@pipeline_app.command("status")
def status(run_id: str, output: OutputOpt = Output.table) -> None:
    """Draw a run's DAG: every job's state, attempt, node and duration."""
    main = _helpers()
    settings = main._settings()

    async def work(bus: Bus) -> RunRecord:
        return await _run_record(await pipeline_store(bus), run_id)

    run = main._run(main._with_bus(settings, work))
    if output == Output.table:
        print_run(run_view(run), out)
    else:
        render.dump(run_view(run), output.value, out)


@pipeline_app.command("list")
def list_runs(
    pipeline: Annotated[str | None, typer.Argument(help="only this pipeline's runs")] = None,
    limit: Annotated[int, typer.Option("-n", help="newest runs shown")] = 20,
    output: OutputOpt = Output.table,
) -> None:
    """Recent runs (newest last) and the stored pipelines."""
    main = _helpers()
    settings = main._settings()

    async def work(bus: Bus) -> dict[str, Any]:
        store = await pipeline_store(bus)
        runs = [v.value for v in (await store.runs.items()).values()]
        runs = sorted(
            (r for r in runs if pipeline is None or r.pipeline == pipeline),
            key=lambda r: r.created_at,
        )[-limit:]
        specs = await store.specs.items()
        return {
            "pipelines": [
                {"name": name, "cron": v.value.spec.triggers.cron, "jobs": len(v.value.spec.jobs)}
                for name, v in sorted(specs.items())
            ],
            "runs": [
                {
                    "run": r.id,
                    "pipeline": r.pipeline,
                    "state": r.state.value,
                    "trigger": r.trigger,
                    "requested_by": r.requested_by,
                    "created_at": r.created_at.isoformat(),
                    "jobs": {
                        s: sum(1 for j in r.jobs.values() if j.state == s)
                        for s in {j.state.value for j in r.jobs.values()}
                    },
                }
                for r in runs
            ],
        }

    view = main._run(main._with_bus(settings, work))
    if output != Output.table:
        render.dump(view, output.value, out)
        return
    for item in view["pipelines"]:
        cron = f"  cron {item['cron']}" if item["cron"] else ""
        out.print(f"pipeline {item['name']}  {item['jobs']} jobs{cron}")
    for item in view["runs"]:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(item["jobs"].items()))
        out.print(f"{item['run']:<40} {item['state']:<10} {item['created_at'][:19]}  {counts}")


@pipeline_app.command("approve")
def approve(
    run_id: str,
    job: str,
    user: Annotated[str | None, typer.Option("--user", help="who approves (default: you)")] = None,
    role: Annotated[list[str] | None, typer.Option("--role", help="a role you act in")] = None,
) -> None:
    """Let a manual job go; only its approvers (users or roles) may."""
    main = _helpers()
    settings = main._settings()
    who = user or _me()

    async def work(bus: Bus) -> None:
        data = {"job": job, "user": who, "roles": role or []}
        await _command(bus, "run", run_id, "approve", data)

    main._run(main._with_bus(settings, work))
    out.print(f"{job} of run {run_id} approved by {who}")


@pipeline_app.command("cancel")
def cancel(run_id: str) -> None:
    """Cancel a run: running jobs get SIGTERM, then a kill after their grace."""
    main = _helpers()
    settings = main._settings()

    async def work(bus: Bus) -> None:
        await _command(bus, "run", run_id, "cancel", {"requested_by": _me()})

    main._run(main._with_bus(settings, work))
    out.print(f"run {run_id} cancelled")


@pipeline_app.command("retry")
def retry(run_id: str, wait: WaitOpt = False, output: OutputOpt = Output.table) -> None:
    """Run again the jobs that failed or never ran; succeeded jobs keep their artifacts."""
    main = _helpers()
    settings = main._settings()

    async def work(bus: Bus) -> RunRecord | None:
        data = await _command(bus, "run", run_id, "retry", {"requested_by": _me()})
        if not wait:
            return None
        return await _follow(bus, run_id, output, round_=int(data.get("round", 1)))

    result = main._run(main._with_bus(settings, work))
    if result is None:
        out.print(f"run {run_id} retrying")
        return
    _finish(result, output)


@pipeline_app.command("artifacts")
def artifacts(
    run_id: str,
    job: str,
    directory: Annotated[
        Path | None, typer.Option("-d", "--dir", help="where to unpack (default ./JOB)")
    ] = None,
) -> None:
    """Download a job's artifacts from the object store and unpack them."""
    main = _helpers()
    settings = main._settings()
    target = directory or Path(job)

    async def work(bus: Bus) -> int:
        store = await pipeline_store(bus)
        run = await _run_record(store, run_id)
        found = run.jobs.get(job)
        if found is None:
            raise CliError(f"run {run_id} has no job {job!r}; it has {', '.join(run.jobs)}")
        if not found.artifacts:
            raise CliError(f"{job} of run {run_id} has no artifacts (it is {found.state})")
        try:
            result = await store.artifacts.get(found.artifacts)
        except ObjectNotFoundError:
            raise CliError(f"the artifacts of {job} ({found.artifacts}) have expired") from None
        return unpack(result.data or b"", target)

    count = main._run(main._with_bus(settings, work))
    out.print(f"{count} file(s) of {job} in {target}")


@pipeline_app.command("logs")
def logs(
    run_id: str,
    job: Annotated[str | None, typer.Argument(help="one job (default: all)")] = None,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="until the run ends")] = False,
    whole: Annotated[
        bool, typer.Option("--whole", help="the uncut log of the job's last attempt")
    ] = False,
) -> None:
    """Job output from the log stream, oldest first; with -f, live until the run ends."""
    main = _helpers()
    settings = main._settings()

    async def work(bus: Bus) -> None:
        store = await pipeline_store(bus)
        run = await _run_record(store, run_id)
        if job is not None and job not in run.jobs:
            raise CliError(f"run {run_id} has no job {job!r}; it has {', '.join(run.jobs)}")
        if whole:
            if job is None:
                raise InvalidInput("--whole needs a JOB")
            await _print_whole(store, run_id, job, run.jobs[job].attempt)
            return
        await _print_logs(bus, store, run_id, job, follow)

    main._run(main._with_bus(settings, work))


async def _print_whole(store: PipelineStore, run_id: str, job: str, attempt: int) -> None:
    name = store.names.log_object(run_id, job, attempt)
    try:
        result = await store.artifacts.get(name)
    except ObjectNotFoundError:
        raise CliError(
            f"no stored log for attempt {attempt} of {job}: only logs of 1 MiB or more (or with "
            "a line over 16 KiB) are stored whole; the stream has all of this one"
        ) from None
    sys.stdout.buffer.write(result.data or b"")
    sys.stdout.flush()


async def _print_logs(
    bus: Bus, store: PipelineStore, run_id: str, job: str | None, follow: bool
) -> None:
    sub = await bus.js.subscribe(store.names.log(run_id, job or "*"), ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except (TimeoutError, NatsTimeoutError):
                if not follow or (await _run_record(store, run_id)).finished:
                    return
                continue
            headers = msg.headers or {}
            name = headers.get("corral-job", "")
            prefix = "" if job else f"[{name}] "
            if "corral-eof" in headers:
                if job is None:
                    err.print(
                        f"{prefix}(attempt {headers.get('corral-attempt')}: "
                        f"{headers['corral-eof']})",
                        markup=False,  # "[job]" is text here, not a rich tag
                        highlight=False,
                    )
            elif msg.data:
                for line in msg.data.decode(errors="replace").split("\n"):
                    print(f"{prefix}{line}", flush=True)
            if not follow and msg.metadata.num_pending == 0:
                return
    finally:
        await sub.unsubscribe()


async def _load(file: str) -> Any:
    return load_pipeline(file)


async def _as_async(function: Any, *args: Any) -> Any:
    return function(*args)
