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
    Backoff,
    Health,
    Restart,
    ServiceSpec,
    Update,
    expand,
    port_environment,
    port_variables,
)
from corral.schemas.state import Template

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
    assert spec.image is None
    assert spec.health is None
    assert spec.restart == Restart()
    assert spec.restart.policy == "always"
    assert spec.update == Update()
    assert spec.update.max_surge == "25%"
    assert spec.update.max_unavailable == 0
    assert spec.update.min_healthy == 5.0
    assert spec.update.progress_deadline == 300.0
    assert spec.update.auto_rollback is True
    assert spec.update.canary == 0


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


RUNNABLE = "a service needs a `command`, an `image`, or both"


def test_empty_command_without_an_image_is_rejected() -> None:
    errors = errors_of(command=[])
    assert locs(errors) == [""]
    assert RUNNABLE in errors[0]["msg"]


def test_command_or_image_is_required() -> None:
    with pytest.raises(ValidationError) as info:
        ServiceSpec.model_validate({"name": "web"})
    assert locs(info.value.errors()) == [""]
    assert RUNNABLE in info.value.errors()[0]["msg"]


def test_image_alone_is_enough() -> None:
    spec = ServiceSpec.model_validate({"name": "web", "image": "busybox:1.36"})
    assert spec.command == []
    assert spec.image == "busybox:1.36"


def test_image_and_command_together() -> None:
    spec = make(image="busybox", command=["sh", "-c", "sleep 1"])
    assert spec.image == "busybox"
    assert spec.command == ["sh", "-c", "sleep 1"]


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


@pytest.mark.parametrize("grace", [-1, 3601, "2h", "soon", "-1s"])
def test_stop_grace_period_bounds(grace: Any) -> None:
    assert locs(errors_of(stop_grace_period=grace)) == ["stop_grace_period"]


@pytest.mark.parametrize(("grace", "seconds"), [(3, 3.0), ("30s", 30.0), ("1m", 60.0), ("0", 0.0)])
def test_stop_grace_period_is_a_duration(grace: Any, seconds: float) -> None:
    assert make(stop_grace_period=grace).stop_grace_period == seconds


def test_runtime_fields_leave_out_scheduling_fields() -> None:
    a = make(replicas=1, labels={"a": "b"}, placement={"node_selector": {"z": "1"}})
    b = make(replicas=5, labels={"c": "d"})
    assert a.runtime_fields() == b.runtime_fields()
    assert set(a.runtime_fields()) == {
        "image",
        "command",
        "env",
        "ports",
        "resources",
        "stop_grace_period",
        "health",
        "restart",
    }
    assert make(env={"A": "1"}).runtime_fields() != make(env={"A": "2"}).runtime_fields()


@pytest.mark.parametrize(
    "change",
    [
        {"image": "busybox"},
        {"health": {"exec": ["true"]}},
        {"restart": {"policy": "never"}},
        {"restart": {"backoff": {"initial": "5s"}}},
    ],
)
def test_runtime_fields_cover_image_health_and_restart(change: dict[str, Any]) -> None:
    assert make(**change).runtime_fields() != make().runtime_fields()


def test_runtime_fields_leave_out_the_update_strategy() -> None:
    changed = make(update={"max_surge": 1, "canary": 2, "auto_rollback": False})
    assert "update" not in changed.runtime_fields()
    assert changed.runtime_fields() == make().runtime_fields()


def test_template_from_spec_carries_the_runtime_fields() -> None:
    spec = make(
        image="busybox",
        ports=["http"],
        health={"http": {"port": "http", "path": "/ready"}},
        restart={"policy": "on-failure"},
    )
    template = Template.from_spec(spec)
    assert template.image == "busybox"
    assert template.health == spec.health
    assert template.restart == spec.restart
    assert template.driver == "docker"
    assert Template.from_spec(make()).driver == "process"


def test_driver() -> None:
    assert make().driver == "process"
    assert make(image="busybox").driver == "docker"
    assert make(image="busybox", command=[]).driver == "docker"


# image ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        "busybox",
        "a",
        "busybox:1.36",
        "ghcr.io/org/app:v1.2.3",
        "localhost:5000/team/app",
        "app@sha256:" + "a" * 64,
        "my_app-2.0",
        "a" * 255,
    ],
)
def test_valid_images(image: str) -> None:
    assert make(image=image).image == image


@pytest.mark.parametrize(
    "image",
    ["", "Busybox", "-busybox", ".busybox", "busy box", "busybox\n", "app!", "a" * 256],
)
def test_invalid_images(image: str) -> None:
    assert locs(errors_of(image=image)) == ["image"]


# health ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("health", "port"),
    [
        ({"http": {"port": "http"}}, "http"),
        ({"http": {"port": 8080, "path": "/healthz"}}, 8080),
        ({"tcp": {"port": "admin"}}, "admin"),
        ({"tcp": {"port": 1}}, 1),
        ({"tcp": {"port": 65535}}, 65535),
        ({"exec": ["true"]}, None),
    ],
)
def test_each_kind_of_probe(health: dict[str, Any], port: int | str | None) -> None:
    spec = make(ports=["http", "admin"], health=health)
    assert spec.health is not None
    assert spec.health.port() == port


