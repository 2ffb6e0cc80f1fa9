"""Chat-ops configuration, from the environment like the gateway's secrets (and kept out of
`Settings` for the same reason): the Slack signing secret, the Mattermost tokens, the RBAC
policy, and where `deploy NAME` finds specs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from corral.schemas.errors import CorralError, InvalidInput
from corral.services.chatops.rbac import Policy, parse_policy


class ChatConfigError(CorralError):
    """The chat-ops configuration is wrong; the message says which variable and why."""


class ChatSecrets(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    slack_signing_secret: SecretStr | None = None
    mattermost_tokens: SecretStr | None = None
    chatops_rbac: str | None = None
    chatops_rbac_file: Path | None = None
    chatops_specs: Path | None = None
    chatops_wait: float = Field(default=120.0, gt=0, le=1800)


@dataclass(frozen=True)
class ChatConfig:
    """Slack is on when `slack_secret` is set, Mattermost when `mattermost_tokens` is."""

    slack_secret: bytes | None = None
    mattermost_tokens: Sequence[bytes] = ()
    policy: Policy = field(default_factory=Policy)
    specs_dir: Path | None = None
    wait: float = 120.0
    """how long a command's progress is followed before the last report"""

    @classmethod
    def from_env(cls) -> ChatConfig:
        try:
            secrets = ChatSecrets()
        except ValidationError as exc:
            raise ChatConfigError(f"invalid chat-ops setting: {exc}") from None
        return cls.from_secrets(secrets)

    @classmethod
    def from_secrets(cls, secrets: ChatSecrets) -> ChatConfig:
        slack = secrets.slack_signing_secret
        tokens = secrets.mattermost_tokens.get_secret_value() if secrets.mattermost_tokens else ""
        return cls(
            slack_secret=slack.get_secret_value().strip().encode()
            if slack and slack.get_secret_value().strip()
            else None,
            mattermost_tokens=tuple(t.strip().encode() for t in tokens.split(",") if t.strip()),
            policy=_policy(secrets),
            specs_dir=secrets.chatops_specs,
            wait=secrets.chatops_wait,
        )


def _policy(secrets: ChatSecrets) -> Policy:
    if secrets.chatops_rbac and secrets.chatops_rbac_file:
        raise ChatConfigError("set CORRAL_CHATOPS_RBAC or CORRAL_CHATOPS_RBAC_FILE, not both")
    where, text = "CORRAL_CHATOPS_RBAC", secrets.chatops_rbac
    if secrets.chatops_rbac_file is not None:
        where = f"CORRAL_CHATOPS_RBAC_FILE ({secrets.chatops_rbac_file})"
        try:
            text = secrets.chatops_rbac_file.read_text()
        except OSError as exc:
            raise ChatConfigError(f"{where}: {exc.strerror or exc}") from None
    if not text:
        return Policy()
    try:
        document = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
        return parse_policy(document)
    except (ValueError, yaml.YAMLError) as exc:
        raise ChatConfigError(f"{where}: not valid YAML or JSON: {exc}") from None
    except InvalidInput as exc:
        details = "; ".join(str(e) for e in exc.errors)
        message = f"{where}: {exc.reason}" + (f": {details}" if details else "")
        raise ChatConfigError(message) from None
