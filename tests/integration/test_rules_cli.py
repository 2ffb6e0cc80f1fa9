"""`corral rules apply|list|delete` as a user runs them, against the rules worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import acli, corral_env

pytestmark = pytest.mark.timeout(90)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "rules"


async def test_apply_list_delete(settings, control_plane, tmp_path) -> None:
    env = corral_env(settings)
    async with control_plane(workers=("rules",)):
        applied = await acli(env, "rules", "apply", "-f", str(EXAMPLES / "alert-high-latency.yaml"))
        assert applied.returncode == 0, applied
        assert "rule scale-on-latency configured (generation 1)" in applied.stdout
        many = tmp_path / "many.yaml"
        many.write_text(
            (EXAMPLES / "github-push-main.yaml").read_text()
            + "\n---\n"
            + (EXAMPLES / "crash-loop-notify.yaml").read_text()
            + "\n---\n"
            + (EXAMPLES / "alert-high-latency.yaml").read_text()
        )
        again = await acli(env, "rules", "apply", "-f", str(many))
        assert again.returncode == 0, again
        assert "rule scale-on-latency unchanged" in again.stdout
        assert "rule release-on-push configured" in again.stdout

        listed = await acli(env, "rules", "list", "-o", "json")
        assert listed.returncode == 0, listed
        rules = {r["name"]: r for r in json.loads(listed.stdout)["rules"]}
        assert set(rules) == {"scale-on-latency", "release-on-push", "crash-loop-chat"}
        assert rules["scale-on-latency"]["cooldown"] == 300
        assert rules["scale-on-latency"]["requested_by"] == "corral/cli"
        table = await acli(env, "rules", "list")
        assert "release-on-push" in table.stdout
        assert "pipeline run release" in table.stdout

        deleted = await acli(env, "rules", "delete", "crash-loop-chat")
        assert deleted.returncode == 0, deleted
        missing = await acli(env, "rules", "delete", "crash-loop-chat")
        assert missing.returncode == 1
        assert "not found" in missing.stderr


async def test_invalid_files_publish_nothing(settings, tmp_path) -> None:
    env = corral_env(settings)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: one\nwhen: {match: {data.x: '/[/'}}\nthen: {notify: {text: '{{ oops('}}\n"
        "---\n- name: two\n  then: {resource: service}\n"
    )
    result = await acli(env, "rules", "apply", "-f", str(bad))
    assert result.returncode == 2, result
    assert "bad regex" in result.stderr
    assert "needs resource, name and verb" in result.stderr
    nothing = await acli(env, "rules", "apply", "-f", str(tmp_path / "nope.yaml"))
    assert nothing.returncode == 2
    assert "no such file" in nothing.stderr
