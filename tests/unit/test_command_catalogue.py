"""Every command on the bus is in one catalogue (schemas/commands.py COMMANDS), whichever worker
applies it: the gateway validates each there, `corral schema export` writes each, and the
schemas import without a cycle."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from corral.bus.names import Names
from corral.schemas.commands import COMMANDS, OWNERS, command_type
from corral.schemas.envelope import CloudEvent
from corral.schemas.errors import InvalidInput
from corral.schemas.pipeline import run_id_for
from corral.schemas.rules import Rule, RuleDelete
from corral.schemas.runs import RUN_COMMANDS, RunPipeline
from corral.services.cli.schema import catalogue
from corral.services.gateway.routing import command_of, route
from corral.workers.rules.actions import command_data
from corral.workers.rules.templating import Rendered

NAMES = Names("corral")
PIPELINE: dict[str, Any] = {"name": "ci", "jobs": {"build": {"command": ["true"]}}}
RULE: dict[str, Any] = {
    "name": "r1",
    "when": {"type": "io.corral.ext.github.push"},
    "then": {"resource": "pipeline", "verb": "run", "name": "ci"},
}


def event(type_: str, subject: str | None, data: Any) -> CloudEvent:
    return CloudEvent(id="e1", source="tests", type=type_, subject=subject, data=data)


def test_every_owned_resource_has_its_commands() -> None:
    assert set(COMMANDS) == set(OWNERS)
    for resource, verbs in RUN_COMMANDS.items():
        assert COMMANDS[resource] == verbs
    assert COMMANDS["rule"] == {"apply": Rule, "delete": RuleDelete}


def test_every_command_type_is_recognised_and_exported() -> None:
    exported = catalogue()
    for resource, verbs in COMMANDS.items():
        for verb, model in verbs.items():
            kind = command_type(resource, verb)
            assert command_of(kind) == (resource, verb)
            assert exported[kind] is model
            assert model.model_json_schema()["type"] == "object"


@pytest.mark.parametrize(
    ("type_", "subject", "data", "where"),
    [
        ("io.corral.pipeline.run", "ci", {"spec": PIPELINE}, "corral.cmd.pipeline.ci.run"),
        ("io.corral.pipeline.run", "ci", None, "corral.cmd.pipeline.ci.run"),
        ("io.corral.pipeline.apply", "ci", {"spec": PIPELINE}, "corral.cmd.pipeline.ci.apply"),
        (
            "io.corral.run.approve",
            run_id_for("ci", "0123456789"),
            {"job": "ship", "user": "ann"},
            "corral.cmd.run.ci-0123456789.approve",
        ),
        ("io.corral.run.cancel", "ci-1", {}, "corral.cmd.run.ci-1.cancel"),
        ("io.corral.run.retry", "ci-1", {"requested_by": "ann"}, "corral.cmd.run.ci-1.retry"),
        ("io.corral.rule.apply", "r1", RULE, "corral.cmd.rule.r1.apply"),
        ("io.corral.rule.delete", "r1", {}, "corral.cmd.rule.r1.delete"),
    ],
)
def test_pipeline_run_and_rule_commands_route(
    type_: str, subject: str, data: Any, where: str
) -> None:
    routed = route(event(type_, subject, data), NAMES)
    assert routed.command
    assert routed.subject == where


def test_a_long_run_id_is_a_valid_subject() -> None:
    run_id = run_id_for("a" * 63, "0123456789")
    assert len(run_id) > 63
    assert route(event("io.corral.run.cancel", run_id, {}), NAMES).subject.endswith(".cancel")


@pytest.mark.parametrize(
    ("type_", "subject", "data", "locs", "needle"),
    [
        ("io.corral.pipeline.run", "ci", {"spec": PIPELINE, "vars": {}}, {"vars"}, "invalid"),
        ("io.corral.pipeline.run", "ci", {"variables": {"1bad": "x"}}, {"variables.1bad"}, "run"),
        (
            "io.corral.pipeline.run",
            "ci",
            {"spec": {"name": "ci", "jobs": {"a": {"command": ["true"], "needs": ["zz"]}}}},
            {"spec"},
            "pipeline spec",
        ),
        (
            "io.corral.pipeline.run",
            "ci",
            {"spec": {"name": "ci", "jobs": {"a": {"comand": ["true"]}}}},
            {"spec.jobs.a.comand"},
            "pipeline spec",
        ),
        ("io.corral.pipeline.apply", "other", {"spec": PIPELINE}, {"spec.name"}, "named 'ci'"),
        (
            "io.corral.pipeline.run",
            "ci",
            {"spec": {"name": "ci", "jobs": {"d": {"deploy": "web.yaml"}}}},
            {"spec.jobs.d.deploy"},
            "file",
        ),
        ("io.corral.run.approve", "ci-1", {"job": "ship"}, {"user"}, "run.approve"),
        ("io.corral.rule.apply", "r2", RULE, {"name"}, "named 'r1'"),
        ("io.corral.rule.apply", "r1", {**RULE, "then": 3}, {"then"}, "rule.apply"),
        ("io.corral.rule.delete", "r1", {"force": True}, {"force"}, "rule.delete"),
    ],
)
def test_invalid_commands_name_the_field(
    type_: str, subject: str, data: Any, locs: set[str], needle: str
) -> None:
    with pytest.raises(InvalidInput, match=needle) as info:
        route(event(type_, subject, data), NAMES)
    found = {e.loc for e in info.value.errors}
    assert locs <= found or any(f.startswith(loc) for loc in locs for f in found), found


@pytest.mark.parametrize(
    ("type_", "subject"),
    [
        ("io.corral.run.cancel", "CI-1"),
        ("io.corral.run.cancel", "-ci"),
        ("io.corral.run.cancel", "a" * 81),
        ("io.corral.pipeline.run", "a" * 64),
        ("io.corral.rule.delete", "has.dot"),
    ],
)
def test_bad_subjects_are_refused(type_: str, subject: str) -> None:
    with pytest.raises(InvalidInput, match="needs `subject`"):
        route(event(type_, subject, {}), NAMES)


def test_unknown_verbs_of_owned_resources_are_refused() -> None:
    with pytest.raises(InvalidInput, match=r"Corral's own namespace.*io\.corral\.pipeline\.run"):
        route(event("io.corral.pipeline.cancel", "ci", {}), NAMES)


def test_a_rule_may_still_send_a_pipeline_run_with_any_variables() -> None:
    rendered = Rendered(
        resource="pipeline", name="ci", verb="run", data={"variables": {"N": 3, "OK": True}}
    )
    data = command_data("r1", rendered)
    parsed = RunPipeline.model_validate(data)
    assert parsed.variables == {"N": "3", "OK": "true"}
    assert parsed.requested_by == "rule:r1"


@pytest.mark.parametrize(
    "module",
    [
        "corral.schemas.commands",
        "corral.schemas.events",
        "corral.schemas.runs",
        "corral.schemas.rules",
        "corral.schemas.pipeline",
    ],
)
def test_each_schema_module_imports_first_without_a_cycle(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
