"""Pure: may this chat user do this? Users (a Slack or Mattermost user id, or user name) have
roles; a role is a list of grants; a grant allows verbs on services chosen by name globs and
a label selector (or on pipelines by name globs).

```yaml
users:
  U024BE7LH: [release-managers]      # a Slack user id
  alice: [developers]                # or a user name
default_roles: [viewers]             # anyone else who is verified (optional)
roles:
  viewers:
    - verbs: [status, events]
  developers:
    - verbs: [status, events, deploy, scale, rollback]
      labels: {env: staging}
    - verbs: [pipeline]
      pipelines: ["ci-*"]
  release-managers:
    - verbs: ["*"]
```

Nothing is allowed without a grant; `help` needs none. A grant with `labels` matches a
service only when every label matches; `services` (globs, default `*`) narrows by name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.schemas.errors import InvalidInput, field_errors_from_pydantic

VERBS = frozenset({"deploy", "scale", "rollback", "status", "events", "pipeline", "approve"})
SERVICE_VERBS = frozenset({"deploy", "scale", "rollback", "status", "events"})


class Grant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    verbs: list[str] = Field(min_length=1)
    services: list[str] = Field(default_factory=lambda: ["*"], description="name globs")
    labels: dict[str, str] = Field(default_factory=dict, description="every label must match")
    pipelines: list[str] = Field(default_factory=lambda: ["*"], description="name globs")

    @field_validator("verbs")
    @classmethod
    def _verbs(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - VERBS - {"*"})
        if unknown:
            raise ValueError(
                f"unknown verb(s) {', '.join(unknown)}; use {', '.join(sorted(VERBS))} or *"
            )
        return value

    def covers_verb(self, verb: str) -> bool:
        return "*" in self.verbs or verb in self.verbs

    def covers_service(self, name: str, labels: Mapping[str, str]) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.services) and all(
            labels.get(k) == v for k, v in self.labels.items()
        )

    def covers_pipeline(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.pipelines)

    def describe(self) -> str:
        where = []
        if self.services != ["*"]:
            where.append("services " + ",".join(self.services))
        if self.labels:
            where.append("labels " + ",".join(f"{k}={v}" for k, v in self.labels.items()))
        return ",".join(self.verbs) + (f" on {' and '.join(where)}" if where else "")


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    users: dict[str, list[str]] = Field(default_factory=dict)
    default_roles: list[str] = Field(default_factory=list)
    roles: dict[str, list[Grant]] = Field(default_factory=dict)

    def check(self) -> None:
        """Every role a user holds must exist; a typo would silently deny."""
        named = {r for roles in self.users.values() for r in roles} | set(self.default_roles)
        missing = sorted(named - set(self.roles))
        if missing:
            raise InvalidInput(f"roles used but not defined: {', '.join(missing)}")

    def roles_of(self, *identities: str) -> list[str]:
        found: list[str] = []
        for identity in identities:
            for role in self.users.get(identity, []):
                if role not in found:
                    found.append(role)
        if not found:
            found = list(self.default_roles)
        return found


def parse_policy(document: Any) -> Policy:
    if document is None:
        return Policy()
    if not isinstance(document, dict):
        raise InvalidInput("the chat-ops RBAC document must be a mapping (users:, roles:)")
    try:
        policy = Policy.model_validate(document)
    except ValidationError as exc:
        raise InvalidInput("invalid chat-ops RBAC", field_errors_from_pydantic(exc)) from exc
    policy.check()
    return policy


@dataclass(frozen=True)
class Decision:
    allowed: bool
    roles: list[str]
    reason: str


def decide(
    policy: Policy,
    identities: list[str],
    verb: str,
    *,
    service: str = "",
    labels: Mapping[str, str] | None = None,
    pipeline: str = "",
) -> Decision:
    """Whether the user known by `identities` (id first, then name) may `verb` the target."""
    who = identities[-1] if identities else "?"
    roles = policy.roles_of(*identities)
    if verb == "help":
        return Decision(True, roles, "")
    if not roles:
        return Decision(
            False,
            roles,
            f"{who} has no chat-ops role; an admin can add {' or '.join(identities)} to the "
            "RBAC file's users",
        )
    labels = labels or {}
    grants = [g for role in roles for g in policy.roles.get(role, [])]
    verb_grants = [g for g in grants if g.covers_verb(verb)]
    for grant in verb_grants:
        if verb in SERVICE_VERBS and service and not grant.covers_service(service, labels):
            continue
        if verb in SERVICE_VERBS and not service and (grant.labels or grant.services != ["*"]):
            continue
        if verb == "pipeline" and not grant.covers_pipeline(pipeline):
            continue
        return Decision(True, roles, "")
    held = f"{who} (roles: {', '.join(roles)})"
    if not verb_grants:
        return Decision(False, roles, f"{held} may not {verb} anything")
    target = _target(verb, service, labels, pipeline)
    allowed = "; ".join(g.describe() for g in verb_grants)
    return Decision(False, roles, f"{held} may not {verb} {target}: allowed only {allowed}")


def _target(verb: str, service: str, labels: Mapping[str, str], pipeline: str) -> str:
    if verb == "pipeline":
        return f"pipeline {pipeline}"
    if not service:
        return "every service"
    shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return f"{service}" + (f" (labels {shown})" if shown else "")


def visible(
    policy: Policy, identities: list[str], verb: str, services: list[tuple[str, dict[str, str]]]
) -> list[str]:
    """The services (name, labels) the user may `verb` (status and events on many)."""
    return [
        name
        for name, labels in services
        if decide(policy, identities, verb, service=name, labels=labels).allowed
    ]
