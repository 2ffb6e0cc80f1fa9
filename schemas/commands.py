"""Commands: what callers ask for. Each travels on `<prefix>.cmd.<resource>.<name>.<verb>`
with the CloudEvents type `io.corral.<resource>.<verb>`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from corral.schemas.spec import MAX_REPLICAS, ServiceSpec

TYPE_PREFIX = "io.corral."


class ScaleCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    replicas: int = Field(ge=0, le=MAX_REPLICAS)


class DeleteCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# resource -> verb -> the model its data must validate against
COMMANDS: dict[str, dict[str, type[BaseModel]]] = {
    "service": {
        "deploy": ServiceSpec,
        "scale": ScaleCommand,
        "delete": DeleteCommand,
    },
}


def command_type(resource: str, verb: str) -> str:
    return f"{TYPE_PREFIX}{resource}.{verb}"
