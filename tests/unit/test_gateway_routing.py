"""Where an event from outside goes: commands, external events, refused types; filters."""

from __future__ import annotations

import pytest

from corral.bus.names import Names
from corral.schemas.envelope import CloudEvent
from corral.schemas.errors import InvalidInput
from corral.services.gateway.routing import (
    TOKEN,
    command_of,
    ext_type,
    route,
    subject_filter,
    token,
    type_matches,
)

NAMES = Names("corral")


def event(
    type: str, subject: str | None = None, data: object = None, source: str = "x"
) -> CloudEvent:
    return CloudEvent(id="e1", source=source, type=type, subject=subject, data=data)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("github", "github"),
        ("GitHub", "github"),
        ("https://ci.example.com/jobs/12", "ci_example_com_jobs_12"),
        ("urn:my:system", "my_system"),
        ("/my/app", "my_app"),
        ("com.example.order.created", "com_example_order_created"),
        ("Push Hook", "push_hook"),
        ("pull_request", "pull_request"),
        ("-dash", "x-dash"),
        ("***", "unknown"),
        ("", "unknown"),
    ],
)
def test_tokens(text: str, expected: str) -> None:
    assert token(text) == expected
    assert TOKEN.match(token(text))


def test_long_tokens_are_cut_and_stay_distinct() -> None:
    a, b = token("a" * 100 + "1"), token("a" * 100 + "2")
    assert len(a) <= 64
    assert len(b) <= 64
    assert a != b
    assert TOKEN.match(a)


def test_commands_go_to_the_command_subject() -> None:
    where = route(event("io.corral.service.scale", "web", {"replicas": 3}), NAMES)
    assert where.command
    assert where.subject == "corral.cmd.service.web.scale"
    deploy = route(event("io.corral.service.deploy", "web", {"command": ["sleep", "1"]}), NAMES)
    assert deploy.subject == "corral.cmd.service.web.deploy"
    assert command_of("io.corral.service.promote") == ("service", "promote")
    assert command_of("io.corral.service.accepted") is None
    assert command_of("com.example.thing") is None


@pytest.mark.parametrize(
    ("ev", "needle"),
    [
        (event("io.corral.service.scale", None, {"replicas": 3}), "needs `subject`"),
        (event("io.corral.service.scale", "Not.A.Name", {"replicas": 3}), "needs `subject`"),
        (event("io.corral.service.scale", "web", {"replicas": -1}), "invalid service.scale"),
        (event("io.corral.service.scale", "web", [1, 2]), "JSON object"),
        (event("io.corral.service.deploy", "web", {"name": "other"}), "does not match"),
        (event("io.corral.service.accepted", "web", {}), "Corral's own namespace"),
        (event("io.corral.ext.github.push", "web", {}), "Corral's own namespace"),
    ],
)
def test_refused(ev: CloudEvent, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        route(ev, NAMES)


def test_invalid_command_data_names_the_fields() -> None:
    with pytest.raises(InvalidInput) as info:
        route(event("io.corral.service.scale", "web", {"replicas": "many", "x": 1}), NAMES)
    locs = {e.loc for e in info.value.errors}
    assert {"replicas", "x"} <= locs


def test_external_events() -> None:
    where = route(event("com.example.order.created", source="https://shop.example.com"), NAMES)
    assert not where.command
    assert where.subject == "corral.evt.ext.shop_example_com.com_example_order_created"
    assert ext_type("github", "push") == "io.corral.ext.github.push"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "corral.evt.>"),
        ("evt", "corral.evt.>"),
        ("evt.service.web.*", "corral.evt.service.web.*"),
        ("corral.evt.ext.github.>", "corral.evt.ext.github.>"),
        ("evt.*.*.rejected", "corral.evt.*.*.rejected"),
    ],
)
def test_subject_filters(text: str | None, expected: str) -> None:
    assert subject_filter(NAMES, text) == expected


@pytest.mark.parametrize(
    "text", ["cmd.>", "evt.>.x", "evt.a b", "evt..x", "evt.service.web.$", "x" * 300, ">"]
)
def test_bad_subject_filters(text: str) -> None:
    with pytest.raises(InvalidInput):
        subject_filter(NAMES, text)


def test_type_globs() -> None:
    assert type_matches(None, "io.corral.service.accepted")
    assert type_matches("*.rejected", "io.corral.service.rejected")
    assert type_matches("service.*", "io.corral.service.accepted")
    assert type_matches("io.corral.ext.github.*", "io.corral.ext.github.push")
    assert not type_matches("service.*", "io.corral.replica.started")
