"""The NATS client Corral's workers connect with: nats-py's, with a cheaper header parser.

Every CloudEvent carries about nine headers, and nats-py parses each received message's header
block line by line, decoding and checking every name character by character in Python. That
was a tenth of the api worker's CPU. `parse_headers` gives the same dict (the unit tests hold it
to nats-py's own parser on arbitrary bytes) from one decode of the whole block.
"""

from __future__ import annotations

from nats.aio.client import Client as NatsClient

_CRLF = "\r\n"
_STRIPPED = " \t\n\r\x0b\x0c"  # what bytes.strip() removes, the way nats-py strips
_HEADER_KEYS = "_parse_header_lines"


def parse_headers(raw: bytes) -> dict[str, str]:
    """`Name: value` lines to a dict. Like nats-py: a name that is not ASCII or holds white
    space is skipped, a value that is not UTF-8 gets U+FFFD, a later duplicate name wins."""
    out: dict[str, str] = {}
    # CR, LF and ':' are ASCII, so decoding the block once and splitting it gives what
    # splitting the bytes and decoding each piece would (an invalid sequence never swallows
    # an ASCII byte).
    for line in raw.decode("utf-8", "replace").split(_CRLF):
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip(_STRIPPED)
        if not key.isascii() or (key and key.split() != [key]):
            continue
        out[key] = value.strip(_STRIPPED)
    return out


class Client(NatsClient):
    """nats-py's client with `parse_headers` in place of its per-character parser."""

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        return parse_headers(raw)


if not hasattr(NatsClient, _HEADER_KEYS):  # pragma: no cover - a nats-py that moved it
    raise ImportError(f"nats-py's Client no longer has {_HEADER_KEYS}; review bus/client.py")
