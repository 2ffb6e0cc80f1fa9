"""Pipeline commands through the gateway: a structured-mode `io.corral.pipeline.run` CloudEvent
posted to `/v1/cloudevents` over real HTTP starts a run that the pipeline worker and a real
agent carry out (jobs as real processes), and an invalid one is refused with the field."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from gateway_support import DEPLOY, auth, record, running_gateway
from pipeline_support import finished_run, pipeline_host
from support import eventually

from corral.bus.codec import CORRELATION
from corral.schemas.runs import JobState, RunState

pytestmark = pytest.mark.timeout(60)
STRUCTURED = {"content-type": "application/cloudevents+json"}


def structured(type_: str, subject: str, data: Any) -> str:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": uuid.uuid4().hex,
            "source": "https://ci.example.com",
            "type": type_,
            "subject": subject,
            "data": data,
        }
    )


async def test_a_pipeline_run_cloudevent_starts_a_run(settings, bus) -> None:
    spec = {
        "name": "gw",
        "jobs": {
            "build": {"script": ['test "$WHO" = gateway']},
            "ship": {"needs": ["build"], "command": ["true"]},
        },
    }
    answers: list[tuple[str, dict[str, Any]]] = []

    async def on_answer(msg: Any) -> None:
        answers.append(((msg.headers or {}).get(CORRELATION, ""), json.loads(msg.data)))

    sub = await bus.nc.subscribe(bus.names.evt("pipeline", "gw", "accepted"), cb=on_answer)
    try:
        async with pipeline_host(settings), running_gateway(settings, bus) as api:
            body = structured(
                "io.corral.pipeline.run", "gw", {"spec": spec, "variables": {"WHO": "gateway"}}
            )
            posted = await api.client.post(
                "/v1/cloudevents", content=body, headers={**auth(DEPLOY), **STRUCTURED}
            )
            assert posted.status_code == 202, posted.text
            assert posted.json()["subject"] == f"{settings.prefix}.cmd.pipeline.gw.run"
            command_id = json.loads(body)["id"]
            await eventually(
                lambda: [data for who, data in answers if who == command_id],
                what="the pipeline worker's accepted answer",
            )
            run_id = next(data["run"] for who, data in answers if who == command_id)
            run = await finished_run(bus, run_id)
    finally:
        await sub.unsubscribe()
    assert run.state == RunState.SUCCEEDED, run
    assert run.variables == {"WHO": "gateway"}
    assert run.requested_by == "https://ci.example.com"
    assert {name: job.state for name, job in run.jobs.items()} == {
        "build": JobState.SUCCEEDED,
        "ship": JobState.SUCCEEDED,
    }


async def test_an_invalid_pipeline_cloudevent_is_refused_with_the_field(settings, bus) -> None:
    cmds = await record(bus, f"{settings.prefix}.cmd.>")
    try:
        async with running_gateway(settings, bus) as api:
            typo = {"name": "gw", "jobs": {"build": {"comand": ["true"]}}}
            fine = {"name": "gw", "jobs": {"build": {"command": ["true"]}}}
            cases = [
                (
                    structured("io.corral.pipeline.run", "gw", {"spec": typo}),
                    "spec.jobs.build.comand",
                ),
                (
                    structured("io.corral.pipeline.run", "gw", {"variables": {"W": 1}}),
                    "variables.W",
                ),
                (structured("io.corral.run.approve", "gw-1", {"job": "ship"}), "user"),
                (structured("io.corral.pipeline.apply", "other", {"spec": fine}), "spec.name"),
            ]
            for body, loc in cases:
                refused = await api.client.post(
                    "/v1/cloudevents", content=body, headers={**auth(DEPLOY), **STRUCTURED}
                )
                assert refused.status_code == 422, refused.text
                error = refused.json()["error"]
                assert error["code"] == "invalid"
                assert loc in {f["loc"] for f in error["errors"]}, error
            # nothing invalid reached the bus; a valid one does
            valid = structured("io.corral.run.cancel", "gw-1", {})
            sent = await api.client.post(
                "/v1/cloudevents", content=valid, headers={**auth(DEPLOY), **STRUCTURED}
            )
            assert sent.status_code == 202, sent.text
            await eventually(lambda: cmds.seen, what="the valid command on the bus")
        assert [subject for subject, _, _ in cmds.seen] == [
            f"{settings.prefix}.cmd.run.gw-1.cancel"
        ]
    finally:
        await cmds.close()
