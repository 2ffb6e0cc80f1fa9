"""The pipeline spec: job graph from stages and needs, cycles and missing needs, matrix,
retry conditions, backoff and cron."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from corral.schemas.pipeline import Backoff, PipelineSpec, Retry, job_graph, next_cron
from corral.schemas.runs import JobState
from corral.workers.pipeline.dag import expand


def spec(**jobs: dict) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "p", "jobs": jobs})


def test_stages_order_jobs_without_needs() -> None:
    s = spec(
        build={"stage": "build", "command": ["true"]},
        unit={"stage": "test", "command": ["true"]},
        lint={"stage": "test", "command": ["true"]},
        ship={"stage": "deploy", "command": ["true"]},
    )
    assert job_graph(s) == {
        "build": [],
        "unit": ["build"],
        "lint": ["build"],
        "ship": ["build", "unit", "lint"],
    }


def test_explicit_stage_list_wins_over_appearance() -> None:
    s = PipelineSpec.model_validate(
        {
            "name": "p",
            "stages": ["build", "test"],
            "jobs": {
                "t": {"stage": "test", "command": ["true"]},
                "b": {"stage": "build", "command": ["true"]},
            },
        }
    )
    assert job_graph(s) == {"b": [], "t": ["b"]}


def test_needs_make_a_dag_that_ignores_stages() -> None:
    s = spec(
        build={"stage": "build", "command": ["true"]},
        fast={"stage": "test", "needs": [], "command": ["true"]},
        ship={"stage": "deploy", "needs": ["build"], "command": ["true"]},
    )
    graph = job_graph(s)
    assert graph["fast"] == []
    assert graph["ship"] == ["build"]
    order = list(graph)
    assert order.index("build") < order.index("ship")


def test_topological_order_puts_needs_first() -> None:
    s = spec(
        c={"needs": ["b"], "command": ["true"]},
        b={"needs": ["a"], "command": ["true"]},
        a={"command": ["true"]},
    )
    assert list(job_graph(s)) == ["a", "b", "c"]


def test_a_cycle_is_rejected_naming_it() -> None:
    with pytest.raises(ValidationError, match=r"cycle: a -> b -> a"):
        spec(a={"needs": ["b"], "command": ["true"]}, b={"needs": ["a"], "command": ["true"]})


def test_self_need_and_missing_need_are_rejected() -> None:
    with pytest.raises(ValidationError, match="needs itself"):
        spec(a={"needs": ["a"], "command": ["true"]})
    with pytest.raises(ValidationError, match="needs 'x', which the pipeline does not define"):
        spec(a={"needs": ["x"], "command": ["true"]})


def test_unknown_stage_in_a_declared_list_is_rejected() -> None:
    with pytest.raises(ValidationError, match="not in stages"):
        PipelineSpec.model_validate(
            {"name": "p", "stages": ["a"], "jobs": {"j": {"stage": "b", "command": ["true"]}}}
        )


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({}, "exactly one of command, script or deploy"),
        ({"command": ["a"], "script": ["b"]}, "exactly one of command, script or deploy"),
        ({"command": ["a"], "approvers": ["x"]}, "approvers only apply"),
        ({"command": ["a"], "retry": {"when": ["sometimes"]}}, "unknown retry condition"),
        ({"command": ["a"], "retry": {"when": [300]}}, "not between 1 and 255"),
        ({"command": ["a"], "artifacts": {"paths": ["../x"]}}, "must be relative"),
        ({"command": ["a"], "artifacts": {"paths": ["/etc"]}}, "must be relative"),
        ({"command": ["a"], "timeout": 0}, "greater than 0"),
        ({"command": ["a"], "colour": "red"}, "Extra inputs"),
        ({"command": ["a"], "when": "sometimes"}, "on_success"),
    ],
)
def test_bad_jobs_are_rejected(job: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(j=job)


def test_bad_cron_and_names_are_rejected() -> None:
    with pytest.raises(ValidationError, match="invalid cron"):
        PipelineSpec.model_validate(
            {"name": "p", "triggers": {"cron": "61 * * * *"}, "jobs": {"j": {"command": ["a"]}}}
        )
    with pytest.raises(ValidationError, match="pattern"):
        spec(**{"Bad.Name": {"command": ["a"]}})


def test_matrix_expands_and_needs_follow_every_instance() -> None:
    s = spec(
        test={
            "command": ["pytest"],
            "parallel": {
                "matrix": [{"PY": ["3.11", "3.12"], "DB": ["pg", "sqlite"]}, {"PY": "3.13"}]
            },
        },
        report={"needs": ["test"], "command": ["true"]},
    )
    jobs = expand(s)
    instances = [n for n in jobs if jobs[n].job == "test"]
    assert instances == ["test-1", "test-2", "test-3", "test-4", "test-5"]
    assert jobs["test-1"].matrix == {"PY": "3.11", "DB": "pg"}
    assert jobs["test-5"].matrix == {"PY": "3.13"}
    assert jobs["report"].needs == instances
    assert all(j.state == JobState.PENDING for j in jobs.values())


def test_backoff_grows_and_caps() -> None:
    backoff = Backoff(initial=1, factor=3, max=5)
    assert [backoff.delay(n) for n in (1, 2, 3, 4)] == [1, 3, 5, 5]
    assert Backoff.model_validate({"initial": "500ms"}).delay(2) == 1.0


def test_retry_matching() -> None:
    retry = Retry(max=2, when=["timeout", 137])
    assert retry.matches("timeout", None)
    assert retry.matches("failure", 137)
    assert not retry.matches("failure", 1)
    assert not retry.matches("node_lost", None)
    default = Retry()
    assert default.matches("failure", 1)
    assert default.matches("node_lost", None)


def test_next_cron() -> None:
    at = datetime(2026, 1, 1, 12, 3, 30, tzinfo=UTC)
    assert next_cron("*/5 * * * *", at) == datetime(2026, 1, 1, 12, 5, tzinfo=UTC)
    assert next_cron("*/5 * * * *", datetime(2026, 1, 1, 12, 5, tzinfo=UTC)) == datetime(
        2026, 1, 1, 12, 10, tzinfo=UTC
    )
    assert next_cron("0 3 * * 1", at) == datetime(2026, 1, 5, 3, 0, tzinfo=UTC)
