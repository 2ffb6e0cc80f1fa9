"""The CloudEvents codec: binary mode out, binary or structured mode in."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from corral.bus.codec import CORRELATION, MSG_ID, STRUCTURED, decode, encode
from corral.schemas.envelope import CloudEvent
from corral.schemas.errors import InvalidInput

WHEN = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


class Payload(BaseModel):
    replicas: int
    name: str


def binary_headers(**extra: str) -> dict[str, str]:
    headers = {
        "ce-id": "abc123",
        "ce-source": "tests",
        "ce-type": "io.corral.service.scale",
        "ce-specversion": "1.0",
    }
    headers.update(extra)
    return headers


def structured(body: Any, **headers: str) -> tuple[dict[str, str], bytes]:
    return {"content-type": STRUCTURED, **headers}, json.dumps(body).encode()


def invalid(headers: dict[str, str] | None, payload: bytes) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        decode(headers, payload)
    assert info.value.reason_code == "invalid"
    return info.value


# --- binary mode --------------------------------------------------------------------------


def test_encode_puts_attributes_in_ce_headers() -> None:
    event = CloudEvent(
        id="evt-1",
        source="corral/api",
        type="io.corral.service.deployed",
        subject="web",
        time=WHEN,
        data={"a": 1},
        correlation="cmd-9",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    headers, payload = encode(event)
    assert headers["ce-id"] == "evt-1"
    assert headers["ce-source"] == "corral/api"
    assert headers["ce-type"] == "io.corral.service.deployed"
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-subject"] == "web"
    assert datetime.fromisoformat(headers["ce-time"]) == WHEN
    assert headers["content-type"] == "application/json"
    assert headers[CORRELATION] == "cmd-9"
    assert headers["traceparent"] == event.traceparent
    assert json.loads(payload) == {"a": 1}


def test_nats_msg_id_equals_ce_id_for_deduplication() -> None:
    event = CloudEvent(source="s", type="t")
    headers, _ = encode(event)
    assert headers[MSG_ID] == headers["ce-id"] == event.id


def test_encode_omits_absent_optional_attributes() -> None:
    headers, payload = encode(CloudEvent(source="s", type="t", time=None))
    assert payload == b""
    for name in ("ce-subject", "ce-time", CORRELATION, "traceparent"):
        assert name not in headers


@pytest.mark.parametrize(
    "data",
    [
        {"replicas": 3, "nested": {"list": [1, 2, None], "flag": True}},
        [1, "two", 3.5],
        "text",
        42,
        None,
    ],
)
def test_binary_round_trip(data: Any) -> None:
    event = CloudEvent(
        source="corral/api",
        type="io.corral.x",
        subject="web",
        time=WHEN,
        data=data,
        correlation="c-1",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    assert decode(*encode(event)) == event


def test_binary_round_trip_of_a_pydantic_model_gives_its_json() -> None:
    event = CloudEvent(source="s", type="t", time=WHEN, data=Payload(replicas=2, name="web"))
    decoded = decode(*encode(event))
    assert decoded.data == {"replicas": 2, "name": "web"}
    assert Payload.model_validate(decoded.data) == event.data
    assert decoded.id == event.id


def test_encode_passes_raw_bytes_through() -> None:
    _, payload = encode(CloudEvent(source="s", type="t", data=b'{"raw":true}'))
    assert payload == b'{"raw":true}'


def test_decode_reads_headers_case_insensitively() -> None:
    headers = {k.upper(): v for k, v in binary_headers().items()}
    headers["Content-Type"] = "application/json; charset=utf-8"
    event = decode(headers, b'{"replicas": 2}')
    assert event.id == "abc123"
    assert event.data == {"replicas": 2}


def test_decode_binary_defaults() -> None:
    event = decode(binary_headers(), b"")
    assert event.data is None
    assert event.time is None
    assert event.subject is None
    assert event.correlation is None
    assert event.datacontenttype == "application/json"


def test_decode_accepts_zulu_time() -> None:
    event = decode(binary_headers(**{"ce-time": "2025-01-02T03:04:05Z"}), b"")
    assert event.time == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_decode_carries_correlation() -> None:
    assert decode(binary_headers(**{CORRELATION: "cmd-1"}), b"").correlation == "cmd-1"


@pytest.mark.parametrize(
    ("drop", "named"),
    [
        (["ce-id"], "ce-id"),
        (["ce-source", "ce-type"], "ce-source, ce-type"),
        (["ce-specversion"], "ce-specversion"),
    ],
)
def test_missing_ce_headers_are_named(drop: list[str], named: str) -> None:
    headers = binary_headers()
    for name in drop:
        del headers[name]
    error = invalid(headers, b"{}")
    assert f"missing header(s) {named}" in error.reason
    assert STRUCTURED in error.reason


@pytest.mark.parametrize("headers", [None, {}])
def test_no_headers_at_all_is_not_a_cloudevent(headers: dict[str, str] | None) -> None:
    assert invalid(headers, b"{}").reason.startswith("not a CloudEvent")


@pytest.mark.parametrize("payload", [b"{not json", b"\xff\xfe", b'{"a": 1'])
def test_invalid_json_data(payload: bytes) -> None:
    assert invalid(binary_headers(), payload).reason.startswith("data is not valid JSON")


def test_non_json_content_type_is_refused() -> None:
    error = invalid(binary_headers(**{"content-type": "text/plain"}), b"hello")
    assert "unsupported content-type 'text/plain'" in error.reason


def test_bad_ce_time() -> None:
    error = invalid(binary_headers(**{"ce-time": "yesterday"}), b"")
    assert "ce-time is not an RFC 3339 time" in error.reason
    assert "yesterday" in error.reason


def test_wrong_specversion_is_invalid_with_a_field_error() -> None:
    error = invalid(binary_headers(**{"ce-specversion": "0.3"}), b"")
    assert error.reason == "invalid CloudEvent attributes"
    assert [e.loc for e in error.errors] == ["specversion"]
    assert "unsupported CloudEvents specversion '0.3'" in error.errors[0].msg


@pytest.mark.parametrize("ce_id", ["", "has space"])
def test_bad_ce_id_is_invalid(ce_id: str) -> None:
    error = invalid(binary_headers(**{"ce-id": ce_id}), b"")
    assert [e.loc for e in error.errors] == ["id"]


# --- structured mode ----------------------------------------------------------------------


def structured_body(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "specversion": "1.0",
        "id": "s-1",
        "source": "github",
        "type": "com.github.push",
        "subject": "repo",
        "time": "2025-01-02T03:04:05.678Z",
    }
    body.update(extra)
    return body


def test_structured_mode_is_read_from_the_body() -> None:
    event = decode(*structured(structured_body(data={"ref": "main"})))
    assert event.id == "s-1"
    assert event.source == "github"
    assert event.type == "com.github.push"
    assert event.subject == "repo"
    assert event.time == WHEN
    assert event.data == {"ref": "main"}


def test_structured_content_type_with_parameters() -> None:
    headers = {"Content-Type": f"{STRUCTURED}; charset=utf-8"}
    event = decode(headers, json.dumps(structured_body(data=[1])).encode())
    assert event.data == [1]


def test_structured_ignores_ce_headers() -> None:
    headers, payload = structured(structured_body())
    headers.update({"ce-id": "other", "ce-type": "other"})
    event = decode(headers, payload)
    assert (event.id, event.type) == ("s-1", "com.github.push")


def test_structured_data_base64() -> None:
    raw = base64.b64encode(json.dumps({"replicas": 4}).encode()).decode()
    event = decode(*structured(structured_body(data_base64=raw)))
    assert event.data == {"replicas": 4}


def test_structured_empty_data_base64_is_no_data() -> None:
    assert decode(*structured(structured_body(data_base64=""))).data is None


@pytest.mark.parametrize(
    "raw",
    ["not base64!!", base64.b64encode(b"not json").decode()],
)
def test_structured_bad_data_base64(raw: str) -> None:
    error = invalid(*structured(structured_body(data_base64=raw)))
    assert "data_base64 does not hold base64-encoded JSON" in error.reason


def test_structured_correlation_from_extension_or_header() -> None:
    by_extension = decode(*structured(structured_body(corralcorrelation="cmd-1")))
    assert by_extension.correlation == "cmd-1"
    by_header = decode(*structured(structured_body(), **{CORRELATION: "cmd-2"}))
    assert by_header.correlation == "cmd-2"


def test_structured_unknown_extensions_are_ignored() -> None:
    event = decode(*structured(structured_body(someextension="x", data=1)))
    assert event.data == 1
    assert not hasattr(event, "someextension")


@pytest.mark.parametrize("body", [[1, 2], "text", 3, None])
def test_structured_body_must_be_an_object(body: Any) -> None:
    error = invalid(*structured(body))
    assert error.reason == "structured CloudEvent must be a JSON object"


def test_structured_body_must_be_json() -> None:
    error = invalid({"content-type": STRUCTURED}, b"<xml/>")
    assert error.reason.startswith("structured CloudEvent is not valid JSON")


def test_structured_missing_attributes_are_named() -> None:
    body = structured_body()
    del body["id"]
    del body["type"]
    error = invalid(*structured(body))
    assert error.reason == "structured CloudEvent lacks attribute(s) id, type"


def test_structured_wrong_specversion() -> None:
    error = invalid(*structured(structured_body(specversion="0.3")))
    assert error.reason == "invalid CloudEvent attributes"
    assert [e.loc for e in error.errors] == ["specversion"]
