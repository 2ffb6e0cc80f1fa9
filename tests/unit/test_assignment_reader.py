"""The agents' assignment reader: the same record as a full validation, every time, with each
distinct template validated once; bad records fail as they always did."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from corral.schemas.state import Assignment, Template
from corral.workers.agent.assignments import AssignmentReader

NOW = datetime(2026, 1, 1, 12, 30, tzinfo=UTC)


def template(rng: random.Random) -> Template:
    env = {
        rng.choice(["A", "correlation", "template", 'q"uote', "br{ace}"]): rng.choice(
            ["x", '","correlation":"', "}", '\\"template\\":{']
        )
        for _ in range(rng.randint(0, 3))
    }
    spec: dict[str, object] = {
        "command": ["sleep", str(rng.randint(1, 9))],
        "env": env,
        "ports": rng.sample(["http", "admin", "grpc"], rng.randint(0, 2)),
        "resources": {"cpu": rng.choice([0.1, 0.5, 2]), "memory": rng.choice([1 << 27, 1 << 30])},
    }
    if rng.random() < 0.3:
        spec["image"] = "busybox:latest"
    if rng.random() < 0.3:
        spec["health"] = {"exec": ["true"], "period": 0.5}
    return Template.model_validate(spec)


def assignment(rng: random.Random, tpl: Template, i: int) -> Assignment:
    return Assignment(
        replica=f"web-{i:04d}",
        service="web",
        node=f"n{rng.randint(0, 9)}",
        generation=rng.randint(1, 5),
        template=tpl,
        correlation=rng.choice(["", "cmd-1", 'odd "one"']),
        reason=rng.choice(["", "least loaded", 'spread: "template":{}']),
        assigned_at=NOW,
        draining=rng.random() < 0.2,
        waits_for=rng.sample(["a", "b", "c"], rng.randint(0, 2)),
    )


def same(read: Assignment, raw: bytes) -> None:
    full = Assignment.model_validate_json(raw)
    assert read == full
    assert type(read) is Assignment
    assert read.model_fields_set == full.model_fields_set
    assert read.model_dump_json() == full.model_dump_json()


@pytest.mark.parametrize("seed", range(10))
def test_reads_what_a_full_validation_reads_and_validates_each_template_once(seed: int) -> None:
    rng = random.Random(seed)
    templates = [template(rng) for _ in range(4)]
    reader = AssignmentReader()
    for i in range(60):
        raw = assignment(rng, rng.choice(templates), i).model_dump_json().encode()
        same(reader(raw), raw)
    assert reader.validated <= len(templates)


def test_another_field_order_or_a_nested_template_key_reads_the_same() -> None:
    rng = random.Random(1)
    value = assignment(rng, template(rng), 1)
    body = value.model_dump(mode="json")
    reader = AssignmentReader()
    last = json.dumps(
        {k: v for k, v in body.items() if k != "template"} | {"template": body["template"]}
    )
    decoy = {"meta": {"template": body["template"]}, **body}
    for raw in (last.encode(), json.dumps(decoy).encode(), json.dumps(body, indent=1).encode()):
        same(reader(raw), raw)


def test_a_bad_record_fails_as_it_always_did() -> None:
    rng = random.Random(2)
    reader = AssignmentReader()
    good = assignment(rng, template(rng), 1).model_dump(mode="json")
    for bad in (
        {**good, "generation": "many"},
        {**good, "template": {**good["template"], "resources": {"cpu": "lots"}}},
        {k: v for k, v in good.items() if k != "replica"},
        {**good, "template": None},
    ):
        raw = json.dumps(bad, separators=(",", ":")).encode()
        with pytest.raises(ValidationError) as caught:
            Assignment.model_validate_json(raw)
        with pytest.raises(ValidationError) as ours:
            reader(raw)
        assert ours.value.errors(include_context=False) == caught.value.errors(
            include_context=False
        )
    with pytest.raises(ValidationError):
        reader(b"not json")


def test_it_remembers_a_bounded_number_of_templates() -> None:
    rng = random.Random(3)
    reader = AssignmentReader(keep=2)
    templates = [Template(command=["sleep", str(n)]) for n in range(3)]
    for tpl in [*templates, templates[2], templates[0]]:
        raw = assignment(rng, tpl, 1).model_dump_json().encode()
        same(reader(raw), raw)
    assert reader.validated == 4  # the first was forgotten when the third came
