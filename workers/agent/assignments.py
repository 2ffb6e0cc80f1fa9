"""Reading a node's assignments, with each distinct template validated once. Pure: no I/O.

The replicas of a service carry the same template, and a node is assigned many at once: a
100,000-replica deploy of 1,000 services brings 100,000 assignments and 1,000 templates.
Validating the template of every one was a tenth of the agents' process. The deployer writes
an assignment's template as its JSON between `"template":` and `,"correlation":`; a text seen
before is the template validated then, and the rest of the record is validated as usual.
Anything else (another field order, a template that does not parse, a record that fails) is
validated whole, so a bad record gets the same error as ever.

Why the splice is safe: inside a JSON string every quote is escaped, so `"template":` there
is the key of an object, and Assignment has no object before its template. A text between it
and the first `,"correlation":` that validates as a Template is a whole JSON object, and an
object's first brace closes at one place only: the template's end. The rest, with `null` in
the template's place, must validate with a template of null: another `"template"` key left
there fails that, and the record is then validated whole.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError, create_model

from corral.schemas.state import Assignment, Template

KEEP = 1024
"""distinct templates remembered (the oldest is forgotten first)"""
_KEY = b'"template":'
_NEXT = b',"correlation":'

_Head: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "AssignmentWithoutTemplate",
    __config__=Assignment.model_config,
    **{  # in Assignment's order, which its JSON keeps
        name: ((type(None), None) if name == "template" else (field.annotation, field))
        for name, field in Assignment.model_fields.items()
    },
)
_PLAIN = Assignment.model_config.get("extra") in (None, "ignore") and not (
    Assignment.__private_attributes__
)
"""no extra fields and no private attributes: a validated head's values are all there is"""


def _assemble(head: BaseModel, template: Template) -> Assignment:
    """An Assignment of already validated parts, as `model_construct` builds it (which costs
    more than validating the head: it looks at aliases and defaults once more per field)."""
    values: dict[str, Any] = dict(head.__dict__)
    values["template"] = template
    fields_set = head.model_fields_set | {"template"}
    if not _PLAIN:
        return Assignment.model_construct(fields_set, **values)
    made = Assignment.__new__(Assignment)
    object.__setattr__(made, "__dict__", values)
    object.__setattr__(made, "__pydantic_fields_set__", fields_set)
    object.__setattr__(made, "__pydantic_extra__", None)
    object.__setattr__(made, "__pydantic_private__", None)
    return made


class AssignmentReader:
    """`reader(raw)` is `Assignment.model_validate_json(raw)`, cheaper for a known template."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._templates: dict[bytes, Template] = {}
        self.validated = 0
        """templates validated (for tests: one per distinct template)"""

    def __call__(self, raw: bytes) -> Assignment:
        at = raw.find(_KEY)
        if at < 0:
            return Assignment.model_validate_json(raw)
        start = at + len(_KEY)
        end = raw.find(_NEXT, start)
        if end < 0:
            return Assignment.model_validate_json(raw)
        text = raw[start:end]
        template = self._templates.get(text)
        if template is None:
            try:
                template = Template.model_validate_json(text)
            except ValidationError:
                return Assignment.model_validate_json(raw)  # its own error, or a wrong splice
            self.validated += 1
            if len(self._templates) >= self.keep:
                del self._templates[next(iter(self._templates))]
            self._templates[text] = template
        try:
            head = _Head.model_validate_json(raw[:start] + b"null" + raw[end:])
        except ValidationError:
            return Assignment.model_validate_json(raw)
        return _assemble(head, template)
