"""Pure: is a slash-command request really from Slack (or Mattermost)?

Slack signs each request: `X-Slack-Signature: v0=<hex HMAC-SHA256 of "v0:{timestamp}:{body}">`
under the app's signing secret, with `X-Slack-Request-Timestamp`; a timestamp more than five
minutes from now is refused, so a captured request cannot be replayed later. Mattermost sends
the slash command's token in the form (and as `Authorization: Token <token>`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

MAX_SKEW = 300.0
"""seconds a Slack timestamp may be off, either way"""


def slack_signature(secret: bytes, timestamp: str, body: bytes) -> str:
    base = b"v0:" + timestamp.encode() + b":" + body
    return "v0=" + hmac.new(secret, base, hashlib.sha256).hexdigest()


def slack_problem(
    secret: bytes, timestamp: str | None, signature: str | None, body: bytes, now: float
) -> str | None:
    """None when the request is Slack's; otherwise why not."""
    if not secret:
        return "no signing secret is configured"
    if not timestamp or not signature:
        return "missing X-Slack-Signature or X-Slack-Request-Timestamp"
    try:
        sent = int(timestamp.strip())
    except ValueError:
        return "X-Slack-Request-Timestamp is not a number"
    if abs(now - sent) > MAX_SKEW:
        return (
            f"X-Slack-Request-Timestamp is {abs(now - sent):.0f}s off (more than "
            f"{MAX_SKEW:.0f}s): a replayed or delayed request"
        )
    expected = slack_signature(secret, timestamp.strip(), body).encode()
    if not hmac.compare_digest(expected, signature.strip().encode()):
        return "wrong X-Slack-Signature"
    return None


def token_ok(expected: Iterable[bytes], presented: str | None) -> bool:
    """A Mattermost slash command token, compared in constant time against each configured."""
    if not presented:
        return False
    digest = hashlib.sha256(presented.encode()).digest()
    found = False
    for token in expected:
        if token and hmac.compare_digest(hashlib.sha256(token).digest(), digest):
            found = True
    return found
