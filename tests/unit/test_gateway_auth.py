"""API tokens: parsing, scopes (admin > deploy > read), constant-time lookup."""

from __future__ import annotations

import pytest

from corral.services.gateway.auth import (
    Principal,
    Scope,
    TokenTable,
    bearer_token,
    parse_tokens,
    parse_tokens_document,
)
from corral.services.gateway.config import GatewayConfig, GatewayConfigError, GatewaySecrets

READ = "r" * 20
DEPLOY = "d:with:colons-0123456789"
ADMIN = "a" * 32


def test_parse_tokens_and_scopes() -> None:
    table = TokenTable(parse_tokens(f"viewer:{READ}:read, ci:{DEPLOY}:deploy,,ops:{ADMIN}:ADMIN"))
    assert len(table) == 3
    assert table.authenticate(READ) == Principal("viewer", Scope.READ)
    assert table.authenticate(DEPLOY) == Principal("ci", Scope.DEPLOY)
    assert table.authenticate(ADMIN) == Principal("ops", Scope.ADMIN)
    assert table.authenticate("nope" * 5) is None
    assert table.authenticate("") is None


def test_scopes_imply_the_lower_ones() -> None:
    admin, deploy, read = (Principal("x", s) for s in (Scope.ADMIN, Scope.DEPLOY, Scope.READ))
    assert admin.allows(Scope.DEPLOY)
    assert admin.allows(Scope.READ)
    assert deploy.allows(Scope.READ)
    assert not deploy.allows(Scope.ADMIN)
    assert read.allows(Scope.READ)
    assert not read.allows(Scope.DEPLOY)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("justonepart", "expected name:token:scope"),
        (f"ci:{READ}", "expected name:token:scope"),
        (f"ci:{READ}:superuser", "unknown scope"),
        ("ci:short:read", "at least 16"),
        (f"bad name:{READ}:read", "token name"),
        (f":{READ}:read", "expected name:token:scope"),
    ],
)
def test_bad_token_entries_say_why_without_the_token(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        TokenTable(parse_tokens(text))
    assert READ not in str(info.value)


def test_duplicates_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        TokenTable(parse_tokens(f"a:{READ}:read,a:{ADMIN}:admin"))
    with pytest.raises(ValueError, match="same token"):
        TokenTable(parse_tokens(f"a:{READ}:read,b:{READ}:admin"))


def test_tokens_document() -> None:
    tokens = parse_tokens_document({"tokens": [{"name": "ci", "token": ADMIN, "scope": "deploy"}]})
    assert TokenTable(tokens).authenticate(ADMIN) == Principal("ci", Scope.DEPLOY)
    assert len(parse_tokens_document([{"name": "ci", "token": ADMIN, "scope": "read"}])) == 1
    with pytest.raises(ValueError, match="list"):
        parse_tokens_document({"nope": 1})
    with pytest.raises(ValueError, match="name, token and scope"):
        parse_tokens_document([{"name": "ci", "token": ADMIN}])


def test_bearer_header() -> None:
    assert bearer_token(f"Bearer {ADMIN}") == ADMIN
    assert bearer_token(f"bearer   {ADMIN} ") == ADMIN
    assert bearer_token(f"Basic {ADMIN}") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None


def test_config_from_secrets(tmp_path) -> None:
    file = tmp_path / "tokens.yaml"
    file.write_text(f"tokens:\n  - {{name: ops, token: {ADMIN}, scope: admin}}\n")
    secrets = GatewaySecrets(
        gateway_tokens=f"ci:{DEPLOY}:deploy",
        gateway_tokens_file=file,
        github_secret="gh",
        hook_secrets="deploy-bot:s3cret, other:x:y",
    )
    config = GatewayConfig.from_secrets(secrets)
    assert config.tokens.authenticate(ADMIN) == Principal("ops", Scope.ADMIN)
    assert config.tokens.authenticate(DEPLOY) == Principal("ci", Scope.DEPLOY)
    assert config.github_secret == b"gh"
    assert config.gitlab_token is None
    assert dict(config.hooks) == {"deploy-bot": b"s3cret", "other": b"x:y"}
    assert not config.open_locally
    assert GatewayConfig(insecure_local=True).open_locally


@pytest.mark.parametrize(
    ("secrets", "needle"),
    [
        (GatewaySecrets(gateway_tokens="ci:short:read"), "CORRAL_GATEWAY_TOKENS"),
        (GatewaySecrets(gateway_tokens_file="/nonexistent/tokens.yaml"), "TOKENS_FILE"),
        (GatewaySecrets(hook_secrets="github:abc"), "CORRAL_HOOK_SECRETS"),
        (GatewaySecrets(hook_secrets="Bad.Name:abc"), "CORRAL_HOOK_SECRETS"),
        (GatewaySecrets(hook_secrets="nosecret:"), "name:secret"),
    ],
)
def test_bad_config_is_a_clear_error(secrets: GatewaySecrets, needle: str) -> None:
    with pytest.raises(GatewayConfigError, match=needle):
        GatewayConfig.from_secrets(secrets)
