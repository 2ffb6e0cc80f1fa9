"""`corral pipeline ...` through real subprocesses against in-process workers: run (and wait),
status as a table and as JSON, logs, approve (allowed and refused), cancel, retry, list, and
clear errors with the right exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pipeline_support import finished_run, pipeline_host
from support import acli, corral_env, eventually

from corral.schemas.runs import JobState, RunState

pytestmark = pytest.mark.timeout(90)


def write(path: Path, spec: dict) -> str:
    path.write_text(yaml.safe_dump(spec))
    return str(path)


async def test_run_wait_status_logs_list(settings, bus, tmp_path: Path) -> None:
    env = corral_env(settings)
    spec = {
        "name": "cli",
        "variables": {"WHO": "nobody"},
        "jobs": {
            "hello": {"script": ["echo hello $WHO", "echo oops >&2"]},
            "bye": {"needs": ["hello"], "command": ["echo", "bye ${WHO}"]},
        },
    }
    file = write(tmp_path / "p.yaml", spec)
    async with pipeline_host(settings):
        done = await acli(env, "pipeline", "run", "-f", file, "--var", "WHO=world", "--wait")
        assert done.returncode == 0, done
        assert "hello" in done.stdout
        assert "succeeded" in done.stdout
        listed = await acli(env, "pipeline", "list", "-o", "json")
        [item] = json.loads(listed.stdout)["runs"]
        run_id = item["run"]
        status = await acli(env, "pipeline", "status", run_id, "-o", "json")
        view = json.loads(status.stdout)
        assert view["state"] == "succeeded"
        assert [(j["name"], j["layer"], j["state"]) for j in view["jobs"]] == [
            ("hello", 0, "succeeded"),
            ("bye", 1, "succeeded"),
        ]
        assert all(j["seconds"] is not None for j in view["jobs"])
        table = await acli(env, "pipeline", "status", run_id)
        assert "bye" in table.stdout
        assert "succeeded" in table.stdout
        logs = await acli(env, "pipeline", "logs", run_id, "hello")
        assert logs.stdout.split("\n")[:2] == ["hello world", "oops"], logs
        both = await acli(env, "pipeline", "logs", run_id)
        assert "[bye] bye world" in both.stdout
        missing = await acli(env, "pipeline", "status", "nope-123")
        assert missing.returncode == 1
        assert "not found" in missing.stderr


async def test_approve_cancel_retry_and_errors(settings, bus, tmp_path: Path) -> None:
    env = corral_env(settings)
    gate = tmp_path / "gate"
    spec = {
        "name": "steer",
        "jobs": {
            "check": {"script": [f"test -f {gate}"]},
            "ship": {
                "needs": ["check"],
                "command": ["true"],
                "when": "manual",
                "approvers": ["alice"],
            },
        },
    }
    file = write(tmp_path / "p.yaml", spec)
    async with pipeline_host(settings):
        failed = await acli(env, "pipeline", "run", "-f", file, "--wait")
        assert failed.returncode == 4, failed
        run_id = json.loads((await acli(env, "pipeline", "list", "-o", "json")).stdout)["runs"][0][
            "run"
        ]
        gate.write_text("open")
        retried = await acli(env, "pipeline", "retry", run_id)
        assert retried.returncode == 0, retried

        async def waiting() -> bool:
            status = await acli(env, "pipeline", "status", run_id, "-o", "json")
            jobs = {j["name"]: j for j in json.loads(status.stdout)["jobs"]}
            return jobs["ship"]["state"] == "manual"

        await eventually(waiting, what="ship to wait for approval")
        refused = await acli(env, "pipeline", "approve", run_id, "ship", "--user", "bob")
        assert refused.returncode == 1
        assert "bob may not approve ship: approvers are alice" in refused.stderr
        allowed = await acli(env, "pipeline", "approve", run_id, "ship", "--user", "alice")
        assert allowed.returncode == 0, allowed
        run = await finished_run(bus, run_id)
        assert run.state == RunState.SUCCEEDED
        assert run.jobs["ship"].approved_by == "alice"

        hang = write(
            tmp_path / "h.yaml", {"name": "hang", "jobs": {"s": {"command": ["sleep", "60"]}}}
        )
        started = await acli(env, "pipeline", "run", "-f", hang)
        hang_id = started.stdout.strip()
        cancelled = await acli(env, "pipeline", "cancel", hang_id)
        assert cancelled.returncode == 0, cancelled
        run = await finished_run(bus, hang_id)
        assert run.state == RunState.CANCELLED
        assert run.jobs["s"].state == JobState.CANCELLED
        again = await acli(env, "pipeline", "cancel", hang_id)
        assert again.returncode == 1
        assert "already cancelled" in again.stderr

        cyclic = write(
            tmp_path / "c.yaml",
            {
                "name": "cyc",
                "jobs": {
                    "a": {"needs": ["b"], "command": ["x"]},
                    "b": {"needs": ["a"], "command": ["x"]},
                },
            },
        )
        bad = await acli(env, "pipeline", "run", "-f", cyclic)
        assert bad.returncode == 2
        assert "cycle: a -> b -> a" in bad.stderr
        nofile = await acli(env, "pipeline", "run", "-f", str(tmp_path / "none.yaml"))
        assert nofile.returncode == 2
        assert "no such file" in nofile.stderr


async def test_logs_follow_until_the_run_ends(settings, bus, tmp_path: Path) -> None:
    env = corral_env(settings)
    spec = {
        "name": "chatty",
        "jobs": {"talk": {"script": ["for i in 1 2 3; do echo line $i; sleep 0.3; done"]}},
    }
    file = write(tmp_path / "p.yaml", spec)
    async with pipeline_host(settings):
        started = await acli(env, "pipeline", "run", "-f", file)
        run_id = started.stdout.strip()
        followed = await acli(env, "pipeline", "logs", run_id, "talk", "-f", within=30)
        run = await finished_run(bus, run_id)
    assert run.state == RunState.SUCCEEDED
    assert followed.returncode == 0, followed
    assert followed.stdout.split() == ["line", "1", "line", "2", "line", "3"]


async def test_a_long_line_is_cut_in_the_stream_and_kept_whole(settings, bus, tmp_path) -> None:
    env = corral_env(settings)
    spec = {
        "name": "verbose",
        "jobs": {"big": {"script": ["echo short", "printf '%40000s\\n' '' | tr ' ' x"]}},
    }
    file = write(tmp_path / "p.yaml", spec)
    async with pipeline_host(settings):
        done = await acli(env, "pipeline", "run", "-f", file, "--wait")
        assert done.returncode == 0, done
        run_id = json.loads((await acli(env, "pipeline", "list", "-o", "json")).stdout)["runs"][0][
            "run"
        ]
        streamed = await acli(env, "pipeline", "logs", run_id, "big")
        whole = await acli(env, "pipeline", "logs", run_id, "big", "--whole")
        small = await acli(env, "pipeline", "logs", run_id, "--whole")
    lines = streamed.stdout.split("\n")
    assert lines[0] == "short"
    assert lines[1].endswith("[line cut; the full log is in the object store]")
    assert len(lines[1]) < 17_000
    assert whole.stdout == "short\n" + "x" * 40_000 + "\n"
    assert small.returncode == 2
    assert "--whole needs a JOB" in small.stderr


async def test_artifacts_download(settings, bus, tmp_path: Path) -> None:
    env = corral_env(settings)
    spec = {
        "name": "arty",
        "jobs": {
            "make": {
                "script": ["mkdir -p out/deep", "echo one > out/a.txt", "echo two > out/deep/b"],
                "artifacts": {"paths": ["out"]},
            },
            "plain": {"command": ["true"]},
        },
    }
    file = write(tmp_path / "p.yaml", spec)
    target = tmp_path / "got"
    async with pipeline_host(settings):
        done = await acli(env, "pipeline", "run", "-f", file, "--wait")
        assert done.returncode == 0, done
        run_id = json.loads((await acli(env, "pipeline", "list", "-o", "json")).stdout)["runs"][0][
            "run"
        ]
        got = await acli(env, "pipeline", "artifacts", run_id, "make", "-d", str(target))
        none = await acli(env, "pipeline", "artifacts", run_id, "plain")
    assert got.returncode == 0, got
    assert (target / "out" / "a.txt").read_text() == "one\n"
    assert (target / "out" / "deep" / "b").read_text() == "two\n"
    assert none.returncode == 1
    assert "has no artifacts" in none.stderr
