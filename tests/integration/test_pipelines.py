"""Pipelines end to end: the pipeline worker and a real agent on a real nats-server, jobs as
real processes."""

from __future__ import annotations

import itertools
import json
import signal
from datetime import timedelta

import pytest
from pipeline_support import (
    at,
    collect_count,
    finished_run,
    finished_run_round,
    get_run,
    pipeline_host,
    read_logs,
    run_state,
    send,
    span,
    start_run,
)
from support import collect, eventually, process_gone

from corral.bus.pipelines import pipeline_store
from corral.schemas.pipeline import next_cron
from corral.schemas.runs import JobState, RunState
from corral.services.runner import Host, make_agent, make_worker
from corral.workers.pipeline.worker import PipelineWorker
from corral.workers.runtime import Context, Worker

pytestmark = pytest.mark.timeout(60)


async def test_dag_order(settings, bus) -> None:
    spec = {
        "name": "order",
        "jobs": {
            "build": {"stage": "build", "command": ["true"]},
            "unit": {"stage": "test", "command": ["true"]},
            "lint": {"stage": "test", "command": ["true"]},
            "ship": {"needs": ["unit"], "command": ["true"]},
        },
    }
    async with pipeline_host(settings):
        run_id = await start_run(bus, spec)
        run = await finished_run(bus, run_id)
    assert run.state == RunState.SUCCEEDED, run
    jobs = run.jobs
    assert all(j.state == JobState.SUCCEEDED for j in jobs.values())
    for name in ("unit", "lint"):
        assert span(jobs[name])[0] >= span(jobs["build"])[1]
    assert span(jobs["ship"])[0] >= span(jobs["unit"])[1]


async def test_parallel_jobs_overlap(settings, bus) -> None:
    spec = {
        "name": "wide",
        "jobs": {name: {"command": ["sleep", "0.5"], "needs": []} for name in ("a", "b", "c")},
    }
    async with pipeline_host(settings):
        run = await finished_run(bus, await start_run(bus, spec))
    assert run.state == RunState.SUCCEEDED
    spans = [span(run.jobs[n]) for n in ("a", "b", "c")]
    assert max(start for start, _ in spans) < min(end for _, end in spans), (
        "the three jobs did not run at the same time"
    )


async def test_retry_with_backoff_is_timed_in_events(settings, bus, tmp_path) -> None:
    counter = tmp_path / "tries"
    script = (
        f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; [ $n -ge 3 ]"
    )
    spec = {
        "name": "flaky",
        "jobs": {
            "try": {
                "script": [script],
                "retry": {"max": 3, "when": ["failure"], "backoff": {"initial": 0.3, "factor": 2}},
            }
        },
    }
    events = await collect(bus, f"{settings.prefix}.evt.job.*.retry_scheduled")
    async with pipeline_host(settings):
        run = await finished_run(bus, await start_run(bus, spec))
    await events.close()
    assert run.state == RunState.SUCCEEDED
    job = run.jobs["try"]
    assert job.attempt == 3
    delays = [json.loads(data)["retry_in"] for _, data in events]
    assert delays == [0.3, 0.6]
    first, second, third = job.history
    assert (at(second.dispatched_at) - at(first.finished_at)).total_seconds() >= 0.3
    assert (at(third.dispatched_at) - at(second.finished_at)).total_seconds() >= 0.6
    assert [a.retry_in for a in job.history] == [0.3, 0.6, None]


async def test_timeout_kills_the_job(settings, bus, tmp_path) -> None:
    pidfile = tmp_path / "pid"
    spec = {
        "name": "slow",
        "jobs": {"hang": {"script": [f"echo $$ > {pidfile}", "exec sleep 60"], "timeout": "1s"}},
    }
    async with pipeline_host(settings):
        run = await finished_run(bus, await start_run(bus, spec))
    job = run.jobs["hang"]
    assert run.state == RunState.FAILED
    assert job.reason == "timeout", job
    assert process_gone(int(pidfile.read_text()))


