"""Pure: the text after `/corral` -> a request, with the CLI's grammar.

deploy NAME                 the spec NAME.yaml (or .yml, .json) from the specs directory
deploy <YAML or JSON>       an inline spec (a code block works: ```name: web ...```)
scale NAME REPLICAS
status [NAME]
rollback NAME [--to REVISION]
events [NAME] [-n COUNT]
pipeline run NAME [KEY=VALUE ...]
approve RUN JOB             (also: pipeline approve RUN JOB)
help
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from corral.schemas.spec import DNS_LABEL

USAGE = {
    "deploy": "deploy NAME | deploy <inline YAML or JSON spec>",
    "scale": "scale NAME REPLICAS",
    "status": "status [NAME]",
    "rollback": "rollback NAME [--to REVISION]",
    "events": "events [NAME] [-n COUNT]",
    "pipeline": "pipeline run NAME [KEY=VALUE ...]",
    "approve": "approve RUN JOB",
    "help": "help",
}
VERBS = tuple(USAGE)
MUTATING = frozenset({"deploy", "scale", "rollback", "pipeline", "approve"})
_NAME = re.compile(DNS_LABEL)
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_EVENTS = 50


class Usage(Exception):
    """The text does not parse; the message says how to write it."""


@dataclass(frozen=True)
class Request:
    verb: str
    name: str = ""
    replicas: int = 0
    revision: int | None = None
    count: int = 10
    document: str = ""
    """an inline spec (deploy)"""
    job: str = ""
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.name


def help_text(command: str = "/corral") -> str:
    lines = [f"`{command} {USAGE[verb]}`" for verb in VERBS]
    return "Corral commands:\n" + "\n".join(lines)


def _usage(verb: str, why: str) -> Usage:
    return Usage(f"{why}. Usage: `{USAGE[verb]}`")


def _name(verb: str, value: str, what: str = "NAME") -> str:
    if not _NAME.match(value):
        raise _usage(verb, f"{what} {value!r} is not a valid name (lowercase letters, digits, '-')")
    return value


def parse(text: str) -> Request:
    text = text.strip()
    if not text:
        return Request("help")
    head, _, rest = text.partition(" ")
    verb = head.lower()
    if verb not in USAGE:
        raise Usage(f"unknown command {head!r}; try `help`. Commands: {', '.join(VERBS)}")
    if verb == "deploy":
        return _deploy(rest.strip())
    try:
        args = shlex.split(rest)
    except ValueError as exc:
        raise _usage(verb, f"cannot read the arguments ({exc})") from None
    if verb == "help":
        return Request("help")
    if verb == "scale":
        if len(args) != 2:
            raise _usage(verb, "scale takes a name and a replica count")
        if not args[1].isdigit():
            raise _usage(verb, f"REPLICAS must be a whole number, not {args[1]!r}")
        return Request("scale", name=_name(verb, args[0]), replicas=int(args[1]))
    if verb == "status":
        if len(args) > 1:
            raise _usage(verb, "status takes at most one name")
        return Request("status", name=_name(verb, args[0]) if args else "")
    if verb == "rollback":
        return _rollback(args)
    if verb == "events":
        return _events(args)
    if verb == "approve":
        return _approve(args)
    return _pipeline(args)


def _deploy(rest: str) -> Request:
    if not rest:
        raise _usage("deploy", "deploy needs a spec name or an inline spec")
    if rest.startswith("```") and rest.endswith("```") and len(rest) >= 6:
        body = rest[3:-3]
        first, newline, remainder = body.partition("\n")
        if newline and first.strip().lower() in ("yaml", "yml", "json"):
            body = remainder
        return Request("deploy", document=body.strip())
    if rest.startswith("{") or "\n" in rest or ":" in rest:
        return Request("deploy", document=rest)
    words = rest.split()
    if len(words) != 1:
        raise _usage("deploy", "deploy takes one spec name")
    return Request("deploy", name=_name("deploy", words[0]))


def _rollback(args: list[str]) -> Request:
    verb = "rollback"
    name = ""
    revision: int | None = None
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg in ("--to", "-t"):
            if not rest or not rest[0].isdigit() or int(rest[0]) < 1:
                raise _usage(verb, "--to takes a revision number (1 or more)")
            revision = int(rest.pop(0))
        elif arg.startswith("--to="):
            value = arg.removeprefix("--to=")
            if not value.isdigit() or int(value) < 1:
                raise _usage(verb, "--to takes a revision number (1 or more)")
            revision = int(value)
        elif not name:
            name = _name(verb, arg)
        else:
            raise _usage(verb, f"unexpected {arg!r}")
    if not name:
        raise _usage(verb, "rollback needs a service name")
    return Request(verb, name=name, revision=revision)


def _events(args: list[str]) -> Request:
    verb = "events"
    name = ""
    count = 10
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg in ("-n", "--limit"):
            if not rest or not rest[0].isdigit():
                raise _usage(verb, "-n takes a number")
            count = int(rest.pop(0))
        elif not name:
            name = _name(verb, arg)
        else:
            raise _usage(verb, f"unexpected {arg!r}")
    if not 1 <= count <= MAX_EVENTS:
        raise _usage(verb, f"-n must be between 1 and {MAX_EVENTS}")
    return Request(verb, name=name, count=count)


def _approve(args: list[str]) -> Request:
    if len(args) != 2:
        raise _usage("approve", "approve takes a run id and a job name")
    run, job = args
    if not _TOKEN.match(run) or not _TOKEN.match(job):
        raise _usage("approve", "the run id and job are letters, digits, '-' or '_'")
    return Request("approve", name=run, job=job)


def _pipeline(args: list[str]) -> Request:
    verb = "pipeline"
    if args[:1] == ["approve"]:
        return _approve(args[1:])
    if not args or args[0] != "run":
        raise _usage(verb, "pipeline takes `run` (or `approve`)")
    if len(args) < 2:
        raise _usage(verb, "pipeline run needs a pipeline name")
    name = _name(verb, args[1])
    variables: dict[str, str] = {}
    rest = args[2:]
    while rest:
        arg = rest.pop(0)
        if arg in ("-v", "--var"):
            if not rest:
                raise _usage(verb, f"{arg} takes KEY=VALUE")
            arg = rest.pop(0)
        key, sep, value = arg.partition("=")
        if not sep or not _VARIABLE.match(key):
            raise _usage(verb, f"variables are KEY=VALUE, not {arg!r}")
        variables[key] = value
    return Request("pipeline", name=name, variables=variables)
