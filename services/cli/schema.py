"""`corral schema export`: JSON Schema for every model another system may send or receive."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from corral.schemas.chat import ChatCommandEvent
from corral.schemas.commands import COMMANDS, command_type
from corral.schemas.envelope import CloudEvent
from corral.schemas.events import (
    AutoscaleDecision,
    ColdStartEvent,
    CommandAccepted,
    CommandRejected,
    MetricSample,
    ReplicaEvent,
    ReplicaPreempted,
    ServiceProgress,
    event_type,
)
from corral.schemas.pipeline import PipelineSpec
from corral.schemas.rules import (
    Rule,
    RuleFailed,
    RuleFired,
    RuleNotification,
    RuleSkipped,
)
from corral.schemas.runs import JobEvent, JobReport, RunEvent
from corral.schemas.spec import ServiceSpec


def catalogue() -> dict[str, type[BaseModel]]:
    models: dict[str, type[BaseModel]] = {
        "spec.service": ServiceSpec,
        "envelope.cloudevent": CloudEvent,
    }
    for resource, verbs in COMMANDS.items():  # every command, whichever worker owns it
        for verb, model in verbs.items():
            models[command_type(resource, verb)] = model
    for what in ("accepted",):
        models[event_type("service", what)] = CommandAccepted
    models[event_type("service", "rejected")] = CommandRejected
    for what in ("ready", "unschedulable", "deleted"):
        models[event_type("service", what)] = ServiceProgress
    for what in ("started", "stopped", "exited", "failed"):
        models[event_type("replica", what)] = ReplicaEvent
    models[event_type("replica", "preempted")] = ReplicaPreempted
    models[event_type("autoscale", "decision")] = AutoscaleDecision
    models[event_type("autoscale", "cold_start")] = ColdStartEvent
    models["metrics.sample"] = MetricSample
    models["spec.pipeline"] = PipelineSpec
    for what in ("started", "succeeded", "failed", "cancelled", "approval_needed"):
        models[event_type("run", what)] = RunEvent
    models[event_type("job", "finished")] = JobReport
    models["spec.rule"] = Rule
    models[event_type("rule", "fired")] = RuleFired
    models[event_type("rule", "skipped")] = RuleSkipped
    models[event_type("rule", "failed")] = RuleFailed
    models[event_type("rule", "notify")] = RuleNotification
    for what in ("requested", "denied", "invalid"):
        models[event_type("chat", what)] = ChatCommandEvent
    for what in ("dispatched", "retry_scheduled", "skipped", "succeeded", "failed"):
        models[event_type("job", what)] = JobEvent
    return models


def export_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in catalogue().items():
        schema = model.model_json_schema()
        schema.setdefault("$schema", "https://json-schema.org/draft/2020-12/schema")
        schema.setdefault("$id", f"{name}.json")
        path = directory / f"{name}.json"
        path.write_text(json.dumps(schema, indent=2) + "\n")
        written.append(path)
    return written
