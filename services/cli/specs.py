"""Reading spec files (YAML or JSON) into validated models, with errors a person can act on."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from corral.schemas.errors import FieldError, InvalidInput, field_errors_from_pydantic
from corral.schemas.spec import ServiceSpec


def read_document(path: str) -> Any:
    if path == "-":
        text, where = sys.stdin.read(), "standard input"
    else:
        file = Path(path)
        if not file.exists():
            raise InvalidInput(f"{path}: no such file")
        text, where = file.read_text(), path
    try:
        if path.endswith(".json"):
            return json.loads(text)
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise InvalidInput(f"{where} is not valid YAML or JSON: {exc}") from exc


def load_service_spec(path: str) -> ServiceSpec:
    document = read_document(path)
    if not isinstance(document, dict):
        raise InvalidInput(f"{path}: a service spec must be a mapping (name:, replicas:, ...)")
    try:
        return ServiceSpec.model_validate(document)
    except ValidationError as exc:
        errors = field_errors_from_pydantic(exc)
        raise InvalidInput(f"{path}: invalid service spec", errors) from exc


def describe(errors: list[FieldError]) -> list[str]:
    return [f"  {e.loc or '(spec)'}: {e.msg}" for e in errors]
