"""The CloudEvents 1.0 envelope that every command and event travels in."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

SPECVERSION = "1.0"
TYPE_PREFIX = "io.corral."
"""the CloudEvents types Corral owns: `io.corral.<resource>.<verb>`, `io.corral.<kind>.<what>`"""
_SPACE = re.compile(r"\s")


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class CloudEvent(BaseModel):
    """A CloudEvent. `correlation` is the id of the command that started the chain."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(default_factory=new_id, min_length=1, max_length=256)
    source: str = Field(min_length=1)
    type: str = Field(min_length=1)
    specversion: str = SPECVERSION
    subject: str | None = None
    time: datetime | None = Field(default_factory=utcnow)
    datacontenttype: str | None = "application/json"
    data: Any = None
    correlation: str | None = None
    traceparent: str | None = None

    @field_validator("specversion")
    @classmethod
    def _version(cls, value: str) -> str:
        if value != SPECVERSION:
            raise ValueError(f"unsupported CloudEvents specversion {value!r}; use {SPECVERSION}")
        return value

    @field_validator("id")
    @classmethod
    def _id_chars(cls, value: str) -> str:
        if _SPACE.search(value):
            raise ValueError("id must not contain white space")
        return value