def test_health_defaults() -> None:
    health = Health.model_validate({"exec": ["true"]})
    assert (health.period, health.timeout, health.initial_delay) == (2.0, 1.0, 0.0)
    assert (health.failure_threshold, health.success_threshold) == (3, 1)
    http = Health.model_validate({"http": {"port": 80}})
    assert http.http is not None
    assert http.http.path == "/"


@pytest.mark.parametrize(
    ("health", "words"),
    [
        ({}, "exactly one probe of http, tcp or exec"),
        ({"http": {"port": 80}, "tcp": {"port": 80}}, "got http, tcp"),
        ({"tcp": {"port": 80}, "exec": ["true"]}, "got tcp, exec"),
        ({"http": {"port": 80}, "tcp": {"port": 80}, "exec": ["x"]}, "got http, tcp, exec"),
        ({"period": "5s"}, "exactly one probe"),
    ],
)
def test_health_needs_exactly_one_probe(health: dict[str, Any], words: str) -> None:
    errors = errors_of(health=health)
    assert locs(errors) == ["health"]
    assert words in errors[0]["msg"]


def test_health_port_name_must_be_declared() -> None:
    errors = errors_of(ports=["http"], health={"tcp": {"port": "admin"}})
    assert locs(errors) == [""]
    assert "health probe port 'admin' is not one of the declared ports (http)" in (errors[0]["msg"])


def test_health_port_name_without_any_ports() -> None:
    msg = errors_of(health={"http": {"port": "http"}})[0]["msg"]
    assert "none declared" in msg


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_health_port_number_range(port: int) -> None:
    msg = errors_of(health={"tcp": {"port": port}})[0]["msg"]
    assert f"health probe port {port} is not between 1 and 65535" in msg


@pytest.mark.parametrize(
    ("health", "where"),
    [
        ({"exec": []}, "health.exec"),
        ({"http": {"port": 80, "path": "healthz"}}, "health.http.path"),
        ({"http": {"port": 80, "host": "x"}}, "health.http.host"),
        ({"tcp": {}}, "health.tcp.port"),
        ({"exec": ["true"], "period": 0}, "health.period"),
        ({"exec": ["true"], "period": "0s"}, "health.period"),
        ({"exec": ["true"], "period": "2h"}, "health.period"),
        ({"exec": ["true"], "timeout": "soon"}, "health.timeout"),
        ({"exec": ["true"], "initial_delay": -1}, "health.initial_delay"),
        ({"exec": ["true"], "failure_threshold": 0}, "health.failure_threshold"),
        ({"exec": ["true"], "success_threshold": 1001}, "health.success_threshold"),
        ({"exec": ["true"], "retries": 3}, "health.retries"),
    ],
)
def test_bad_health_fields(health: dict[str, Any], where: str) -> None:
    assert locs(errors_of(health=health)) == [where]


def test_health_durations_read_units() -> None:
    spec = make(
        health={"exec": ["true"], "period": "500ms", "timeout": "2s", "initial_delay": "1m"}
    )
    assert spec.health is not None
    assert spec.health.period == 0.5
    assert spec.health.timeout == 2.0
    assert spec.health.initial_delay == 60.0


# restart --------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["always", "on-failure", "never"])
def test_restart_policies(policy: str) -> None:
    assert make(restart={"policy": policy}).restart.policy == policy


@pytest.mark.parametrize("policy", ["sometimes", "Always", "on_failure", ""])
def test_unknown_restart_policy_is_rejected(policy: str) -> None:
    assert locs(errors_of(restart={"policy": policy})) == ["restart.policy"]


@pytest.mark.parametrize(
    ("policy", "exit_code", "restarts"),
    [
        ("always", 0, True),
        ("always", 1, True),
        ("on-failure", 0, False),
        ("on-failure", 1, True),
        ("on-failure", -9, True),
        ("never", 0, False),
        ("never", 1, False),
    ],
)
def test_restarts_after(policy: str, exit_code: int, restarts: bool) -> None:
    assert Restart.model_validate({"policy": policy}).restarts_after(exit_code) is restarts


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (100, 60.0)],
)
def test_default_backoff_doubles_up_to_a_minute(failures: int, delay: float) -> None:
    assert Backoff().delay(failures) == delay


def test_backoff_with_durations_and_factor() -> None:
    backoff = Backoff.model_validate({"initial": "500ms", "factor": 3, "max": "5s"})
    assert [backoff.delay(n) for n in range(1, 5)] == [0.5, 1.5, 4.5, 5.0]
    assert isinstance(backoff.delay(1), float)


def test_backoff_factor_of_one_is_constant() -> None:
    backoff = Backoff(factor=1)
    assert {backoff.delay(n) for n in range(1, 20)} == {1.0}


