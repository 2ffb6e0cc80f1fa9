"""`corral`: run Corral, and drive it."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from nats.errors import NoServersError
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from corral.bus.connection import Bus
from corral.bus.embedded import EmbeddedNatsError
from corral.bus.settings import Settings
from corral.bus.unreachable import NatsUnreachableError
from corral.schemas.errors import InvalidInput, field_errors_from_pydantic
from corral.schemas.spec import Resources
from corral.services.cli import client, render
from corral.services.cli.autoscale import autoscale_app
from corral.services.cli.explain import explain
from corral.services.cli.pipeline import pipeline_app
from corral.services.cli.rebalance import rebalance
from corral.services.cli.render import Output
from corral.services.cli.rules import rules_app
from corral.services.cli.schema import export_schemas
from corral.services.cli.sim import sim
from corral.services.cli.specs import describe, load_service_spec
from corral.services.interrupts import Interrupted
from corral.workers import NAMES as WORKERS

if TYPE_CHECKING:
    import socket

    from corral.services.gateway.config import GatewayConfig

app = typer.Typer(
    name="corral",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Event-driven orchestration on NATS JetStream.",
)
schema_app = typer.Typer(no_args_is_help=True, help="JSON Schema of specs, commands and events.")
app.add_typer(schema_app, name="schema")
app.add_typer(autoscale_app, name="autoscale")
app.command("explain")(explain)
app.command("rebalance")(rebalance)
app.command("sim")(sim)
app.add_typer(rules_app, name="rules")
app.add_typer(pipeline_app, name="pipeline")
out = Console()
err = Console(stderr=True)
T = TypeVar("T")


OutputOpt = Annotated[Output, typer.Option("-o", "--output", help="table, json or yaml")]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="state directory (default ./.corral)")
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="seconds to wait")]


def _settings(data_dir: Path | None = None, **extra: Any) -> Settings:
    try:
        overrides = {k: v for k, v in extra.items() if v is not None}
        if data_dir is not None:
            overrides["data_dir"] = data_dir
        return Settings(**overrides)
    except ValidationError as exc:
        for line in describe(field_errors_from_pydantic(exc)):
            err.print(f"[red]invalid setting[/red]{line}")
        raise typer.Exit(2) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; turn every expected failure into a message and an exit code."""
    try:
        return asyncio.run(coro)
    except client.CliError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(exc.code) from None
    except InvalidInput as exc:
        err.print(f"[red]error:[/red] {exc.reason}")
        for line in describe(exc.errors):
            err.print(line)
        raise typer.Exit(2) from None
    except NatsUnreachableError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except Interrupted as exc:
        err.print(escape(str(exc)), highlight=False)
        raise typer.Exit(exc.code) from None
    except (NoServersError, ConnectionRefusedError, OSError) as exc:
        err.print(
            f"[red]error:[/red] cannot reach NATS ({exc.__class__.__name__}: {exc}). "
            "Is `corral up` running, or CORRAL_NATS_URL set?"
        )
        raise typer.Exit(1) from None
    except EmbeddedNatsError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


CLI_CONNECT_TIMEOUT = 10.0
"""how long a short command waits for NATS unless CORRAL_CONNECT_TIMEOUT says: someone is
waiting at a terminal, where a worker's 30 s would feel like a hang"""


def _cli_connect_timeout(settings: Settings) -> float:
    if "connect_timeout" in settings.model_fields_set:
        return settings.connect_timeout
    return min(settings.connect_timeout, CLI_CONNECT_TIMEOUT)


async def _with_bus(settings: Settings, work: Callable[[Bus], Awaitable[T]]) -> T:
    bus = await Bus.connect(settings, name="corral-cli", within=_cli_connect_timeout(settings))
    try:
        return await work(bus)
    finally:
        await bus.close()


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# running ------------------------------------------------------------------------------------
GatewayPortOpt = Annotated[
    int | None,
    typer.Option(
        "--gateway-port", help="the HTTP gateway's port (default 8080); 0 picks a free one"
    ),
]
InsecureLocalOpt = Annotated[
    bool,
    typer.Option(
        "--insecure-local",
        help="with no API tokens configured, let every caller use the gateway as admin "
        "(only on a loopback address)",
    ),
]


