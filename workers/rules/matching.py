"""Pure: does an event match a rule's `when`? Globs on the type and the subject, and dotted
paths into the event compared with values, lists of values (any of) or /regexes/."""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache
from typing import Any

from corral.schemas.envelope import CloudEvent
from corral.schemas.rules import Rule, When, is_regex

MISSING = object()
RULE_MARK = ".rule."


def event_document(event: CloudEvent) -> dict[str, Any]:
    """What match paths and templates see: `event.<attribute>` and `data`."""
    return {
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "subject": event.subject,
        "time": event.time.isoformat() if event.time else None,
        "correlation": event.correlation,
        "data": event.data,
    }


def lookup(document: Any, path: str) -> Any:
    """The value at a dotted path (list items by index), or MISSING."""
    value = document
    for part in path.split("."):
        if isinstance(value, dict):
            if part not in value:
                return MISSING
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return MISSING
    return value


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def value_matches(actual: Any, expected: Any) -> bool:
    if isinstance(expected, list):
        return any(value_matches(actual, item) for item in expected)
    if actual is MISSING:
        return False
    if is_regex(expected):
        if isinstance(actual, dict | list) or actual is None:
            return False
        text = _text(actual)
        return _regex(expected[1:-1]).search(text) is not None
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        return expected == actual
    if expected is None or actual is None:
        return expected is actual
    # YAML and label values blur numbers and text: 500 matches "500", both ways
    return isinstance(actual, str | int | float) and _text(actual) == _text(expected)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def when_matches(when: When, subject: str, document: dict[str, Any]) -> bool:
    """`subject` is the bus subject without `<prefix>.evt.`."""
    if not fnmatch.fnmatchcase(str(document.get("type") or ""), when.type):
        return False
    if not fnmatch.fnmatchcase(subject, when.subject):
        return False
    return all(value_matches(lookup(document, path), want) for path, want in when.match.items())


def caused_by(rule: str, subject: str, document: dict[str, Any]) -> bool:
    """True for the rule's own events and anything its commands caused, so that a rule never
    fires on itself: subjects `rule.<name>.*`, and ids or correlations that carry the mark
    `.rule.<name>` its command ids carry."""
    if subject.startswith(f"rule.{rule}."):
        return True
    return any(
        rule in rules_marked(chain) for chain in (document.get("id"), document.get("correlation"))
    )


def rules_marked(chain: Any) -> list[str]:
    """The rule names that follow `.rule.` in an id (`x.rule.a.accepted.rule.b` -> [a, b])."""
    if not isinstance(chain, str):
        return []
    return [piece.split(".", 1)[0] for piece in chain.split(RULE_MARK)[1:]]


def fires(rule: Rule, subject: str, document: dict[str, Any]) -> bool:
    return (
        rule.enabled
        and not caused_by(rule.name, subject, document)
        and when_matches(rule.when, subject, document)
    )
