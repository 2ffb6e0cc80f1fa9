"""Pure: API tokens and their scopes. A token is configured as `name:token:scope`; scopes are
ordered, so admin implies deploy and deploy implies read."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

MIN_TOKEN_LENGTH = 16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HOW_TO_CONFIGURE = (
    "set CORRAL_GATEWAY_TOKENS=name:token:scope[,name:token:scope] (scope: read, deploy or "
    "admin) or CORRAL_GATEWAY_TOKENS_FILE to a YAML/JSON file of tokens"
)


class Scope(IntEnum):
    READ = 1
    DEPLOY = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Scope:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown scope {text.strip()!r}; use read, deploy or admin") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Principal:
    """Who is calling, and what they may do."""

    name: str
    scope: Scope

    def allows(self, needed: Scope) -> bool:
        return self.scope >= needed


@dataclass(frozen=True)
class ApiToken:
    name: str
    digest: bytes
    scope: Scope

    @classmethod
    def create(cls, name: str, token: str, scope: Scope | str) -> ApiToken:
        if not _NAME.match(name):
            raise ValueError(
                f"token name {name!r} must be letters, digits, '.', '_' or '-' (at most 64)"
            )
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            raise ValueError(
                f"the token of {name!r} must be at least {MIN_TOKEN_LENGTH} characters without "
                "white space (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        return cls(name, _digest(token), scope if isinstance(scope, Scope) else Scope.parse(scope))


def _digest(token: str) -> bytes:
    # comparing digests of equal length keeps the comparison constant-time in the token length
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str) -> list[ApiToken]:
    """`name:token:scope,name2:token2:scope2`. The token may itself hold ':'; never echoed."""
    tokens = []
    for position, entry in enumerate((e.strip() for e in text.split(",")), start=1):
        if not entry:
            continue
        name, sep, rest = entry.partition(":")
        token, sep2, scope = rest.rpartition(":")
        if not sep or not sep2 or not name or not token:
            raise ValueError(f"token entry {position} ({name or '?'}): expected name:token:scope")
        tokens.append(ApiToken.create(name.strip(), token, scope))
    return tokens


def parse_tokens_document(document: Any) -> list[ApiToken]:
    """A loaded YAML/JSON document: `{tokens: [{name, token, scope}]}` or just the list."""
    items = document.get("tokens") if isinstance(document, dict) else document
    if not isinstance(items, list):
        raise ValueError("the tokens file must hold a list of {name, token, scope} (or `tokens:`)")
    tokens = []
    for position, item in enumerate(items, start=1):
        if not isinstance(item, dict) or not all(
            isinstance(item.get(key), str) for key in ("name", "token", "scope")
        ):
            raise ValueError(f"token {position} must have string fields name, token and scope")
        tokens.append(ApiToken.create(item["name"], item["token"], item["scope"]))
    return tokens


class TokenTable:
    """The configured tokens. `authenticate` looks at every one, so that the time it takes
    says nothing about which token (if any) matched."""

    def __init__(self, tokens: Iterable[ApiToken] = ()) -> None:
        self.tokens = list(tokens)
        names = [t.name for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError("token names must be unique")
        if len({t.digest for t in self.tokens}) != len(self.tokens):
            raise ValueError("two token entries share the same token")

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def authenticate(self, presented: str) -> Principal | None:
        digest = _digest(presented)
        found: Principal | None = None
        for token in self.tokens:
            if hmac.compare_digest(token.digest, digest):
                found = Principal(token.name, token.scope)
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
