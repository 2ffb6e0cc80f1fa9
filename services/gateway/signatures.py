"""Pure: webhook signature checks, every comparison constant-time.

- GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`.
- Generic hooks: `X-Corral-Signature: sha256=<hex>`, the same scheme with the hook's secret.
- GitLab and Alertmanager: a shared secret token, compared as a digest.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "sha256="


def hmac_sha256_hex(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def sign(secret: bytes, body: bytes) -> str:
    """The header value a sender computes: `sha256=<hex>`."""
    return PREFIX + hmac_sha256_hex(secret, body)


def verify_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """True when `header` is `sha256=<hex>` of `body` under `secret`. An empty secret never
    verifies anything, so a misconfiguration can never accept unsigned requests."""
    if not secret or not header:
        return False
    expected = sign(secret, body).encode()
    return hmac.compare_digest(expected, header.strip().lower().encode())


def verify_token(expected: bytes, presented: str | None) -> bool:
    """A shared secret sent as is (GitLab's X-Gitlab-Token, a bearer token)."""
    if not expected or presented is None:
        return False
    return hmac.compare_digest(
        hashlib.sha256(expected).digest(), hashlib.sha256(presented.encode()).digest()
    )
