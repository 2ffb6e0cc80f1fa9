"""Metric samples as they arrive: the latest value of each (service, metric, replica), read
back as fresh per-replica values. No I/O; times are passed in."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from corral.schemas.events import MetricSample

MAX_PER_MESSAGE = 10_000
FORGET_AFTER = 600.0
"""a sample this old is dropped: its replica has most likely gone"""


@dataclass
class Ingested:
    names: set[str] = field(default_factory=set)
    """metric names of the samples taken"""
    errors: list[str] = field(default_factory=list)
    """why the others were refused"""


class SampleStore:
    def __init__(self) -> None:
        # service -> metric name -> replica -> (value, time)
        self._values: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}

    def ingest(self, service: str, payload: bytes, now: float) -> Ingested:
        """Take one message: a JSON sample `{name, value, replica}`, or an array of them."""
        out = Ingested()
        try:
            raw: Any = json.loads(payload)
        except ValueError as exc:
            out.errors.append(f"not JSON ({exc})")
            return out
        items = raw if isinstance(raw, list) else [raw]
        if len(items) > MAX_PER_MESSAGE:
            out.errors.append(f"{len(items)} samples in one message (at most {MAX_PER_MESSAGE})")
            return out
        by_name = self._values.setdefault(service, {})
        for item in items:
            try:
                sample = MetricSample.model_validate(item)
            except ValidationError as exc:
                out.errors.append(str(exc).replace("\n", " "))
                continue
            by_name.setdefault(sample.name, {})[sample.replica] = (sample.value, now)
            out.names.add(sample.name)
        return out

    def fresh(
        self, service: str, name: str, now: float, max_age: float, replicas: Iterable[str] | None
    ) -> dict[str, float]:
        """The latest value of each replica (of `replicas`, when given) newer than `max_age`."""
        values = self._values.get(service, {}).get(name, {})
        wanted = set(replicas) if replicas is not None else None
        return {
            replica: value
            for replica, (value, at) in values.items()
            if now - at <= max_age and (wanted is None or replica in wanted)
        }

    def first_fresh(
        self, service: str, names: Iterable[str], now: float, max_age: float
    ) -> dict[str, float]:
        """The fresh values of the first of `names` that has any."""
        for name in names:
            found = self.fresh(service, name, now, max_age, None)
            if found:
                return found
        return {}

    def forget(self, service: str) -> None:
        self._values.pop(service, None)

    def prune(self, now: float, older_than: float = FORGET_AFTER) -> None:
        for by_name in self._values.values():
            for values in by_name.values():
                for replica in [r for r, (_, at) in values.items() if now - at > older_than]:
                    del values[replica]
