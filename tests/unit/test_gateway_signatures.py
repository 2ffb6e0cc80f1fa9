"""Webhook signatures: GitHub's documented test vector, the generic hook scheme, shared tokens."""

from __future__ import annotations

import pytest

from corral.services.gateway.signatures import hmac_sha256_hex, sign, verify_signature, verify_token

# https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries#testing-the-webhook-payload-validation
GITHUB_SECRET = b"It's a Secret to Everybody"
GITHUB_PAYLOAD = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_github_documented_vector() -> None:
    assert sign(GITHUB_SECRET, GITHUB_PAYLOAD) == GITHUB_SIGNATURE
    assert hmac_sha256_hex(GITHUB_SECRET, GITHUB_PAYLOAD) == GITHUB_SIGNATURE.removeprefix(
        "sha256="
    )
    assert verify_signature(GITHUB_SECRET, GITHUB_PAYLOAD, GITHUB_SIGNATURE)
    assert verify_signature(GITHUB_SECRET, GITHUB_PAYLOAD, GITHUB_SIGNATURE.upper())


@pytest.mark.parametrize(
    ("secret", "body", "header"),
    [
        (b"another secret", GITHUB_PAYLOAD, GITHUB_SIGNATURE),
        (GITHUB_SECRET, b"Hello, World?", GITHUB_SIGNATURE),
        (GITHUB_SECRET, GITHUB_PAYLOAD, None),
        (GITHUB_SECRET, GITHUB_PAYLOAD, ""),
        (GITHUB_SECRET, GITHUB_PAYLOAD, GITHUB_SIGNATURE.removeprefix("sha256=")),
        (GITHUB_SECRET, GITHUB_PAYLOAD, "sha1=" + GITHUB_SIGNATURE.removeprefix("sha256=")),
        (GITHUB_SECRET, GITHUB_PAYLOAD, GITHUB_SIGNATURE[:-1]),
        (GITHUB_SECRET, GITHUB_PAYLOAD, "sha256=é"),
        (b"", GITHUB_PAYLOAD, sign(b"", GITHUB_PAYLOAD)),
    ],
)
def test_wrong_missing_or_malformed_signatures_fail(
    secret: bytes, body: bytes, header: str | None
) -> None:
    assert not verify_signature(secret, body, header)


def test_shared_tokens() -> None:
    assert verify_token(b"gitlab-secret-token", "gitlab-secret-token")
    assert not verify_token(b"gitlab-secret-token", "gitlab-secret-toke")
    assert not verify_token(b"gitlab-secret-token", None)
    assert not verify_token(b"gitlab-secret-token", "")
    assert not verify_token(b"", "")
