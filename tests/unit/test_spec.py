"""ServiceSpec validation, variable expansion and port environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from corral.schemas.spec import (
    MAX_REPLICAS,
    ServiceSpec,
    expand,
    port_environment,
    port_variables,
)

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello.yaml"


def make(**fields: Any) -> ServiceSpec:
    data: dict[str, Any] = {"name": "web", "command": ["serve"]}
    data.update(fields)
    return ServiceSpec.model_validate(data)


def errors_of(**fields: Any) -> list[ErrorDetails]:
    with pytest.raises(ValidationError) as info:
        make(**fields)
    return info.value.errors()


def locs(errors: list[ErrorDetails]) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in errors]


def test_hello_example_is_a_valid_spec() -> None:
    spec = ServiceSpec.model_validate(yaml.safe_load(HELLO.read_text()))
    assert spec.name == "hello"
    assert spec.replicas == 3
    assert spec.command[:3] == ["python3", "-m", "http.server"]
    assert "${PORT}" in spec.command
    assert spec.ports == ["http"]
    assert spec.env == {"GREETING": "hi"}
    assert spec.resources.cpu == pytest.approx(0.1)
    assert spec.resources.memory == 64 * 2**20
    assert spec.labels == {"team": "web"}


def test_defaults() -> None:
    spec = make()
    assert spec.replicas == 1
    assert spec.env == {}
    assert spec.ports == []
    assert spec.resources.cpu == 0.0
    assert spec.resources.memory == 0
    assert spec.placement.node_selector == {}
    assert spec.stop_grace_period == 10.0


def test_spec_is_frozen() -> None:
    spec = make()
    with pytest.raises(ValidationError):
        spec.replicas = 4  # type: ignore[misc]


@pytest.mark.parametrize("name", ["a", "web", "web-1", "1web", "a" * 63, "a-b-c", "0"])
def test_valid_names(name: str) -> None:
    assert make(name=name).name == name


@pytest.mark.parametrize(
    "name",
    ["", "Web", "web_1", "-web", "web-", "web.x", "a" * 64, "wéb", "web 1", "web\n"],
)
def test_invalid_names_are_rejected_on_name(name: str) -> None:
    assert locs(errors_of(name=name)) == ["name"]


@pytest.mark.parametrize("replicas", [0, 1, MAX_REPLICAS])
def test_replicas_within_bounds(replicas: int) -> None:
    assert make(replicas=replicas).replicas == replicas


@pytest.mark.parametrize("replicas", [-1, MAX_REPLICAS + 1, "many", 1.5])
def test_replicas_out_of_bounds(replicas: Any) -> None:
    assert locs(errors_of(replicas=replicas)) == ["replicas"]


def test_command_must_not_be_empty() -> None:
    assert locs(errors_of(command=[])) == ["command"]


def test_command_is_required() -> None:
    with pytest.raises(ValidationError) as info:
        ServiceSpec.model_validate({"name": "web"})
    assert locs(info.value.errors()) == ["command"]


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"replica": 3}, "replica"),
        ({"placement": {"node_selectr": {"a": "b"}}}, "placement.node_selectr"),
    ],
)
def test_unknown_fields_are_rejected(fields: dict[str, Any], where: str) -> None:
    errors = errors_of(**fields)
    assert locs(errors) == [where]
    assert errors[0]["type"] == "extra_forbidden"


def test_port_variable_without_ports_is_rejected_with_a_hint() -> None:
    errors = errors_of(command=["serve", "--port", "${PORT}"])
    assert len(errors) == 1
    msg = errors[0]["msg"]
    assert "command refers to ${PORT}, which is not defined" in msg
    assert "declare a port in `ports`" in msg


def test_undefined_variable_in_env_names_the_key() -> None:
    msg = errors_of(env={"LISTEN": ":${PORT_ADMIN}"}, ports=["http"])[0]["msg"]
    assert "env.LISTEN refers to ${PORT_ADMIN}" in msg
    assert "declare a port" in msg


def test_undefined_non_port_variable_has_no_port_hint() -> None:
    msg = errors_of(command=["echo", "${HOME}"])[0]["msg"]
    assert "${HOME}" in msg
    assert "port" not in msg


@pytest.mark.parametrize(
    "command",
    [
        ["serve", "${PORT}"],
        ["serve", "${PORT_HTTP}"],
        ["serve", "--admin=${PORT_ADMIN_API}", "--port=${PORT_HTTP}"],
    ],
)
def test_declared_port_variables_are_accepted(command: list[str]) -> None:
    spec = make(command=command, ports=["http", "admin-api"])
    assert spec.command == command


def test_corral_variables_are_always_allowed() -> None:
    spec = make(command=["serve", "${CORRAL_REPLICA}"], env={"X": "${CORRAL_NODE}"})
    assert spec.env == {"X": "${CORRAL_NODE}"}


def test_plain_dollar_text_is_not_a_variable() -> None:
    assert make(command=["sh", "-c", "echo $PORT $$ ${1abc}"]).command[2].startswith("echo")


def test_duplicate_port_names_are_rejected() -> None:
    errors = errors_of(ports=["http", "http"])
    assert locs(errors) == ["ports"]
    assert "unique" in errors[0]["msg"]


@pytest.mark.parametrize("port", ["HTTP", "1http", "http_x", "a" * 16, ""])
def test_invalid_port_names(port: str) -> None:
    assert locs(errors_of(ports=[port])) == ["ports.0"]


@pytest.mark.parametrize("key", ["PATH", "_x", "A1", "lower_case"])
def test_valid_env_names(key: str) -> None:
    assert make(env={key: "v"}).env == {key: "v"}


@pytest.mark.parametrize("key", ["1A", "A-B", "A B", "", "A=B", "A.B"])
def test_invalid_env_names(key: str) -> None:
    errors = errors_of(env={key: "v"})
    assert locs(errors) == ["env"]
    assert repr(key) in errors[0]["msg"]


def test_env_name_with_trailing_newline_is_rejected() -> None:
    errors_of(env={"FOO\n": "v"})


def test_resources_accept_quantities_and_countable_extras() -> None:
    spec = make(resources={"cpu": "500m", "memory": "64Mi", "gpu": 1})
    assert spec.resources.cpu == pytest.approx(0.5)
    assert spec.resources.memory == 64 * 2**20
    assert spec.resources.as_dict() == {"cpu": 0.5, "memory": float(64 * 2**20), "gpu": 1.0}


def test_resources_as_dict_defaults_to_zero_cpu_and_memory() -> None:
    assert make().resources.as_dict() == {"cpu": 0.0, "memory": 0.0}


@pytest.mark.parametrize(
    ("resources", "where"),
    [
        ({"cpu": "lots"}, "resources.cpu"),
        ({"memory": "64MB"}, "resources.memory"),
        ({"memory": -1}, "resources.memory"),
    ],
)
def test_bad_cpu_or_memory_points_at_the_field(resources: dict[str, Any], where: str) -> None:
    assert locs(errors_of(resources=resources)) == [where]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"gpu": -1}, "non-negative"),
        ({"gpu": "one"}, "non-negative"),
        ({"gpu": True}, "non-negative"),
        ({"GPU": 1}, "not valid"),
        ({"1gpu": 1}, "not valid"),
    ],
)
def test_bad_extra_resources_are_rejected(extra: dict[str, Any], words: str) -> None:
    errors = errors_of(resources=extra)
    assert locs(errors) == ["resources"]
    assert words in errors[0]["msg"]


def test_nan_extra_resource_is_rejected() -> None:
    errors_of(resources={"gpu": float("nan")})


def test_extra_resource_name_with_trailing_newline_is_rejected() -> None:
    errors_of(resources={"gpu\n": 1})


def test_infinite_memory_is_a_validation_error() -> None:
    errors_of(resources={"memory": float("inf")})


def test_placement_node_selector_and_labels() -> None:
    spec = make(placement={"node_selector": {"zone": "a"}}, labels={"example.com/team": "x"})
    assert spec.placement.node_selector == {"zone": "a"}
    assert locs(errors_of(labels={"-bad": "x"})) == ["labels.-bad.[key]"]


@pytest.mark.parametrize("grace", [-1, 3601])
def test_stop_grace_period_bounds(grace: float) -> None:
    assert locs(errors_of(stop_grace_period=grace)) == ["stop_grace_period"]


def test_runtime_fields_leave_out_scheduling_fields() -> None:
    a = make(replicas=1, labels={"a": "b"}, placement={"node_selector": {"z": "1"}})
    b = make(replicas=5, labels={"c": "d"})
    assert a.runtime_fields() == b.runtime_fields()
    assert set(a.runtime_fields()) == {"command", "env", "ports", "resources", "stop_grace_period"}
    assert make(env={"A": "1"}).runtime_fields() != make(env={"A": "2"}).runtime_fields()


def test_port_variables() -> None:
    assert port_variables([]) == set()
    assert port_variables(["http", "admin-api"]) == {"PORT", "PORT_HTTP", "PORT_ADMIN_API"}


def test_expand_replaces_known_and_keeps_unknown_variables() -> None:
    variables = {"PORT": "8080", "PORT_HTTP": "8080"}
    assert expand("--port=${PORT}", variables) == "--port=8080"
    assert expand("${PORT_HTTP}:${PORT}", variables) == "8080:8080"
    assert expand("${OTHER} $PORT", variables) == "${OTHER} $PORT"
    assert expand("no variables", variables) == "no variables"


def test_port_environment_names_every_port_and_the_first_as_port() -> None:
    env = port_environment(["http", "admin-api"], [8080, 9090])
    assert env == {"PORT": "8080", "PORT_HTTP": "8080", "PORT_ADMIN_API": "9090"}
    assert port_environment([], []) == {}


def test_port_environment_needs_one_number_per_port() -> None:
    with pytest.raises(ValueError, match=r"shorter|longer"):
        port_environment(["http", "admin"], [8080])


def test_port_environment_covers_every_port_variable() -> None:
    ports = ["http", "grpc", "metrics-x"]
    assert set(port_environment(ports, [1, 2, 3])) == port_variables(ports)