async def test_manual_approval_allowed_and_refused(settings, bus) -> None:
    spec = {
        "name": "gated",
        "jobs": {
            "build": {"command": ["true"]},
            "release": {
                "needs": ["build"],
                "command": ["true"],
                "when": "manual",
                "approvers": ["alice", "ops"],
            },
        },
    }
    needed = await collect(bus, f"{settings.prefix}.evt.run.*.approval_needed")
    async with pipeline_host(settings):
        run_id = await start_run(bus, spec)
        await eventually(lambda: needed, what="approval_needed")
        run = await get_run(bus, run_id)
        assert run.jobs["release"].state == JobState.MANUAL
        refused = {"job": "release", "user": "mallory"}
        ok, answer = await send(bus, "run", run_id, "approve", refused)
        assert not ok
        assert answer["reason"] == "mallory may not approve release: approvers are alice, ops"
        ok, answer = await send(
            bus, "run", run_id, "approve", {"job": "release", "user": "bob", "roles": ["ops"]}
        )
        assert ok, answer
        run = await finished_run(bus, run_id)
    await needed.close()
    assert run.state == RunState.SUCCEEDED
    assert run.jobs["release"].approved_by == "bob"
    assert json.loads(needed[0][1])["approvers"] == ["alice", "ops"]


ARTIFACT_SPEC = {
    "name": "arts",
    "jobs": {
        "make": {
            "script": ["mkdir -p out", "echo built-$CORRAL_RUN > out/thing.txt"],
            "artifacts": {"paths": ["out/"]},
        },
        "use": {"needs": ["make"], "script": ["cat out/thing.txt", "test -f out/thing.txt"]},
    },
}


async def test_artifacts_pass_between_jobs(settings, bus) -> None:
    async with pipeline_host(settings, nodes=("n1", "n2")):
        run_id = await start_run(bus, ARTIFACT_SPEC)
        run = await finished_run(bus, run_id)
        assert run.state == RunState.SUCCEEDED, run.jobs
        logs = await read_logs(bus, run_id, "use")
    assert logs == [f"built-{run_id}"]