def _gateway_setup(settings: Settings, insecure_local: bool) -> tuple[GatewayConfig, socket.socket]:
    """The gateway's config and its listening socket, bound before anything starts so that a
    taken port is reported at once; exits with a message on a bad configuration."""
    from corral.services.gateway.config import GatewayConfig, GatewayConfigError
    from corral.services.gateway.worker import GatewayBindError, bind_socket, is_loopback

    if insecure_local and not is_loopback(settings.gateway_host):
        err.print(
            f"[red]error:[/red] --insecure-local needs a loopback address, and the gateway "
            f"would listen on {settings.gateway_host} (CORRAL_GATEWAY_HOST)"
        )
        raise typer.Exit(2)
    try:
        config = GatewayConfig.from_env(insecure_local=insecure_local)
    except GatewayConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    try:
        sock = bind_socket(settings.gateway_host, settings.gateway_port)
    except GatewayBindError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    return config, sock


def _gateway_note(gateway: Any) -> str:
    config = gateway.config
    if config.tokens:
        auth = f"{len(config.tokens)} API token(s)"
    elif config.open_locally:
        auth = "[yellow]no tokens: every local caller is admin (--insecure-local)[/yellow]"
    else:
        auth = "no API tokens: API calls get 401 until CORRAL_GATEWAY_TOKENS is set"
    platforms = (("slack", config.chat.slack_secret), ("mattermost", config.chat.mattermost_tokens))
    chat = [name for name, on in platforms if on]
    if chat:
        auth += f"; chat-ops: {', '.join(chat)}"
    return f"gateway: {gateway.url} ({auth})"


@app.command()
def up(
    data_dir: DataDirOpt = None,
    port: Annotated[int | None, typer.Option(help="NATS port; 0 picks a free one")] = None,
    node_id: Annotated[str | None, typer.Option("--node-id", help="the local node's id")] = None,
    agent: Annotated[bool, typer.Option(help="run a local node agent (process driver)")] = True,
    gateway: Annotated[bool, typer.Option(help="run the HTTP gateway and webhooks")] = True,
    gateway_port: GatewayPortOpt = None,
    insecure_local: InsecureLocalOpt = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "warning",
) -> None:
    """Start NATS (embedded unless CORRAL_NATS_URL is set), every worker, a local agent and
    the HTTP gateway."""
    from corral.services.runner import make_agent, make_worker, serve

    _logging(log_level)
    settings = _settings(data_dir, nats_port=port, node_id=node_id, gateway_port=gateway_port)
    setup = _gateway_setup(settings, insecure_local) if gateway else None
    hosted: list[Any] = []

    def build(ctx: Any) -> list[Any]:
        workers = [make_worker(name, ctx) for name in WORKERS]
        if agent:
            workers.append(make_agent(ctx, node_id=settings.node_id))
        if setup is not None:
            from corral.services.gateway.worker import GatewayWorker

            hosted.append(GatewayWorker(ctx, setup[0], sock=setup[1]))
            workers.extend(hosted)
        return workers

    def ready(url: str) -> None:
        out.print(f"NATS: {url}")
        out.print(f"data: {settings.data_dir.resolve()}")
        if hosted:
            out.print(_gateway_note(hosted[0]))
        names = ", ".join([*WORKERS, f"agent {settings.node_id}" if agent else ""]).strip(", ")
        out.print(f"[green]Corral is ready[/green] (workers: {names}). Ctrl-C stops it.")

    try:
        _run(serve(settings, build, embedded=True, on_ready=ready))
    finally:
        if setup is not None:
            setup[1].close()
    out.print("Corral stopped.")


