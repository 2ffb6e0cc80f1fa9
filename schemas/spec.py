"""The service spec: what a user asks Corral to run.

Later capabilities (image, health, restart, update, autoscale, richer placement) add optional
fields here; every model forbids unknown fields so that a typo is an error, not a silent no-op.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from corral.schemas.autoscale import Autoscale
from corral.schemas.quantities import parse_bytes, parse_cpu, parse_duration

DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
ServiceName = Annotated[
    str,
    Field(
        pattern=DNS_LABEL,
        max_length=63,
        description="A DNS label: lowercase letters, digits and '-', 1-63 characters",
    ),
]
PortName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,14}$")]
LabelKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9_.\-/]{0,61}[A-Za-z0-9])?$")]
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_REPLICAS = 10_000
Duration = Annotated[float, BeforeValidator(parse_duration)]
"""seconds; a number, or a text such as 500ms, 5s, 5m, 1h"""
ProbePort = Annotated[
    int | str,
    Field(description="a port name from `ports`, or a port number (1-65535)"),
]
IMAGE_REFERENCE = r"^[a-z0-9][a-z0-9._\-/:@]{0,254}$"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(BaseModel):
    """What one replica needs. `cpu` in cores, `memory` in bytes; any other key is a countable
    resource that nodes may advertise (for example `gpu`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    cpu: float = Field(default=0.0, description="cores; 0.5 or '500m'")
    memory: int = Field(default=0, description="bytes; 67108864 or '64Mi'")

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, value: Any) -> float:
        return parse_cpu(value)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int:
        return parse_bytes(value)

    @model_validator(mode="after")
    def _extras_are_counts(self) -> Resources:
        for key, value in (self.model_extra or {}).items():
            if not re.fullmatch(r"[a-z][a-z0-9_.\-/]{0,62}", key):
                raise ValueError(f"resource name {key!r} is not valid")
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"resource {key!r} must be a finite, non-negative number")
        return self

    def as_dict(self) -> dict[str, float]:
        out = {"cpu": float(self.cpu), "memory": float(self.memory)}
        for key, value in (self.model_extra or {}).items():
            out[key] = float(value)
        return out


class Affinity(StrictModel):
    """One node_affinity expression; a node must meet all of them."""

    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list, max_length=100)

    @model_validator(mode="after")
    def _values_fit_operator(self) -> Affinity:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"node_affinity {self.key} {self.operator} needs `values`")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"node_affinity {self.key} {self.operator} takes no `values`")
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        inside = labels.get(self.key) in self.values
        return inside if self.operator == "In" else not inside


class Preference(StrictModel):
    """A soft rule: nodes labelled `label=value` are tried first, the heavier the weight the
    sooner."""

    label: LabelKey
    value: str
    weight: int = Field(default=1, ge=1, le=100)


class Placement(StrictModel):
    """Where replicas may go (hard rules) and where they had better go (soft rules)."""

    node_selector: dict[LabelKey, str] = Field(
        default_factory=dict, description="labels a node must carry, all of them"
    )
    node_affinity: list[Affinity] = Field(
        default_factory=list,
        max_length=32,
        description="expressions (In, NotIn, Exists, DoesNotExist) a node must meet, all of them",
    )
    max_per_node: int | None = Field(
        default=None, ge=1, le=MAX_REPLICAS, description="at most this many replicas on one node"
    )
    avoid: list[Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]] = Field(
        default_factory=list,
        max_length=32,
        description="services whose replicas must not share a node with this one's",
    )
    spread_by: LabelKey | None = Field(
        default=None,
        description="a node label (zone, rack): replicas spread evenly over its values",
    )
    prefer: list[Preference] = Field(
        default_factory=list, max_length=32, description="soft: nodes to try first"
    )
    strategy: Literal["spread", "binpack"] = Field(
        default="spread",
        description="spread: even over nodes; binpack: fill the fullest nodes first",
    )
    priority: int = Field(
        default=0, ge=-1000, le=1000, description="higher is placed first in a batch"
    )

    @field_validator("avoid")
    @classmethod
    def _avoid_unique(cls, avoid: list[str]) -> list[str]:
        if len(set(avoid)) != len(avoid):
            raise ValueError("avoid lists a service twice")
        return avoid


