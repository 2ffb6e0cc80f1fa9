"""Automation rules: when an event matches, send a command (or a chat notification) whose
fields are templated from the event; with a cooldown and a rate limit per rule.

```yaml
name: scale-on-latency
when:
  type: io.corral.ext.alertmanager.firing     # a glob on the CloudEvent type
  subject: ext.alertmanager.*                 # a glob on the bus subject, without `<prefix>.evt.`
  match: {data.labels.alertname: HighLatency, data.labels.service: /^web(-.*)?$/}
then:
  resource: service
  name: web
  verb: scale
  data: {replicas: "{{ services.web.replicas + 2 }}"}
cooldown: 5m
rate_limit: {count: 3, per: 1h}
```
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from corral.schemas.events import EventData
from corral.schemas.spec import DNS_LABEL, Duration

RESOURCE = r"^[a-z][a-z0-9_-]{0,62}$"
MAX_RECENT = 64
"""how many recent triggering event ids a rule's state keeps, so a redelivered event acts once"""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def is_regex(value: Any) -> bool:
    return isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == "/"


class When(StrictModel):
    type: str = Field(default="*", min_length=1, max_length=256, description="glob on ce-type")
    subject: str = Field(
        default="*",
        min_length=1,
        max_length=256,
        description="glob on the bus subject without `<prefix>.evt.`, e.g. `ext.github.push`",
    )
    match: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted path in the event (id, type, source, subject, time, data...) -> "
        "a value, a list of values (any of), or a /regex/",
    )

    @field_validator("match")
    @classmethod
    def _match(cls, value: dict[str, Any]) -> dict[str, Any]:
        for path, expected in value.items():
            if not path or any(not part for part in path.split(".")):
                raise ValueError(f"match path {path!r} must be dotted names, e.g. data.ref")
            for item in expected if isinstance(expected, list) else [expected]:
                if isinstance(item, dict | list):
                    raise ValueError(f"match {path}: compare with scalars, not {item!r}")
                if is_regex(item):
                    try:
                        re.compile(item[1:-1])
                    except re.error as exc:
                        raise ValueError(f"match {path}: bad regex {item}: {exc}") from None
        return value


class Notify(StrictModel):
    text: str = Field(min_length=1, max_length=4000, description="a template")
    channel: str | None = Field(default=None, max_length=200, description="a template")


class Then(StrictModel):
    """A command `<resource>.<name>.<verb>` with `data`, or a chat notification. Every string
    in name and data is a template (Jinja, sandboxed) over the triggering event."""

    resource: str | None = Field(default=None, pattern=RESOURCE)
    name: str | None = Field(default=None, min_length=1, max_length=500)
    verb: str | None = Field(default=None, pattern=RESOURCE)
    data: dict[str, Any] = Field(default_factory=dict)
    notify: Notify | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Then:
        command = (self.resource, self.name, self.verb)
        if self.notify is not None:
            if any(part is not None for part in command) or self.data:
                raise ValueError("then: either a command (resource, name, verb, data) or notify")
        elif any(part is None for part in command):
            raise ValueError("then: a command needs resource, name and verb (or use notify)")
        return self

    @property
    def is_command(self) -> bool:
        return self.notify is None


class RateLimit(StrictModel):
    count: int = Field(ge=1, le=1000)
    per: Duration = Field(gt=0, le=30 * 86400)


class Rule(StrictModel):
    name: str = Field(pattern=DNS_LABEL, max_length=63)
    description: str = Field(default="", max_length=1000)
    enabled: bool = True
    when: When = Field(default_factory=When)
    then: Then
    cooldown: Duration = Field(default=0.0, ge=0, le=30 * 86400, description="between firings")
    rate_limit: RateLimit | None = None


class RuleRecord(BaseModel):
    """A stored rule. Owner: the rules worker. Key: the rule's name."""

    model_config = ConfigDict(frozen=True)

    rule: Rule
    generation: int = Field(ge=1)
    command_id: str
    requested_by: str | None = None
    updated_at: datetime


class Firing(BaseModel):
    model_config = ConfigDict(frozen=True)

    trigger: str
    at: float = Field(description="seconds since the epoch")
    command_id: str = ""


class RuleState(BaseModel):
    """When a rule last fired, for its cooldown and rate limit, shared by every copy of the
    rules worker. Owner: the rules worker (compare-and-set). Key: the rule's name."""

    model_config = ConfigDict(frozen=True)

    firings: list[Firing] = Field(
        default_factory=list, description=f"the last firings, oldest first (at most {MAX_RECENT})"
    )


class RuleDelete(StrictModel):
    """`<prefix>.cmd.rule.<name>.delete`, data `{}`."""


# events ---------------------------------------------------------------------------------------
class RuleFired(EventData):
    """`rule.<name>.fired`: the rule matched an event and sent its command or notification."""

    rule: str
    trigger: str = Field(description="the triggering event's id")
    trigger_type: str
    action: str = Field(description="`<resource> <verb> <name>`, or `notify`")
    command_id: str = ""
    command: dict[str, Any] = Field(default_factory=dict, description="the rendered command")


class RuleSkipped(EventData):
    """`rule.<name>.skipped`: the rule matched, but its cooldown or rate limit held it back."""

    rule: str
    trigger: str
    trigger_type: str
    reason: str
    retry_after: float = 0.0


class RuleFailed(EventData):
    """`rule.<name>.failed`: a template did not render, or rendered an invalid command."""

    rule: str
    trigger: str
    trigger_type: str
    reason: str
    errors: list[dict[str, str]] = Field(default_factory=list)


class RuleNotification(EventData):
    """`rule.<name>.notify`: a chat message for the notifier to post."""

    rule: str
    trigger: str
    text: str
    channel: str | None = None