@app.command("gateway")
def gateway_cmd(
    host: Annotated[
        str | None, typer.Option(help="the address to listen on (default 127.0.0.1)")
    ] = None,
    gateway_port: Annotated[
        int | None, typer.Option("--port", help="the port (default 8080); 0 picks a free one")
    ] = None,
    insecure_local: InsecureLocalOpt = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run the HTTP gateway and webhooks alone, against CORRAL_NATS_URL (or the NATS a local
    `corral up` started)."""
    from corral.services.gateway.worker import GatewayWorker
    from corral.services.runner import serve

    _logging(log_level)
    settings = _settings(gateway_host=host, gateway_port=gateway_port)
    config, sock = _gateway_setup(settings, insecure_local)
    hosted: list[Any] = []

    def build(ctx: Any) -> list[Any]:
        hosted.append(GatewayWorker(ctx, config, sock=sock))
        return hosted

    try:
        _run(
            serve(
                settings,
                build,
                on_ready=lambda url: err.print(f"{_gateway_note(hosted[0])}, NATS {url}"),
            )
        )
    finally:
        sock.close()


@app.command()
def worker(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(WORKERS)}")],
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run one worker against CORRAL_NATS_URL (or the NATS a local `corral up` started)."""
    from corral.services.runner import make_worker, serve

    if name not in WORKERS:
        err.print(f"[red]error:[/red] unknown worker {name!r}; choose from {', '.join(WORKERS)}")
        raise typer.Exit(2)
    _logging(log_level)
    settings = _settings()
    _run(
        serve(
            settings,
            lambda ctx: [make_worker(name, ctx)],
            on_ready=lambda url: err.print(f"worker {name} ready on {url}"),
        )
    )


def _parse_pairs(text: str | None, what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{what} must look like key=value[,key=value], got {part!r}")
        pairs[key.strip()] = value.strip()
    return pairs


@app.command("agent")
def agent_cmd(
    node_id: Annotated[str | None, typer.Option("--node-id")] = None,
    driver: Annotated[str, typer.Option(help="process or fake")] = "process",
    capacity: Annotated[
        str | None, typer.Option(help="cpu=4,memory=8Gi[,gpu=1]; default: this machine")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="key=value; repeatable")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run a node agent. `--driver fake` simulates a node that runs nothing."""
    from corral.services.runner import make_agent, serve

    if driver not in ("process", "fake"):
        err.print(f"[red]error:[/red] unknown driver {driver!r}; use process or fake")
        raise typer.Exit(2)
    _logging(log_level)
    settings = _settings(node_id=node_id)
    labels: dict[str, str] = {}
    for item in label or []:
        labels.update(_parse_pairs(item, "--label"))
    resources: Resources | None = None
    if capacity:
        try:
            resources = Resources.model_validate(_parse_pairs(capacity, "--capacity"))
        except ValidationError as exc:
            for line in describe(field_errors_from_pydantic(exc)):
                err.print(f"[red]invalid --capacity[/red]{line}")
            raise typer.Exit(2) from None
    _run(
        serve(
            settings,
            lambda ctx: [
                make_agent(
                    ctx, node_id=settings.node_id, driver=driver, capacity=resources, labels=labels
                )
            ],
            on_ready=lambda url: err.print(f"agent {settings.node_id} ({driver}) ready on {url}"),
        )
    )


# commands ----------------------------------------------------------------------------------
def _outcome_or_exit(outcome: client.Outcome) -> dict[str, Any]:
    data = outcome.data
    if not outcome.accepted:
        err.print(f"[red]rejected:[/red] {data.get('reason')}")
        for item in data.get("errors", []):
            err.print(f"  {item.get('loc') or '(data)'}: {item.get('msg')}")
        raise client.CliError("command rejected", code=1)
    return data


ROLLED_BACK = 4
"""exit code of deploy when its rollout failed (and, by default, was rolled back)"""


async def _wait_converged(
    bus: Bus,
    name: str,
    within: float,
    show: bool,
    *,
    gone: bool = False,
    revision: int | None = None,
    command_id: str | None = None,
) -> client.ServiceView | None:
    """Wait until the service runs as desired (or is gone). With `revision`, fail with exit
    code 4 as soon as that revision's rollout fails or is rolled back."""
    deadline = time.monotonic() + within
    view: client.ServiceView | None = None
    initial = 0
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        disable=not show,
        transient=False,
    ) as progress:
        task = progress.add_task(name, total=None)
        while True:
            views = await client.service_views(bus, name)
            view = views[0] if views else None
            if gone:
                remaining = len(view.assignments) if view else 0
                initial = max(initial or remaining, remaining)
                progress.update(
                    task,
                    description=f"{name}: stopping",
                    total=initial,
                    completed=initial - remaining,
                )
                if view is None or view.gone:
                    return None
            elif view is not None:
                failure = view.rollout_failure(revision) if revision is not None else ""
                if failure:
                    if command_id:
                        failure += f"; `corral events --trace {command_id}` shows the chain"
                    raise client.CliError(failure, code=ROLLED_BACK)
                note = view.state
                if view.status and view.status.pending:
                    note = f"{view.status.pending} pending: {view.status.reason}"
                elif view.status and view.status.rollout and view.status.rollout.reason:
                    note = f"{view.state}: {view.status.rollout.reason}"
                progress.update(
                    task, total=view.desired, completed=view.ready, description=f"{name}: {note}"
                )
                if view.converged:
                    return view
            if time.monotonic() >= deadline:
                why = ""
                if view is not None and view.status is not None and view.status.reason:
                    why = f" ({view.status.reason})"
                raise client.CliError(f"{name} did not converge within {within:.0f}s{why}")
            await asyncio.sleep(0.2)


@app.command()
def deploy(
    file: Annotated[
        str, typer.Option("-f", "--file", help="service spec (YAML/JSON, - for stdin)")
    ],
    wait: Annotated[bool, typer.Option(help="wait until every replica runs")] = True,
    timeout: TimeoutOpt = 120.0,
    output: OutputOpt = Output.table,
) -> None:
    """Create or update a service from a spec file."""
    spec = _run(_load(file))
    settings = _settings()

    async def work(bus: Bus) -> None:
        outcome = await client.send_command(
            bus,
            "service",
            spec.name,
            "deploy",
            spec.model_dump(mode="json"),
            within=settings.command_timeout,
        )
        data = _outcome_or_exit(outcome)
        if output == Output.table:
            change = "unchanged" if not data.get("changed", True) else "accepted"
            err.print(
                f"{spec.name}: {change}, generation {data.get('generation')}"
                f" (command {outcome.event.correlation})"
            )
        revision = await _revision_of(bus, spec.name, int(data.get("generation") or 0))
        view = (
            await _wait_converged(
                bus,
                spec.name,
                timeout,
                output == Output.table,
                revision=revision,
                command_id=outcome.event.correlation,
            )
            if wait
            else None
        )
        if output != Output.table:
            render.dump(
                {"command": data, "service": view.as_dict() if view else None}, output.value, out
            )
        elif view is not None:
            out.print(f"{spec.name}: {view.ready}/{view.desired} replicas ready")

    _run(_with_bus(settings, work))


async def _revision_of(bus: Bus, name: str, generation: int) -> int | None:
    """The revision the accepted command produced, if the record still shows it."""
    item = await bus.buckets.services.get(name)
    if item is None or item.value.generation != generation:
        return None
    return item.value.revision


async def _load(file: str) -> Any:
    return load_service_spec(file)


@app.command()
def scale(
    name: str,
    replicas: Annotated[int, typer.Argument(min=0)],
    wait: Annotated[bool, typer.Option(help="wait until the count is reached")] = True,
    timeout: TimeoutOpt = 120.0,
) -> None:
    """Set a service's replica count."""
    settings = _settings()

    async def work(bus: Bus) -> None:
        outcome = await client.send_command(
            bus, "service", name, "scale", {"replicas": replicas}, within=settings.command_timeout
        )
        data = _outcome_or_exit(outcome)
        err.print(f"{name}: scale to {replicas} accepted, generation {data.get('generation')}")
        if wait:
            view = await _wait_converged(bus, name, timeout, True)
            assert view is not None
            out.print(f"{name}: {view.ready}/{view.desired} replicas ready")

    _run(_with_bus(settings, work))


@app.command()
def delete(
    name: str,
    wait: Annotated[bool, typer.Option(help="wait until every replica has stopped")] = True,
    timeout: TimeoutOpt = 120.0,
) -> None:
    """Stop every replica of a service and remove it."""
    settings = _settings()

    async def work(bus: Bus) -> None:
        outcome = await client.send_command(
            bus, "service", name, "delete", {}, within=settings.command_timeout
        )
        _outcome_or_exit(outcome)
        err.print(f"{name}: delete accepted")
        if wait:
            await _wait_converged(bus, name, timeout, True, gone=True)
            out.print(f"{name}: deleted")

    _run(_with_bus(settings, work))


@app.command()
def rollback(
    name: str,
    to: Annotated[
        int | None, typer.Option("--to", help="the revision to go back to (default: previous)")
    ] = None,
    wait: Annotated[bool, typer.Option(help="wait until the rollback has rolled out")] = True,
    timeout: TimeoutOpt = 300.0,
) -> None:
    """Roll a service back to an earlier revision (see `corral history`), or end a canary."""
    settings = _settings()

    async def work(bus: Bus) -> None:
        outcome = await client.send_command(
            bus,
            "service",
            name,
            "rollback",
            {"to_revision": to} if to is not None else {},
            within=settings.command_timeout,
        )
        data = _outcome_or_exit(outcome)
        revision = await _revision_of(bus, name, int(data.get("generation") or 0))
        if not data.get("changed", True):
            err.print(f"{name}: already at that revision; nothing to do")
            return
        err.print(f"{name}: rolling back, now revision {revision}")
        if wait:
            view = await _wait_converged(bus, name, timeout, True, revision=revision)
            assert view is not None
            out.print(f"{name}: {view.ready}/{view.desired} replicas ready at revision {revision}")

    _run(_with_bus(settings, work))


@app.command()
def promote(
    name: str,
    wait: Annotated[bool, typer.Option(help="wait until the rollout completes")] = True,
    timeout: TimeoutOpt = 300.0,
) -> None:
    """Promote a waiting canary: roll its revision out to every replica."""
    settings = _settings()

    async def work(bus: Bus) -> None:
        outcome = await client.send_command(
            bus, "service", name, "promote", {}, within=settings.command_timeout
        )
        data = _outcome_or_exit(outcome)
        revision = await _revision_of(bus, name, int(data.get("generation") or 0))
        err.print(f"{name}: canary promoted; rolling out revision {revision}")
        if wait:
            view = await _wait_converged(bus, name, timeout, True, revision=revision)
            assert view is not None
            out.print(f"{name}: {view.ready}/{view.desired} replicas ready")

    _run(_with_bus(settings, work))


@app.command()
def history(name: str, output: OutputOpt = Output.table) -> None:
    """List a service's revisions, newest last."""
    settings = _settings()

    async def work(bus: Bus) -> list[dict[str, Any]]:
        item = await bus.buckets.services.get(name)
        if item is None or item.value.deleted:
            raise client.CliError(f"service {name!r} not found")
        record = item.value
        return [
            {
                "revision": r.revision,
                "current": r.revision == record.revision,
                "cause": r.cause,
                "created_at": r.created_at.isoformat(),
                "command_id": r.command_id,
                "image": r.spec.image,
                "command": r.spec.command,
            }
            for r in record.revisions
        ]

    rows = _run(_with_bus(settings, work))
    if output == Output.table:
        out.print(render.history_table(rows))
    else:
        render.dump({"name": name, "revisions": rows}, output.value, out)


# reading -----------------------------------------------------------------------------------
@app.command()
def status(
    name: Annotated[str | None, typer.Argument()] = None, output: OutputOpt = Output.table
) -> None:
    """Show services, their replicas and where they run."""
    settings = _settings()

    async def work(bus: Bus) -> list[dict[str, Any]]:
        return [view.as_dict() for view in await client.service_views(bus, name)]

    services = _run(_with_bus(settings, work))
    if name is not None and not services:
        err.print(f"[red]error:[/red] service {name!r} not found")
        raise typer.Exit(1)
    if output == Output.table:
        if not services:
            out.print("no services")
        else:
            out.print(render.services_table(services))
    else:
        render.dump({"services": services}, output.value, out)


@app.command()
def nodes(output: OutputOpt = Output.table) -> None:
    """Show the nodes, their capacity and what is allocated on them."""
    settings = _settings()
    found = _run(_with_bus(settings, client.node_views))
    if output == Output.table:
        out.print(render.nodes_table(found) if found else "no nodes")
    else:
        render.dump({"nodes": found}, output.value, out)


@app.command()
def events(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new events")
    ] = False,
    trace: Annotated[
        str | None, typer.Option("--trace", help="every event a command caused")
    ] = None,
    type_glob: Annotated[
        str | None, typer.Option("--type", help="filter, e.g. '*.rejected'")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="past events to show")] = 20,
    output: OutputOpt = Output.table,
) -> None:
    """Show events, one per line (`-o json`: one structured CloudEvent per line)."""
    settings = _settings()

    def show(event: Any) -> None:
        if (
            type_glob
            and not fnmatch.fnmatch(event.type, type_glob)
            and not fnmatch.fnmatch(event.type.removeprefix("io.corral."), type_glob)
        ):
            return
        if output == Output.table:
            print(render.event_line(event), flush=True)
        else:
            print(client.event_json(event), flush=True)

    async def work(bus: Bus) -> None:
        if trace:
            command = await client.find_command(bus, trace)
            found = 0
            if command is not None:
                show(command)
                found += 1
            async for event in client.read_events(bus, follow=False, from_start=True):
                chain = event.correlation or ""
                # commands a worker sent because of this one carry ids `<id>.<what>`
                if chain == trace or chain.startswith(f"{trace}.") or event.id == trace:
                    show(event)
                    found += 1
            if not found:
                raise client.CliError(f"no command or event with id {trace!r}")
            return
        async for event in client.read_events(bus, follow=follow, limit=limit):
            show(event)

    _run(_with_bus(settings, work))


@schema_app.command("export")
def schema_export(directory: Path) -> None:
    """Write the JSON Schema of every spec, command and event into DIRECTORY."""
    written = export_schemas(directory)
    for path in written:
        out.print(str(path))


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.stderr.close()


if __name__ == "__main__":
    main()