class HttpProbe(StrictModel):
    path: str = Field(default="/", pattern=r"^/", description="answered with a 2xx or 3xx")
    port: ProbePort


class TcpProbe(StrictModel):
    port: ProbePort


class Health(StrictModel):
    """One probe, run by the agent for processes and containers alike (Docker's HEALTHCHECK is
    not used). A replica is healthy after `success_threshold` passes in a row, and unhealthy
    (then restarted) after `failure_threshold` failures in a row."""

    http: HttpProbe | None = None
    tcp: TcpProbe | None = None
    exec: list[str] | None = Field(default=None, min_length=1, description="exit 0 passes")
    period: Duration = Field(default=2.0, gt=0, le=3600)
    timeout: Duration = Field(default=1.0, gt=0, le=3600)
    initial_delay: Duration = Field(default=0.0, ge=0, le=3600)
    failure_threshold: int = Field(default=3, ge=1, le=1000)
    success_threshold: int = Field(default=1, ge=1, le=1000)

    @model_validator(mode="after")
    def _one_probe(self) -> Health:
        given = [k for k in ("http", "tcp", "exec") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "health needs exactly one probe of http, tcp or exec"
                + (f"; got {', '.join(given)}" if given else "")
            )
        return self

    def port(self) -> int | str | None:
        if self.http is not None:
            return self.http.port
        if self.tcp is not None:
            return self.tcp.port
        return None


class Backoff(StrictModel):
    initial: Duration = Field(default=1.0, gt=0, le=3600)
    factor: float = Field(default=2.0, ge=1, le=100)
    max: Duration = Field(default=60.0, gt=0, le=86400)

    def delay(self, failures: int) -> float:
        """The wait before restart number `failures` (1 for the first), without jitter."""
        return float(min(self.max, self.initial * self.factor ** max(0, failures - 1)))


class CrashLoop(StrictModel):
    restarts: int = Field(default=5, ge=1, le=1000, description="restarts within `window`")
    window: Duration = Field(default=60.0, gt=0, le=86400)


class Restart(StrictModel):
    policy: Literal["always", "on-failure", "never"] = "always"
    backoff: Backoff = Field(default_factory=Backoff)
    reset_after: Duration = Field(
        default=60.0, ge=0, le=86400, description="healthy this long, the backoff starts over"
    )
    crash_loop: CrashLoop = Field(default_factory=CrashLoop)

    def restarts_after(self, exit_code: int) -> bool:
        if self.policy == "always":
            return True
        return self.policy == "on-failure" and exit_code != 0


Amount = Annotated[
    int | str, Field(description="a number of replicas, or a percentage of the desired count")
]


def _amount(value: int | str, desired: int, *, round_up: bool) -> int:
    if isinstance(value, int):
        return value
    percent = float(value.rstrip("%"))
    share = desired * percent / 100
    return math.ceil(share) if round_up else math.floor(share)