async def test_cancel_stops_running_jobs(settings, bus, tmp_path) -> None:
    pidfile = tmp_path / "pid"
    spec = {
        "name": "long",
        "jobs": {
            "hang": {"script": [f"echo $$ > {pidfile}", "exec sleep 60"]},
            "after": {"needs": ["hang"], "command": ["true"]},
        },
    }
    async with pipeline_host(settings):
        run_id = await start_run(bus, spec)
        await eventually(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pid")
        pid = int(pidfile.read_text())
        ok, answer = await send(bus, "run", run_id, "cancel", {"requested_by": "carol"})
        assert ok, answer
        await eventually(lambda: process_gone(pid), what="the job's process to end")
        run = await get_run(bus, run_id)
    assert run.state == RunState.CANCELLED
    assert run.jobs["hang"].state == JobState.CANCELLED
    assert run.jobs["after"].state == JobState.CANCELLED


async def test_retry_reruns_only_failed_jobs_reusing_artifacts(settings, bus, tmp_path) -> None:
    switch = tmp_path / "broken"
    switch.write_text("yes")
    counter = tmp_path / "made"
    spec = {
        "name": "again",
        "jobs": {
            "make": {
                "script": [f"echo x >> {counter}", "mkdir -p out", "echo v1 > out/a.txt"],
                "artifacts": {"paths": ["out/a.txt"]},
            },
            "check": {"needs": ["make"], "script": [f"test ! -f {switch}", "cat out/a.txt"]},
            "ship": {"needs": ["check"], "command": ["true"]},
        },
    }
    async with pipeline_host(settings):
        run_id = await start_run(bus, spec)
        run = await finished_run(bus, run_id)
        assert run.state == RunState.FAILED
        assert run.jobs["check"].state == JobState.FAILED
        assert run.jobs["ship"].state == JobState.SKIPPED
        switch.unlink()
        ok, answer = await send(bus, "run", run_id, "retry", {})
        assert ok, answer
        run = await finished_run_round(bus, run_id, 2)
        logs = await read_logs(bus, run_id, "check")
    assert run.state == RunState.SUCCEEDED, run.jobs
    assert counter.read_text() == "x\n", "make ran again"
    assert run.jobs["make"].attempt == 1
    assert run.jobs["check"].attempt == 2
    assert logs[-1] == "v1"


async def test_resource_group_runs_one_job_at_a_time(settings, bus) -> None:
    def spec(name: str) -> dict:
        return {
            "name": name,
            "jobs": {
                "deploy": {"command": ["sleep", "0.4"], "resource_group": "prod"},
            },
        }

    async with pipeline_host(settings):
        ids = [await start_run(bus, spec(f"svc-{i}")) for i in range(3)]
        runs = [await finished_run(bus, run_id) for run_id in ids]
    spans = sorted(span(r.jobs["deploy"]) for r in runs)
    assert all(r.state == RunState.SUCCEEDED for r in runs)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, f"two jobs of the group overlapped: {spans}"


async def test_cycle_and_missing_need_are_rejected(settings, bus) -> None:
    cyclic = {
        "name": "loop",
        "jobs": {
            "a": {"needs": ["c"], "command": ["true"]},
            "b": {"needs": ["a"], "command": ["true"]},
            "c": {"needs": ["b"], "command": ["true"]},
        },
    }
    missing = {"name": "lost", "jobs": {"a": {"needs": ["nope"], "command": ["true"]}}}
    async with pipeline_host(settings):
        ok, answer = await send(bus, "pipeline", "loop", "run", {"spec": cyclic})
        assert not ok
        assert "cycle: a -> c -> b -> a" in json.dumps(answer), answer
        ok, answer = await send(bus, "pipeline", "lost", "run", {"spec": missing})
        assert not ok
        assert "job 'a' needs 'nope', which the pipeline does not define" in json.dumps(answer)
        ok, answer = await send(bus, "pipeline", "ghost", "run", {"spec": None})
        assert not ok
        assert answer["code"] == "not_found"


async def test_a_worker_restart_loses_nothing(settings, bus, tmp_path) -> None:
    """The worker stops while a job runs; the agent's report waits in the stream, and a new
    worker picks the run up where it was."""
    marker = tmp_path / "a-done"
    spec = {
        "name": "resume",
        "jobs": {
            "a": {"script": ["sleep 1", f"touch {marker}"]},
            "b": {"needs": ["a"], "command": ["true"]},
        },
    }

    def agent_only(ctx: Context) -> list[Worker]:
        return [make_agent(ctx, node_id="local", driver="process")]

    def worker_only(ctx: Context) -> list[Worker]:
        return [make_worker("pipeline", ctx)]

    async with Host(settings, agent_only):
        async with Host(settings, worker_only):
            run_id = await start_run(bus, spec)
            await eventually(lambda: run_state(bus, run_id, "a", JobState.RUNNING), what="a to run")
        await eventually(lambda: marker.exists(), what="a to finish while no worker runs")
        run = await get_run(bus, run_id)
        assert run.jobs["a"].state == JobState.RUNNING, "nobody has read the report yet"
        async with Host(settings, worker_only):
            run = await finished_run(bus, run_id)
    assert run.state == RunState.SUCCEEDED
    assert run.jobs["b"].state == JobState.SUCCEEDED


async def test_a_lost_node_retries_the_job_elsewhere(settings, bus, processes) -> None:
    spec = {
        "name": "lost",
        "jobs": {
            "long": {
                "command": ["sleep", "30"],
                "retry": {"max": 1, "when": ["node_lost"], "backoff": {"initial": 0}},
            }
        },
    }
    agent = processes.start("agent", "--node-id", "n1", name="agent-n1")
    async with pipeline_host(settings, nodes=("n2",)):
        await eventually(lambda: bus.buckets.nodes.get("n1"), what="node n1")
        run_id = await start_run(bus, spec)
        await eventually(
            lambda: run_state(bus, run_id, "long", JobState.RUNNING), what="the job to run"
        )
        run = await get_run(bus, run_id)
        assert run.jobs["long"].node == "n1"
        agent.send_signal(signal.SIGSTOP)
        try:

            async def moved() -> bool:
                job = (await get_run(bus, run_id)).jobs["long"]
                return job.node == "n2" and job.state == JobState.RUNNING

            await eventually(moved, within=25, what="the job to run again on n2")
        finally:
            agent.send_signal(signal.SIGCONT)
        run = await get_run(bus, run_id)
        ok, _ = await send(bus, "run", run_id, "cancel", {})
        assert ok
    first = run.jobs["long"].history[0]
    assert first.reason == "node_lost"
    assert "n1 stopped heartbeating" in first.message


async def test_cron_trigger_starts_a_stored_pipeline_once(settings, bus) -> None:
    spec = {
        "name": "nightly",
        "triggers": {"cron": "*/5 * * * *"},
        "jobs": {"job": {"command": ["true"]}},
    }
    async with pipeline_host(settings) as host:
        ok, answer = await send(bus, "pipeline", "nightly", "apply", {"spec": spec})
        assert ok, answer
        worker = host.workers[0]
        assert isinstance(worker, PipelineWorker)
        assert worker.cron is not None
        later = worker.cron.since + timedelta(minutes=5)
        due = next_cron("*/5 * * * *", worker.cron.since)
        await worker.cron.fire_due(later)
        worker.cron.since -= timedelta(minutes=5)  # a second copy that looks again
        await worker.cron.fire_due(later)
        run_id = f"nightly-cron-{due:%Y%m%d%H%M}"
        run = await finished_run(bus, run_id)
        store = await pipeline_store(bus)
        runs = await store.runs.items()
    assert run.state == RunState.SUCCEEDED
    assert run.trigger == "cron"
    assert list(runs) == [run_id]


async def test_an_agent_restart_reports_its_job_lost_and_the_retry_runs(
    settings, bus, tmp_path
) -> None:
    pidfile = tmp_path / "pid"
    spec = {
        "name": "bounce",
        "jobs": {
            "work": {
                "script": [f"echo $$ > {pidfile}", "sleep 30"],
                "retry": {"max": 1, "when": ["node_lost"], "backoff": {"initial": 0}},
            }
        },
    }

    def agent_only(ctx: Context) -> list[Worker]:
        return [make_agent(ctx, node_id="local", driver="process")]

    async with pipeline_host(settings, nodes=()):
        async with Host(settings, agent_only):
            run_id = await start_run(bus, spec)
            await eventually(lambda: pidfile.exists() and pidfile.read_text(), what="the job")
            first_pid = int(pidfile.read_text())
        assert process_gone(first_pid), "the agent's job stops with it"
        pidfile.unlink()
        async with Host(settings, agent_only):
            await eventually(lambda: pidfile.exists() and pidfile.read_text(), what="the retry")
            run = await get_run(bus, run_id)
            assert run.jobs["work"].attempt == 2
            assert run.jobs["work"].history[0].reason == "node_lost"
            ok, _ = await send(bus, "run", run_id, "cancel", {})
            assert ok


async def test_an_agent_killed_mid_job_loses_nothing(settings, bus, processes, tmp_path) -> None:
    pidfile = tmp_path / "pid"
    spec = {
        "name": "crash",
        "jobs": {
            "work": {
                "script": [f"echo $$ >> {pidfile}", "sleep 30"],
                "retry": {"max": 1, "when": ["node_lost"], "backoff": {"initial": 0}},
            }
        },
    }
    async with pipeline_host(settings, nodes=()):
        agent = processes.start("agent", "--node-id", "n1", name="agent-1")
        run_id = await start_run(bus, spec)
        await eventually(lambda: pidfile.exists() and pidfile.read_text(), what="the job")
        first = int(pidfile.read_text().split()[0])
        agent.kill()
        agent.wait()
        await eventually(lambda: process_gone(first), what="the job to die with its agent")
        processes.start("agent", "--node-id", "n1", name="agent-2")
        await eventually(
            lambda: len(pidfile.read_text().split()) == 2, within=20, what="the retry to start"
        )
        run = await get_run(bus, run_id)
        lost = run.jobs["work"].history[0]
        assert lost.reason == "node_lost"
        assert "agent restarted" in lost.message or "stopped heartbeating" in lost.message
        ok, _ = await send(bus, "run", run_id, "cancel", {})
        assert ok


async def test_two_copies_of_the_worker_run_each_job_once(settings, bus) -> None:
    jobs: dict[str, dict] = {}
    for level in range(4):
        for column in range(4):
            needs = [f"j{level - 1}-{c}" for c in range(4)] if level else []
            jobs[f"j{level}-{column}"] = {"command": ["true"], "needs": needs}
    async with pipeline_host(settings, workers=("pipeline", "pipeline")):
        ids = [await start_run(bus, {"name": f"twin-{i}", "jobs": jobs}) for i in range(3)]
        runs = [await finished_run(bus, run_id, within=30) for run_id in ids]
        dispatched = await collect_count(bus, settings.prefix)
    for run in runs:
        assert run.state == RunState.SUCCEEDED
        assert all(job.attempt == 1 for job in run.jobs.values())
    assert dispatched == 3 * 16, "each job was dispatched once"


async def test_a_command_with_the_longest_id_allowed_is_answered(settings, bus) -> None:
    """The answer's id is the command's plus `.accepted`; a 256-character command id must
    still give a valid answer, not a batch redelivered until JetStream gives up."""
    spec = {"name": "longid", "jobs": {"only": {"command": ["true"]}}}
    async with pipeline_host(settings):
        accepted, answer = await send(
            bus, "pipeline", "longid", "apply", {"spec": spec}, command_id="y" * 256
        )
    assert accepted, answer
