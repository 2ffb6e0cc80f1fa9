"""Pure: render a rule's `then` from the triggering event, in Jinja's sandbox.

Every string in `name`, `data` (recursively) and `notify` is a template. The context is
`event` (id, type, source, subject, time, correlation, data), `data` (the event's data),
`services` (name -> replicas, generation, revision, labels, image, command) and `rule`.
A string that is exactly one `{{ expression }}` keeps the expression's type, so
`"{{ services.web.replicas + 2 }}"` is the number 5, not the text "5". Undefined names are
errors (StrictUndefined), and so are oversized results: a template never crashes the worker,
it fails with a reason that says which field and why.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError, Undefined
from jinja2.sandbox import SandboxedEnvironment

from corral.schemas.errors import FieldError
from corral.schemas.rules import Then

MAX_TEXT = 64 * 1024
"""the longest string a template may produce"""
MAX_POWER = 1 << 64
_SINGLE = re.compile(r"^\s*\{\{(?P<expr>.*?)\}\}\s*$", re.DOTALL)


class TemplateFailure(Exception):
    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


class _Sandbox(SandboxedEnvironment):
    """The sandbox, plus bounds on `*` and `**`, which could otherwise build a huge string or
    number from a short template."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "**":
            numbers = isinstance(left, int | float) and isinstance(right, int | float)
            if numbers and (abs(right) > 64 or abs(left) > MAX_POWER):
                raise _TooLarge(f"{left!r} ** {right!r} is too large")
            return operator.pow(left, right)
        for seq, count in ((left, right), (right, left)):
            repeats = isinstance(seq, str | list | tuple) and isinstance(count, int)
            if repeats and len(seq) * count > MAX_TEXT:
                raise _TooLarge(f"a repetition of {len(seq) * count} items")
        return operator.mul(left, right)


class _TooLarge(TemplateError):
    pass


_ENV = _Sandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


@lru_cache(maxsize=4096)
def _compiled(source: str) -> Callable[..., Any]:
    single = _SINGLE.match(source)
    if single and "{{" not in single["expr"] and "{%" not in single["expr"]:
        return _ENV.compile_expression(single["expr"], undefined_to_none=False)
    return _ENV.from_string(source).render


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


def render_value(value: Any, context: dict[str, Any], where: str) -> Any:
    """`value` with every template string in it rendered; TemplateFailure names the field."""
    if isinstance(value, str):
        if not is_template(value):
            return value
        try:
            result = _compiled(value)(**context)
            if isinstance(result, Undefined):
                str(result)  # StrictUndefined raises with the missing name
            result = _plain(result)
        except TemplateError as exc:
            raise TemplateFailure([FieldError(where, f"{value!r}: {exc.message or exc}")]) from None
        except Exception as exc:  # an error inside the expression (1/0, int('x'))
            raise TemplateFailure(
                [FieldError(where, f"{value!r}: {exc.__class__.__name__}: {exc}")]
            ) from None
        if isinstance(result, str) and len(result) > MAX_TEXT:
            raise TemplateFailure([FieldError(where, f"renders {len(result)} characters")])
        return result
    if isinstance(value, dict):
        return {k: render_value(v, context, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, context, f"{where}.{i}") for i, v in enumerate(value)]
    return value


def _plain(value: Any) -> Any:
    """JSON-friendly: a template may produce only what a command's data can hold."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return str(value)  # Markup and other str subclasses become plain text
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


@dataclass(frozen=True)
class Rendered:
    resource: str | None
    name: str | None
    verb: str | None
    data: dict[str, Any]
    text: str | None = None
    channel: str | None = None


def render(then: Then, context: dict[str, Any]) -> Rendered:
    if then.notify is not None:
        text = render_value(then.notify.text, context, "then.notify.text")
        channel = render_value(then.notify.channel, context, "then.notify.channel")
        return Rendered(
            None, None, None, {}, text=str(text), channel=None if channel is None else str(channel)
        )
    name = render_value(then.name, context, "then.name")
    data = render_value(then.data, context, "then.data")
    return Rendered(then.resource, None if name is None else str(name), then.verb, data)


def check(then: Then) -> list[FieldError]:
    """Syntax errors in a rule's templates, found when the rule is applied."""
    errors: list[FieldError] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, str) and is_template(value):
            try:
                _compiled(value)
            except TemplateError as exc:
                errors.append(FieldError(where, f"{value!r}: {exc.message or exc}"))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}.{i}")

    walk(then.name, "then.name")
    walk(then.data, "then.data")
    if then.notify is not None:
        walk(then.notify.text, "then.notify.text")
        walk(then.notify.channel, "then.notify.channel")
    return errors
