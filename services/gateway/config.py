"""The gateway's secrets: API tokens and webhook secrets, read from the environment (or a
tokens file). They stay out of `Settings`, which every worker is handed and may log."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from corral.schemas.errors import CorralError
from corral.services.chatops.config import ChatConfig, ChatConfigError
from corral.services.gateway.auth import (
    ApiToken,
    TokenTable,
    parse_tokens,
    parse_tokens_document,
)
from corral.services.gateway.external import RESERVED
from corral.services.gateway.routing import TOKEN


class GatewayConfigError(CorralError):
    """The gateway's configuration is wrong; the message says which variable and why."""


class GatewaySecrets(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    gateway_tokens: SecretStr | None = None
    gateway_tokens_file: Path | None = None
    github_secret: SecretStr | None = None
    gitlab_token: SecretStr | None = None
    alertmanager_token: SecretStr | None = None
    hook_secrets: SecretStr | None = None


@dataclass(frozen=True)
class GatewayConfig:
    """Who may call the gateway. With no tokens, every API call is refused (401), unless
    `insecure_local`: then any caller is `local`, with admin scope (for a gateway bound to
    127.0.0.1 only). A webhook without its secret is off (404); none ever accepts unsigned."""

    tokens: TokenTable = field(default_factory=TokenTable)
    github_secret: bytes | None = None
    gitlab_token: bytes | None = None
    alertmanager_token: bytes | None = None
    hooks: Mapping[str, bytes] = field(default_factory=dict)
    insecure_local: bool = False
    chat: ChatConfig = field(default_factory=ChatConfig)
    """chat-ops: Slack and Mattermost slash commands (off unless their secrets are set)"""

    @classmethod
    def from_env(cls, *, insecure_local: bool = False) -> GatewayConfig:
        try:
            secrets = GatewaySecrets()
        except ValidationError as exc:
            raise GatewayConfigError(f"invalid gateway setting: {exc}") from None
        try:
            chat = ChatConfig.from_env()
        except ChatConfigError as exc:
            raise GatewayConfigError(str(exc)) from None
        return replace(cls.from_secrets(secrets, insecure_local=insecure_local), chat=chat)

    @classmethod
    def from_secrets(
        cls, secrets: GatewaySecrets, *, insecure_local: bool = False
    ) -> GatewayConfig:
        tokens = []
        try:
            if secrets.gateway_tokens is not None:
                tokens.extend(parse_tokens(secrets.gateway_tokens.get_secret_value()))
        except ValueError as exc:
            raise GatewayConfigError(f"CORRAL_GATEWAY_TOKENS: {exc}") from None
        if secrets.gateway_tokens_file is not None:
            tokens.extend(_tokens_file(secrets.gateway_tokens_file))
        try:
            table = TokenTable(tokens)
        except ValueError as exc:
            raise GatewayConfigError(f"gateway tokens: {exc}") from None
        return cls(
            tokens=table,
            github_secret=_secret(secrets.github_secret),
            gitlab_token=_secret(secrets.gitlab_token),
            alertmanager_token=_secret(secrets.alertmanager_token),
            hooks=parse_hook_secrets(
                secrets.hook_secrets.get_secret_value() if secrets.hook_secrets else ""
            ),
            insecure_local=insecure_local,
        )

    @property
    def open_locally(self) -> bool:
        return self.insecure_local and not self.tokens


def _secret(value: SecretStr | None) -> bytes | None:
    text = value.get_secret_value().strip() if value is not None else ""
    return text.encode() if text else None


def _tokens_file(path: Path) -> list[ApiToken]:
    where = f"CORRAL_GATEWAY_TOKENS_FILE ({path})"
    try:
        text = path.read_text()
    except OSError as exc:
        raise GatewayConfigError(f"{where}: {exc.strerror or exc}") from None
    try:
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return parse_tokens_document(document)
    except (ValueError, yaml.YAMLError) as exc:
        raise GatewayConfigError(f"{where}: {exc}") from None


def parse_hook_secrets(text: str) -> dict[str, bytes]:
    """`name:secret,name2:secret2` for `POST /v1/hooks/<name>`."""
    hooks: dict[str, bytes] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, secret = entry.partition(":")
        name = name.strip()
        if not sep or not secret.strip():
            raise GatewayConfigError(
                f"CORRAL_HOOK_SECRETS: entry {name or '?'!r} must look like name:secret"
            )
        if not TOKEN.match(name) or name in RESERVED:
            raise GatewayConfigError(
                f"CORRAL_HOOK_SECRETS: hook name {name!r} must be lowercase letters, digits, "
                f"'_' or '-', and none of {', '.join(sorted(RESERVED))}"
            )
        hooks[name] = secret.strip().encode()
    return hooks
