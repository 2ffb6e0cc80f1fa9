"""`corral.bus.client.parse_headers` against nats-py's own parser, which it replaces."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient

from corral.bus.client import Client, parse_headers
from corral.bus.codec import encode
from corral.schemas.envelope import CloudEvent


def theirs(raw: bytes) -> dict[str, str]:
    return NatsClient._parse_header_lines(raw)


def block(headers: dict[str, str]) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"


def test_a_cloudevent_header_block() -> None:
    event = CloudEvent(source="tests", type="io.corral.service.scale", data={"replicas": 2})
    headers, _ = encode(event)
    raw = block({**headers, "corral-correlation": "c-1"})
    assert parse_headers(raw) == theirs(raw) == {**headers, "corral-correlation": "c-1"}


def test_the_client_uses_it() -> None:
    assert Client._parse_header_lines(b"a: b\r\n\r\n") == {"a": "b"}
    assert Client._parse_header_lines is not NatsClient._parse_header_lines


def test_edge_cases_match() -> None:
    cases = [
        b"",
        b"\r\n",
        b"no-colon\r\n",
        b"a:b\r\nc:\td \r\n",
        b"dup: 1\r\ndup: 2\r\n",
        b" spaced : value\r\n",
        b"in side: x\r\n",
        b"\x1ckey: x\r\n",
        b"k\x1fy: x\r\n",
        b": empty name\r\n",
        b"caf\xc3\xa9: x\r\n",
        b"bad\xff: x\r\n",
        b"v: caf\xc3\xa9\r\n",
        b"v: \xe2\x82\r\n",
        b"v: \xe2:\x82\xac\r\n",
        b"v: a\x85\xa0 \r\n",
        b"v: \xc2\x85x\xc2\xa0\r\n",
        b"k: v\nw: x\r\n",
        b"k: v\rw: x\r\n",
    ]
    for raw in cases:
        assert parse_headers(raw) == theirs(raw), raw


_PIECES = st.sampled_from(
    [
        b"a",
        b"Z",
        b"-",
        b"_",
        b"0",
        b":",
        b" ",
        b"\t",
        b"\r",
        b"\n",
        b"\r\n",
        b"\x0b",
        b"\x0c",
        b"\x1c",
        b"\x1f",
        b"\x85",
        b"\xa0",
        b"\xc2",
        b"\xc2\x85",
        b"\xc2\xa0",
        b"\xe2\x80",
        b"\xe2\x80\x83",
        b"\xff",
        b"\xe9",
        b"\xf0\x9f\x98\x80",
        b"\x00",
    ]
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PIECES, max_size=40).map(b"".join))
def test_any_bytes_give_the_same_dict(raw: bytes) -> None:
    assert parse_headers(raw) == theirs(raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_binary_gives_the_same_dict(raw: bytes) -> None:
    assert parse_headers(raw) == theirs(raw)
