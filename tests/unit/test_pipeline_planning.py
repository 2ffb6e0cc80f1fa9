"""The pipeline's deciding: dispatch the moment needs succeed, when-conditions, retries with
backoff, timeouts and lost nodes, approvals, cancel and retry, resource groups, and the
assignment an agent is handed. Pure: no bus, no clock but the one passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from corral.schemas.errors import NotFound, RejectedError
from corral.schemas.pipeline import PipelineSpec
from corral.schemas.runs import JobReport, JobState, RunRecord, RunState
from corral.schemas.spec import ServiceSpec
from corral.schemas.state import (
    Rollout,
    RolloutState,
    ServiceRecord,
    ServiceStatus,
)
from corral.workers.pipeline import dag
from corral.workers.pipeline.assigning import assignment_for, deploy_progress
from corral.workers.pipeline.planning import DeployProgress, Plan, View, decide

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make_run(jobs: dict[str, Any], **extra: Any) -> RunRecord:
    spec = PipelineSpec.model_validate({"name": "p", "jobs": jobs, **extra})
    return dag.new_run("p-1", spec, {}, T0)


def view(at: float = 0, nodes: dict[str, tuple[str, ...]] | None = None, **kw: Any) -> View:
    return View(
        now=T0 + timedelta(seconds=at),
        nodes={"n1": ("process",)} if nodes is None else nodes,
        **kw,
    )


def dispatched(plan: Plan) -> list[str]:
    return [d.job for d in plan.dispatch]


def finish(
    run: RunRecord,
    job: str,
    *,
    ok: bool = True,
    reason: str = "failure",
    code: int = 1,
    at: float = 1,
    **kw: Any,
) -> Plan:
    attempt = run.jobs[job].attempt
    started = JobReport(
        run=run.id, job=job, attempt=attempt, node="n1", started_at=T0 + timedelta(seconds=at - 0.5)
    )
    done = started.model_copy(
        update={
            "outcome": "succeeded" if ok else "failed",
            "reason": "" if ok else reason,
            "exit_code": 0 if ok else code,
            "finished_at": T0 + timedelta(seconds=at),
            **kw,
        }
    )
    return decide(run, view(at), [started, done])


def test_first_jobs_dispatch_at_once_and_needs_wait() -> None:
    run = make_run({"a": {"command": ["x"]}, "b": {"needs": ["a"], "command": ["x"]}})
    plan = decide(run, view())
    assert dispatched(plan) == ["a"]
    run = plan.run
    assert run.jobs["a"].state == JobState.DISPATCHED
    assert run.jobs["a"].attempt == 1
    assert run.jobs["b"].state == JobState.PENDING
    plan = finish(run, "a")
    assert plan.run.jobs["a"].state == JobState.SUCCEEDED
    assert dispatched(plan) == ["b"], "b goes in the same decision that saw a succeed"
    assert [r.job for r in plan.revoke] == ["a"]


def test_stages_wait_for_the_whole_previous_stage() -> None:
    run = make_run(
        {
            "a": {"stage": "one", "command": ["x"]},
            "b": {"stage": "one", "command": ["x"]},
            "c": {"stage": "two", "command": ["x"]},
        }
    )
    run = decide(run, view()).run
    plan = finish(run, "a")
    assert dispatched(plan) == []
    plan = finish(plan.run, "b", at=2)
    assert dispatched(plan) == ["c"]


def test_jobs_spread_over_nodes_by_load() -> None:
    run = make_run({n: {"command": ["x"]} for n in ("a", "b", "c", "d")})
    plan = decide(run, view(nodes={"n1": ("process",), "n2": ("process",)}, load={"n1": 1}))
    assert [d.node for d in plan.dispatch] == ["n2", "n1", "n2", "n1"]


def test_image_jobs_only_go_to_docker_nodes() -> None:
    run = make_run({"a": {"command": ["x"], "image": "alpine"}})
    plan = decide(run, view(nodes={"n1": ("process",)}))
    assert dispatched(plan) == []
    assert plan.run.jobs["a"].message == "no live node offers the docker driver"
    plan = decide(run, view(nodes={"n1": ("process",), "n2": ("process", "docker")}))
    assert [(d.job, d.node) for d in plan.dispatch] == [("a", "n2")]


def test_failure_skips_on_success_and_runs_on_failure_and_always() -> None:
    run = make_run(
        {
            "a": {"command": ["x"]},
            "next": {"needs": ["a"], "command": ["x"]},
            "after-next": {"needs": ["next"], "command": ["x"]},
            "cleanup": {"needs": ["a"], "command": ["x"], "when": "always"},
            "alert": {"needs": ["a"], "command": ["x"], "when": "on_failure"},
        }
    )
    run = decide(run, view()).run
    plan = finish(run, "a", ok=False)
    jobs = plan.run.jobs
    assert jobs["a"].state == JobState.FAILED
    assert jobs["next"].state == JobState.SKIPPED
    assert jobs["after-next"].state == JobState.SKIPPED, "skips propagate down the graph"
    assert sorted(dispatched(plan)) == ["alert", "cleanup"]


def test_on_failure_job_is_skipped_when_all_is_well_and_does_not_fail_the_run() -> None:
    run = make_run(
        {
            "a": {"stage": "one", "command": ["x"]},
            "alert": {"stage": "two", "command": ["x"], "when": "on_failure"},
            "ship": {"stage": "three", "command": ["x"]},
        }
    )
    run = decide(run, view()).run
    plan = finish(run, "a")
    assert plan.run.jobs["alert"].state == JobState.SKIPPED
    assert dispatched(plan) == ["ship"], "a skipped on_failure job is no failure"
    plan = finish(plan.run, "ship", at=2)
    assert plan.run.state == RunState.SUCCEEDED
    assert ("run", "succeeded") in [(r, w) for r, w, _ in plan.events]


def test_retry_with_backoff_then_success() -> None:
    run = make_run(
        {"a": {"command": ["x"], "retry": {"max": 2, "backoff": {"initial": 2, "factor": 3}}}}
    )
    run = decide(run, view()).run
    plan = finish(run, "a", ok=False, at=1)
    job = plan.run.jobs["a"]
    assert job.state == JobState.SCHEDULED
    assert job.not_before == T0 + timedelta(seconds=3)
    assert plan.wake_at == job.not_before
    assert [(w, d.retry_in) for r, w, d in plan.events if r == "job"] == [  # type: ignore[attr-defined]
        ("retry_scheduled", 2.0)
    ]
    assert dispatched(decide(plan.run, view(2.9))) == []
    plan = decide(plan.run, view(3))
    assert dispatched(plan) == ["a"]
    assert plan.run.jobs["a"].attempt == 2
    plan = finish(plan.run, "a", ok=False, at=4)
    assert plan.run.jobs["a"].not_before == T0 + timedelta(seconds=4 + 6)
    plan = decide(plan.run, view(10))
    plan = finish(plan.run, "a", ok=False, at=11)
    assert plan.run.jobs["a"].state == JobState.FAILED, "two retries, then it fails"
    assert [a.retry_in for a in plan.run.jobs["a"].history] == [2.0, 6.0, None]
    assert plan.run.state == RunState.FAILED
    failed = [d for r, w, d in plan.events if (r, w) == ("run", "failed")]
    assert failed[0].jobs[0].job == "a"  # type: ignore[attr-defined]


def test_retry_only_for_listed_reasons_and_exit_codes() -> None:
    jobs = {"a": {"command": ["x"], "retry": {"max": 1, "when": ["timeout", 75]}}}
    run = decide(make_run(jobs), view()).run
    assert finish(run, "a", ok=False, code=1).run.jobs["a"].state == JobState.FAILED
    assert finish(run, "a", ok=False, code=75).run.jobs["a"].state == JobState.SCHEDULED
    timed_out = finish(run, "a", ok=False, reason="timeout", code=143)
    assert timed_out.run.jobs["a"].state == JobState.SCHEDULED
    lost = finish(run, "a", ok=False, reason="node_lost")
    assert lost.run.jobs["a"].state == JobState.FAILED
    assert lost.run.jobs["a"].reason == "node_lost"


def test_a_lost_node_fails_or_retries_its_job() -> None:
    run = decide(make_run({"a": {"command": ["x"]}}), view()).run
    plan = decide(run, view(5, nodes={}))
    assert plan.run.jobs["a"].state == JobState.FAILED
    assert plan.run.jobs["a"].reason == "node_lost"
    jobs = {
        "a": {
            "command": ["x"],
            "retry": {"max": 1, "when": ["node_lost"], "backoff": {"initial": 0}},
        }
    }
    run = decide(make_run(jobs), view()).run
    plan = decide(run, view(5, nodes={"n2": ("process",)}))
    assert plan.run.jobs["a"].node == "n2", "retried at once, on a live node"
    assert plan.run.jobs["a"].attempt == 2


def test_reports_of_old_attempts_are_ignored() -> None:
    jobs = {"a": {"command": ["x"], "retry": {"max": 1, "backoff": {"initial": 0}}}}
    run = decide(make_run(jobs), view()).run
    run = finish(run, "a", ok=False).run
    assert run.jobs["a"].attempt == 2
    stale = JobReport(run="p-1", job="a", attempt=1, node="n1", outcome="succeeded")
    assert decide(run, view(2), [stale]).run.jobs["a"].state == JobState.DISPATCHED


def test_manual_job_waits_for_an_approver() -> None:
    run = make_run(
        {
            "a": {"command": ["x"]},
            "go": {"needs": ["a"], "command": ["x"], "when": "manual", "approvers": ["al", "ops"]},
        }
    )
    run = decide(run, view()).run
    plan = finish(run, "a")
    assert plan.run.jobs["go"].state == JobState.MANUAL
    assert [(r, w) for r, w, _ in plan.events][-1] == ("run", "approval_needed")
    assert plan.run.state == RunState.RUNNING
    with pytest.raises(RejectedError, match="eve may not approve go: approvers are al, ops"):
        dag.approve(plan.run, "go", "eve", ["dev"], T0)
    with pytest.raises(NotFound):
        dag.approve(plan.run, "nope", "al", [], T0)
    approved = dag.approve(plan.run, "go", "bo", ["ops"], T0)
    assert approved.jobs["go"].approved_by == "bo"
    with pytest.raises(RejectedError, match="already been approved"):
        dag.approve(approved, "go", "al", [], T0)
    assert dispatched(decide(approved, view(2))) == ["go"]


def test_cancel_and_retry() -> None:
    run = make_run(
        {
            "make": {"command": ["x"], "artifacts": {"paths": ["out"]}},
            "check": {"needs": ["make"], "command": ["x"]},
            "ship": {"needs": ["check"], "command": ["x"]},
        }
    )
    run = decide(run, view()).run
    run = finish(run, "make", artifacts="artifacts/p-1/make.tar.gz").run
    with pytest.raises(RejectedError, match="still running"):
        dag.retry(run, T0)
    cancelled = dag.cancel(run, T0, "carol")
    assert cancelled.state == RunState.CANCELLED
    assert cancelled.jobs["check"].state == JobState.CANCELLED
    assert cancelled.jobs["make"].state == JobState.SUCCEEDED
    with pytest.raises(RejectedError, match="already cancelled"):
        dag.cancel(cancelled, T0)
    again = dag.retry(cancelled, T0)
    assert again.rounds == 2
    assert again.jobs["make"] == cancelled.jobs["make"], "succeeded jobs stay as they were"
    plan = decide(again, view(3))
    assert dispatched(plan) == ["check"]
    assignment = assignment_for(plan.run, "check", T0)
    assert assignment.fetch == {"make": "artifacts/p-1/make.tar.gz"}
    assert assignment.attempt == 2


def test_resource_group_takes_a_lock_first() -> None:
    run = make_run({"a": {"command": ["x"], "resource_group": "prod"}})
    plan = decide(run, view())
    assert dispatched(plan) == []
    assert plan.want_locks == {"prod": "p-1.a"}
    plan = decide(run, view(locks={"prod": "other-run.deploy"}))
    assert plan.want_locks == {}
    assert "held by other-run.deploy" in plan.run.jobs["a"].message
    plan = decide(run, view(locks={"prod": "p-1.a"}))
    assert dispatched(plan) == ["a"]
    assert plan.run.jobs["a"].holds == "prod"
    done = finish(plan.run, "a", at=1)
    assert done.release == {"prod"}
    assert done.run.jobs["a"].holds == ""


def test_assignment_environment_and_script() -> None:
    run = make_run(
        {
            "t": {
                "script": ["echo $PY", "make"],
                "env": {"WHERE": "on ${PY}"},
                "parallel": {"matrix": [{"PY": ["3.11"]}]},
                "timeout": "1m",
            },
            "c": {"command": ["echo", "${GREETING}"]},
        },
        variables={"GREETING": "hi"},
    )
    run = decide(run, view()).run
    t = assignment_for(run, "t", T0)
    assert t.argv == ["sh", "-e", "-c", "echo $PY\nmake"]
    assert t.env["PY"] == "3.11"
    assert t.env["WHERE"] == "on 3.11"
    assert t.env["CORRAL_JOB"] == "t"
    assert t.timeout == 60
    assert assignment_for(run, "c", T0).argv == ["echo", "hi"]


def _service(revision: int, generation: int, rollback_of: int = 0) -> ServiceRecord:
    return ServiceRecord(
        spec=ServiceSpec.model_validate({"name": "web", "command": ["x"]}),
        generation=generation,
        command_id="c",
        updated_at=T0,
        revision=revision,
        rollback_of=rollback_of,
    )


def _status(generation: int, revision: int, state: RolloutState, ready: int = 1) -> ServiceStatus:
    return ServiceStatus(
        name="web",
        observed_generation=generation,
        desired=1,
        assigned=1,
        ready=ready,
        updated_at=T0,
        revision=revision,
        rollout=Rollout(revision=revision, state=state, started_at=T0),
    )


def test_deploy_progress() -> None:
    assert not deploy_progress(_service(2, 3), None, 3, 2).done
    assert not deploy_progress(_service(2, 3), _status(2, 1, RolloutState.COMPLETE), 3, 2).done
    going = deploy_progress(_service(2, 3), _status(3, 2, RolloutState.PROGRESSING), 3, 2)
    assert not going.done
    done = deploy_progress(_service(2, 3), _status(3, 2, RolloutState.COMPLETE), 3, 2)
    assert done == DeployProgress(done=True, message="revision 2: 1/1 ready")
    failed = deploy_progress(_service(2, 3), _status(3, 2, RolloutState.FAILED), 3, 2)
    assert failed.failed
    rolled = deploy_progress(_service(3, 4, rollback_of=2), None, 3, 2)
    assert rolled.failed
    assert "rolled back to revision 3" in rolled.message
    assert deploy_progress(None, None, 3, 2).failed


def test_deploy_job_runs_in_the_worker_and_times_out() -> None:
    run = make_run({"d": {"deploy": {"name": "web", "command": ["x"]}, "timeout": 10}})
    plan = decide(run, view(nodes={}))
    assert plan.deploy == ["d"], "a deploy job needs no node"
    run = plan.run
    plan = decide(run, view(5, deploys={"d": DeployProgress(done=False)}))
    assert plan.run.jobs["d"].state == JobState.DISPATCHED
    assert plan.wake_at == T0 + timedelta(seconds=10)
    plan = decide(run, view(5, deploys={"d": DeployProgress(done=True)}))
    assert plan.run.state == RunState.SUCCEEDED
    plan = decide(run, view(11))
    assert plan.run.jobs["d"].reason == "timeout"


def test_view_counts_only_live_real_nodes_and_other_runs_load() -> None:
    from corral.schemas.spec import Resources
    from corral.schemas.state import NodeStatus
    from corral.workers.pipeline.assigning import view_of

    def node(name: str, age: float, runtime: str = "process") -> NodeStatus:
        return NodeStatus(
            id=name,
            capacity=Resources(),
            drivers=["process"],
            runtime=runtime,
            heartbeat_at=T0 - timedelta(seconds=age),
            started_at=T0,
        )

    mine = make_run({"a": {"command": ["x"], "resource_group": "g"}})
    other = decide(
        dag.new_run("q-1", mine.spec, {}, T0),
        view(nodes={"n1": ("process",)}, locks={"g": "q-1.a"}),
    ).run
    seen = view_of(
        mine,
        T0,
        nodes=[node("n1", 1), node("old", 10), node("sim", 0, runtime="fake")],
        grace=3,
        others=[other, mine],
        locks={"g": "q-1.a", "h": "x.y"},
        services=lambda _: None,
        statuses=lambda _: None,
    )
    assert seen.nodes == {"n1": ("process",)}
    assert seen.alive == {"n1", "sim"}
    assert seen.load == {"n1": 1}
    assert seen.locks == {"g": "q-1.a"}


def test_a_draining_node_finishes_its_jobs_but_gets_no_new_ones() -> None:
    run = decide(make_run({"a": {"command": ["x"]}, "b": {"command": ["x"]}}), view()).run
    draining = view(1, nodes={"n2": ("process",)}, alive={"n1", "n2"})
    plan = decide(run, draining)
    assert plan.run.jobs["a"].state == JobState.DISPATCHED, "n1 still heartbeats"
    plan = finish(run, "a")
    assert plan.run.jobs["a"].state == JobState.SUCCEEDED


def test_a_retried_deploy_forgets_the_previous_rollout() -> None:
    jobs = {
        "d": {
            "deploy": {"name": "web", "command": ["x"]},
            "retry": {"max": 1, "backoff": {"initial": 0}},
        }
    }
    run = decide(make_run(jobs), view(nodes={})).run
    job = run.jobs["d"].model_copy(
        update={"state": JobState.RUNNING, "deploy_generation": 4, "deploy_revision": 2}
    )
    run = run.model_copy(update={"jobs": {"d": job}})
    failed = DeployProgress(done=True, failed=True, message="rolled back")
    plan = decide(run, view(1, nodes={}, deploys={"d": failed}))
    again = plan.run.jobs["d"]
    assert again.attempt == 2
    assert again.state == JobState.DISPATCHED
    assert again.deploy_generation == 0, "the next attempt waits for its own rollout"
    assert plan.deploy == ["d"]
