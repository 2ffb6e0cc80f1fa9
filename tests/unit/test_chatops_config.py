"""Chat-ops and notifier configuration from the environment, and specs for `/corral deploy`."""

from __future__ import annotations

import pytest

from corral.schemas.errors import InvalidInput
from corral.services.chatops.config import ChatConfig, ChatConfigError, ChatSecrets
from corral.services.chatops.grammar import Request
from corral.services.chatops.sending import load_spec
from corral.workers.notifier.worker import NotifierConfig, NotifierConfigError


def test_chat_config(tmp_path) -> None:
    rbac = tmp_path / "rbac.yaml"
    rbac.write_text("users: {U1: [ops]}\nroles: {ops: [{verbs: ['*']}]}\n")
    config = ChatConfig.from_secrets(
        ChatSecrets(
            slack_signing_secret=" s3cret ",
            mattermost_tokens="a, b,",
            chatops_rbac_file=rbac,
            chatops_specs=tmp_path,
        )
    )
    assert config.slack_secret == b"s3cret"
    assert config.mattermost_tokens == (b"a", b"b")
    assert config.policy.roles_of("U1") == ["ops"]
    assert ChatConfig.from_secrets(ChatSecrets()).slack_secret is None
    inline = ChatConfig.from_secrets(ChatSecrets(chatops_rbac='{"roles": {"r": []}}'))
    assert list(inline.policy.roles) == ["r"]


@pytest.mark.parametrize(
    ("secrets", "message"),
    [
        ({"chatops_rbac": "roles: {}", "chatops_rbac_file": "x.yaml"}, "not both"),
        ({"chatops_rbac_file": "/nonexistent/rbac.yaml"}, "CORRAL_CHATOPS_RBAC_FILE"),
        ({"chatops_rbac": "users: [unclosed"}, "not valid YAML"),
        ({"chatops_rbac": "users: {u: [ghost]}"}, "not defined: ghost"),
        ({"chatops_rbac": "roles: {r: [{verbs: [fly]}]}"}, "unknown verb"),
    ],
)
def test_chat_config_errors_name_the_variable(secrets, message) -> None:
    with pytest.raises(ChatConfigError, match=message):
        ChatConfig.from_secrets(ChatSecrets(**secrets))


def test_specs_by_name_and_inline(tmp_path) -> None:
    (tmp_path / "web.yml").write_text("name: web\ncommand: [sleep, '1']\n")
    (tmp_path / "odd.yaml").write_text("name: other\ncommand: [sleep, '1']\n")
    assert load_spec(Request("deploy", name="web"), tmp_path).name == "web"
    with pytest.raises(InvalidInput, match="names the service 'other'"):
        load_spec(Request("deploy", name="odd"), tmp_path)
    with pytest.raises(InvalidInput, match=r"no spec api\.yaml"):
        load_spec(Request("deploy", name="api"), tmp_path)
    with pytest.raises(InvalidInput, match="CORRAL_CHATOPS_SPECS"):
        load_spec(Request("deploy", name="web"), None)
    inline = load_spec(Request("deploy", document='{"name": "x", "command": ["true"]}'), None)
    assert inline.name == "x"
    with pytest.raises(InvalidInput) as caught:
        load_spec(Request("deploy", document="{name: x, replicas: -1, command: [true]}"), None)
    assert caught.value.errors[0].loc == "replicas"
    with pytest.raises(InvalidInput, match="must be a mapping"):
        load_spec(Request("deploy", document="- a list"), None)


def test_notifier_config(monkeypatch) -> None:
    monkeypatch.setenv("CORRAL_NOTIFY_SLACK_URL", "https://hooks.slack.example/T/B/x")
    monkeypatch.setenv("CORRAL_NOTIFY_EVENTS", "degraded,run_failed")
    config = NotifierConfig.from_env()
    assert [d.platform for d in config.destinations] == ["slack"]
    assert config.kinds == ("degraded", "run_failed")
    assert "hooks.slack" not in repr(config.destinations[0])  # the URL is a secret
    monkeypatch.setenv("CORRAL_NOTIFY_MATTERMOST_URL", "ftp://nope")
    with pytest.raises(NotifierConfigError, match="http"):
        NotifierConfig.from_env()
    monkeypatch.delenv("CORRAL_NOTIFY_MATTERMOST_URL")
    monkeypatch.setenv("CORRAL_NOTIFY_EVENTS", "everything")
    with pytest.raises(NotifierConfigError, match="unknown kind"):
        NotifierConfig.from_env()