@pytest.mark.parametrize(
    ("restart", "where"),
    [
        ({"backoff": {"initial": 0}}, "restart.backoff.initial"),
        ({"backoff": {"factor": 0.5}}, "restart.backoff.factor"),
        ({"backoff": {"max": "2d"}}, "restart.backoff.max"),
        ({"reset_after": -1}, "restart.reset_after"),
        ({"crash_loop": {"restarts": 0}}, "restart.crash_loop.restarts"),
        ({"crash_loop": {"window": "0s"}}, "restart.crash_loop.window"),
        ({"delay": 1}, "restart.delay"),
    ],
)
def test_bad_restart_fields(restart: dict[str, Any], where: str) -> None:
    assert locs(errors_of(restart=restart)) == [where]


def test_restart_durations_read_units() -> None:
    restart = make(restart={"reset_after": "5m", "crash_loop": {"window": "1m30s"}}).restart
    assert restart.reset_after == 300.0
    assert restart.crash_loop.window == 90.0
    assert restart.crash_loop.restarts == 5


# update ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [0, 1, 50, "0%", "25%", "100%", "12.5%", "5%"])
@pytest.mark.parametrize("field", ["max_surge", "max_unavailable"])
def test_valid_update_amounts(field: str, amount: int | str) -> None:
    assert getattr(make(update={field: amount}).update, field) == amount


@pytest.mark.parametrize(
    "amount", [-1, "101%", "100.5%", "1000%", "-5%", "25", "%", "25 %", "a%", "abc"]
)
@pytest.mark.parametrize("field", ["max_surge", "max_unavailable"])
def test_invalid_update_amounts(field: str, amount: int | str) -> None:
    assert locs(errors_of(update={field: amount})) == [f"update.{field}"]


def test_update_amount_messages() -> None:
    assert "must not be negative" in errors_of(update={"max_surge": -1})[0]["msg"]
    msg = errors_of(update={"max_unavailable": "101%"})[0]["msg"]
    assert "'101%' is neither a count nor a percentage from 0% to 100%" in msg


@pytest.mark.parametrize(
    ("amount", "desired", "surge"),
    [
        ("25%", 20, 5),
        ("25%", 3, 1),
        ("25%", 1, 1),
        ("25%", 0, 0),
        ("10%", 5, 1),
        ("12.5%", 8, 1),
        ("12.5%", 9, 2),
        ("100%", 7, 7),
        ("0%", 10, 0),
        (2, 10, 2),
        (50, 10, 50),
    ],
)
def test_surge_rounds_up(amount: int | str, desired: int, surge: int) -> None:
    assert Update(max_surge=amount).surge(desired) == surge


@pytest.mark.parametrize(
    ("amount", "desired", "unavailable"),
    [
        ("25%", 20, 5),
        ("25%", 3, 0),
        ("25%", 4, 1),
        ("50%", 5, 2),
        ("10%", 9, 0),
        ("100%", 7, 7),
        (2, 10, 2),
        (0, 10, 0),
    ],
)
def test_unavailable_rounds_down(amount: int | str, desired: int, unavailable: int) -> None:
    assert Update(max_unavailable=amount).unavailable(desired) == unavailable


@pytest.mark.parametrize(
    ("surge", "unavailable", "desired", "steps"),
    [
        ("25%", 0, 20, (5, 0)),
        ("25%", 0, 0, (1, 0)),
        (0, 0, 10, (1, 0)),
        ("0%", "10%", 5, (1, 0)),
        ("0%", "10%", 10, (0, 1)),
        (0, 1, 5, (0, 1)),
        (2, 3, 10, (2, 3)),
    ],
)
def test_steps(
    surge: int | str, unavailable: int | str, desired: int, steps: tuple[int, int]
) -> None:
    assert Update(max_surge=surge, max_unavailable=unavailable).steps(desired) == steps


@pytest.mark.parametrize("surge", [0, "0%", "10%", "25%", 1])
@pytest.mark.parametrize("unavailable", [0, "0%", "10%", "50%", 1])
def test_steps_are_never_both_zero(surge: int | str, unavailable: int | str) -> None:
    update = Update(max_surge=surge, max_unavailable=unavailable)
    for desired in range(0, 40):
        step_surge, step_unavailable = update.steps(desired)
        assert step_surge >= 0
        assert step_unavailable >= 0
        assert step_surge + step_unavailable > 0


def test_update_durations_read_units() -> None:
    update = make(update={"min_healthy": "500ms", "progress_deadline": "10m"}).update
    assert update.min_healthy == 0.5
    assert update.progress_deadline == 600.0


@pytest.mark.parametrize(
    ("update", "where"),
    [
        ({"min_healthy": -1}, "update.min_healthy"),
        ({"min_healthy": "2h"}, "update.min_healthy"),
        ({"progress_deadline": 0}, "update.progress_deadline"),
        ({"progress_deadline": "2d"}, "update.progress_deadline"),
        ({"canary": -1}, "update.canary"),
        ({"canary": MAX_REPLICAS + 1}, "update.canary"),
        ({"auto_rollback": "perhaps"}, "update.auto_rollback"),
        ({"strategy": "recreate"}, "update.strategy"),
    ],
)
def test_bad_update_fields(update: dict[str, Any], where: str) -> None:
    assert locs(errors_of(update=update)) == [where]


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
