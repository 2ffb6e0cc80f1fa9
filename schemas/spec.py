"""The service spec: what a user asks Corral to run.

Later capabilities (image, health, restart, update, autoscale, richer placement) add optional
fields here; every model forbids unknown fields so that a typo is an error, not a silent no-op.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from corral.schemas.quantities import parse_bytes, parse_cpu

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


class Placement(StrictModel):
    node_selector: dict[LabelKey, str] = Field(
        default_factory=dict, description="labels a node must carry, all of them"
    )


class ServiceSpec(StrictModel):
    """A replicated service. Replicas run as local processes (`command`)."""

    name: ServiceName
    replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    command: list[str] = Field(min_length=1, description="argv; ${PORT} and ${PORT_<NAME>} expand")
    env: dict[str, str] = Field(default_factory=dict)
    ports: list[PortName] = Field(
        default_factory=list, description="each named port gets a free TCP port per replica"
    )
    resources: Resources = Field(default_factory=Resources)
    placement: Placement = Field(default_factory=Placement)
    labels: dict[LabelKey, str] = Field(default_factory=dict)
    stop_grace_period: float = Field(
        default=10.0, ge=0, le=3600, description="seconds between SIGTERM and SIGKILL"
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
            include={"command", "env", "ports", "resources", "stop_grace_period"}
        )


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
