"""Pure: what a rule sends. The rendered command is checked before it goes out, so that a
template which renders nonsense fails as the rule's error (`rule.<name>.failed`) rather than
as someone else's rejected command; and its id carries the mark that keeps rules from
firing on what they caused."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pydantic import ValidationError

from corral.schemas.commands import COMMANDS, OWNERS
from corral.schemas.errors import FieldError, field_errors_from_pydantic
from corral.workers.rules.matching import RULE_MARK, rules_marked
from corral.workers.rules.templating import Rendered, TemplateFailure

NAME = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
MAX_ID = 240
REQUESTED_BY = "corral-requested-by"


def requested_by(rule: str) -> str:
    return f"rule:{rule}"


def command_id(trigger: str, rule: str) -> str:
    """`<trigger id>.rule.<name>`, so `corral events --trace <trigger>` follows the chain and
    whatever the command causes carries the mark. An overlong trigger id is hashed, keeping
    the marks it carried."""
    candidate = f"{trigger}{RULE_MARK}{rule}"
    if len(candidate) <= MAX_ID and not any(c.isspace() for c in candidate):
        return candidate
    digest = hashlib.sha256(trigger.encode()).hexdigest()[:32]
    marks = "".join(f"{RULE_MARK}{name}" for name in rules_marked(trigger))
    return f"h{digest}{marks}{RULE_MARK}{rule}"[-MAX_ID:]


def command_data(rule: str, rendered: Rendered) -> dict[str, Any]:
    """The data to send, validated where Corral knows the command's schema; TemplateFailure
    otherwise, naming what is wrong."""
    resource, name, verb = rendered.resource, rendered.name, rendered.verb
    assert resource is not None
    assert verb is not None
    if name is None or not NAME.match(name):
        raise TemplateFailure(
            [FieldError("then.name", f"renders {name!r}: use letters, digits, '-' or '_'")]
        )
    if resource not in OWNERS:
        known = ", ".join(sorted(OWNERS))
        raise TemplateFailure([FieldError("then.resource", f"unknown {resource!r}; use {known}")])
    data = dict(rendered.data)
    if resource == "pipeline" and verb == "run":
        data.setdefault("spec", None)
        variables = data.get("variables") or {}
        if not isinstance(variables, dict):
            raise TemplateFailure([FieldError("then.data.variables", "must be a mapping")])
        data["variables"] = {str(k): _text(v) for k, v in variables.items()}
        data.setdefault("requested_by", requested_by(rule))
    elif resource in ("pipeline", "run") and verb in ("cancel", "retry"):
        data.setdefault("requested_by", requested_by(rule))
    models = COMMANDS.get(resource)
    if models is not None:
        model = models.get(verb)
        if model is None:
            verbs = ", ".join(sorted(models))
            raise TemplateFailure([FieldError("then.verb", f"{resource} has no {verb!r}: {verbs}")])
        try:
            model.model_validate(data)
        except ValidationError as exc:
            raise TemplateFailure(
                [
                    FieldError(f"then.data.{e.loc}" if e.loc else "then.data", e.msg)
                    for e in field_errors_from_pydantic(exc)
                ]
            ) from None
    return data


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)
