"""Rule templates: Jinja's sandbox, strict about undefined names, bounded, typed results."""

from __future__ import annotations

import pytest

from corral.schemas.rules import Then
from corral.workers.rules.templating import TemplateFailure, check, render, render_value

CONTEXT = {
    "event": {"id": "e1", "type": "io.corral.ext.github.push"},
    "data": {"ref": "refs/heads/main", "labels": {"service": "web"}, "n": "4"},
    "services": {"web": {"replicas": 3, "labels": {"env": "prod"}}},
    "rule": {"name": "r"},
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ services.web.replicas + 2 }}", 5),
        ("{{ services[data.labels.service].replicas * 2 }}", 6),
        ("  {{ data.n | int }}  ", 4),
        ("ref={{ data.ref }}", "ref=refs/heads/main"),
        ("{{ data.ref.split('/')[-1] }}", "main"),
        ("{{ services.web.labels }}", {"env": "prod"}),
        ("{{ data.missing | default('none') }}", "none"),
        ("{{ [1, 2] }}", [1, 2]),
        ("no template", "no template"),
        ("{{ 1 }} and {{ 2 }}", "1 and 2"),
        ("{% if services.web.replicas > 2 %}big{% else %}small{% endif %}", "big"),
        ("{{ 'x' * 3 }}", "xxx"),
        ("{{ 2 ** 10 }}", 1024),
    ],
)
def test_renders(template, expected) -> None:
    assert render_value(template, CONTEXT, "f") == expected


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("{{ services.api.replicas }}", "no attribute 'api'"),
        ("{{ nothing }}", "'nothing' is undefined"),
        ("x {{ nothing }}", "'nothing' is undefined"),
        ("{{ data.__class__ }}", "unsafe"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ 'x' * 10000000 }}", "repetition"),
        ("{{ 9 ** 999999 }}", "too large"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ 'a' | int + 'b' }}", "TypeError"),
        ("{{ range(10**9) | list }}", "Range too big"),
    ],
)
def test_failures_name_the_field_and_the_cause(template, error) -> None:
    with pytest.raises(TemplateFailure) as caught:
        render_value({"deep": [template]}, CONTEXT, "then.data")
    assert caught.value.errors[0].loc == "then.data.deep.0"
    assert error in str(caught.value)


def test_render_a_whole_then() -> None:
    then = Then.model_validate(
        {
            "resource": "service",
            "name": "{{ data.labels.service }}",
            "verb": "scale",
            "data": {"replicas": "{{ services[data.labels.service].replicas + 2 }}"},
        }
    )
    rendered = render(then, CONTEXT)
    assert (rendered.resource, rendered.name, rendered.verb) == ("service", "web", "scale")
    assert rendered.data == {"replicas": 5}
    note = render(
        Then.model_validate({"notify": {"text": "{{ event.id }}", "channel": "#ops"}}), CONTEXT
    )
    assert (note.text, note.channel) == ("e1", "#ops")


def test_check_finds_syntax_errors_up_front() -> None:
    then = Then.model_validate(
        {"resource": "service", "name": "{{ x", "verb": "scale", "data": {"a": ["{% if %}"]}}
    )
    assert [e.loc for e in check(then)] == ["then.name", "then.data.a.0"]
    fine = Then.model_validate({"notify": {"text": "{{ data.ref }}"}})
    assert check(fine) == []
