"""Reading Prometheus' instant-query answers (the shape of /api/v1/query)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from corral.workers.autoscaler.sources import SourceError, parse_prometheus


def answer(result_type: str, result: Any) -> bytes:
    return json.dumps(
        {"status": "success", "data": {"resultType": result_type, "result": result}}
    ).encode()


def test_a_vector_of_one_series() -> None:
    body = answer("vector", [{"metric": {"job": "web"}, "value": [1700000000.1, "42.5"]}])
    assert parse_prometheus(body) == 42.5


def test_a_scalar() -> None:
    assert parse_prometheus(answer("scalar", [1700000000, "7"])) == 7.0


def test_an_empty_vector_reads_as_zero() -> None:
    assert parse_prometheus(answer("vector", [])) == 0.0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (answer("vector", [{"value": [1, "1"]}, {"value": [1, "2"]}]), "returned 2 series"),
        (answer("matrix", []), "returned a matrix"),
        (answer("vector", [{"value": [1, "NaN"]}]), "returned NaN"),
        (answer("vector", [{"value": [1, "+Inf"]}]), "returned +Inf"),
        (answer("vector", [{"nothing": 1}]), "cannot read"),
        (b"<html>", "not JSON"),
        (b"[1]", "not an object"),
        (
            json.dumps(
                {"status": "error", "errorType": "bad_data", "error": "parse error at char 4"}
            ).encode(),
            "Prometheus: bad_data: parse error at char 4",
        ),
    ],
)
def test_what_cannot_be_a_number_says_why(body: bytes, message: str) -> None:
    with pytest.raises(SourceError, match=message.replace("+", r"\+")):
        parse_prometheus(body)