class Update(StrictModel):
    """How a changed spec rolls out. New replicas stay ready for `min_healthy` before old ones
    stop."""

    max_surge: Amount = "25%"
    max_unavailable: Amount = 0
    min_healthy: Duration = Field(default=5.0, ge=0, le=3600)
    progress_deadline: Duration = Field(default=300.0, gt=0, le=86400)
    auto_rollback: bool = True
    canary: int = Field(
        default=0, ge=0, le=MAX_REPLICAS, description="start this many new replicas and wait"
    )

    @field_validator("max_surge", "max_unavailable")
    @classmethod
    def _amount_valid(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 0:
                raise ValueError("must not be negative")
            return value
        if not re.fullmatch(r"[0-9]{1,3}(\.[0-9]+)?%", value) or float(value[:-1]) > 100:
            raise ValueError(f"{value!r} is neither a count nor a percentage from 0% to 100%")
        return value

    def surge(self, desired: int) -> int:
        return _amount(self.max_surge, desired, round_up=True)

    def unavailable(self, desired: int) -> int:
        return _amount(self.max_unavailable, desired, round_up=False)

    def steps(self, desired: int) -> tuple[int, int]:
        """(surge, unavailable) for `desired`; never both zero, so a rollout always moves."""
        surge, unavailable = self.surge(desired), self.unavailable(desired)
        if surge == 0 and unavailable == 0:
            surge = 1
        return surge, unavailable


class ServiceSpec(StrictModel):
    """A replicated service. Replicas run as containers (`image`) or local processes
    (`command` without `image`)."""

    name: ServiceName
    replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    image: str | None = Field(
        default=None,
        pattern=IMAGE_REFERENCE,
        description="a container image; replicas then run on nodes with Docker",
    )
    command: list[str] = Field(
        default_factory=list,
        description="argv; ${PORT} and ${PORT_<NAME>} expand. Required without `image`; with "
        "one, it replaces the image's command",
    )
    env: dict[str, str] = Field(default_factory=dict)
    ports: list[PortName] = Field(
        default_factory=list, description="each named port gets a free TCP port per replica"
    )
    resources: Resources = Field(default_factory=Resources)
    placement: Placement = Field(default_factory=Placement)
    labels: dict[LabelKey, str] = Field(default_factory=dict)
    stop_grace_period: Duration = Field(
        default=10.0, ge=0, le=3600, description="seconds between SIGTERM and SIGKILL"
    )
    health: Health | None = None
    restart: Restart = Field(default_factory=Restart)
    update: Update = Field(default_factory=Update)
    autoscale: Autoscale | None = Field(
        default=None,
        description="scale `replicas` between min and max by metrics; changing it rolls nothing",
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"environment variable name {key!r} is not valid")
        return env

    @field_validator("ports")
    @classmethod
    def _unique_ports(cls, ports: list[str]) -> list[str]:
        if len(set(ports)) != len(ports):
            raise ValueError("port names must be unique")
        return ports

    @model_validator(mode="after")
    def _avoid_others(self) -> ServiceSpec:
        if self.name in self.placement.avoid:
            raise ValueError(
                "placement.avoid names the service itself; use placement.max_per_node: 1"
            )
        return self

    @model_validator(mode="after")
    def _runnable(self) -> ServiceSpec:
        if not self.command and self.image is None:
            raise ValueError("a service needs a `command`, an `image`, or both")
        port = self.health.port() if self.health is not None else None
        if isinstance(port, str) and port not in self.ports:
            raise ValueError(
                f"health probe port {port!r} is not one of the declared ports "
                f"({', '.join(self.ports) or 'none declared'})"
            )
        if isinstance(port, int) and not 1 <= port <= 65535:
            raise ValueError(f"health probe port {port} is not between 1 and 65535")
        return self

    @model_validator(mode="after")
    def _variables_resolve(self) -> ServiceSpec:
        known = port_variables(self.ports)
        for where, text in [("command", arg) for arg in self.command] + [
            (f"env.{key}", value) for key, value in self.env.items()
        ]:
            for name in _VARIABLE.findall(text):
                if name not in known and not name.startswith("CORRAL_"):
                    hint = "declare a port in `ports`" if name.startswith("PORT") else ""
                    raise ValueError(
                        f"{where} refers to ${{{name}}}, which is not defined"
                        + (f"; {hint}" if hint else "")
                    )
        return self

    def runtime_fields(self) -> dict[str, Any]:
        """The part of the spec a replica runs with; a change here means new replicas."""
        return self.model_dump(
            include={
                "image",
                "command",
                "env",
                "ports",
                "resources",
                "stop_grace_period",
                "health",
                "restart",
            }
        )

    @property
    def driver(self) -> str:
        """The kind of node runtime the replicas need."""
        return "docker" if self.image is not None else "process"


def port_variables(ports: list[str]) -> set[str]:
    names = {f"PORT_{port.upper().replace('-', '_')}" for port in ports}
    if ports:
        names.add("PORT")
    return names


def expand(text: str, variables: dict[str, str]) -> str:
    """Replace ${NAME} with its value; unknown names stay as written."""
    return _VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), text)


def port_environment(ports: list[str], numbers: list[int]) -> dict[str, str]:
    """PORT (the first) and PORT_<NAME> for each named port."""
    out: dict[str, str] = {}
    for index, (port, number) in enumerate(zip(ports, numbers, strict=True)):
        if index == 0:
            out["PORT"] = str(number)
        out[f"PORT_{port.upper().replace('-', '_')}"] = str(number)
    return out
