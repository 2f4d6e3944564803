"""
AWS Signature Version 4 by botocore's signers, at the injected clock's
time: ``Authorization`` headers, and the query strings of presigned URLs.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth

#: The payload hash that lets a body stream without being read twice.
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
#: The payload hash of a request without a body.
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class _ClockedSigning:
    """
    SigV4 at the injected clock's time: botocore's ``add_auth`` reads the
    wall clock, so the same steps run here with ``context["timestamp"]``
    set by the caller.  Two of those steps are botocore's private methods,
    used here only (tests/test_private_apis.py fails if their use in
    ``add_auth`` changes).
    """

    def add_auth(self, request: Any) -> None:
        signer: Any = self
        signer._modify_request_before_signing(request)
        canonical = signer.canonical_request(request)
        signature = signer.signature(signer.string_to_sign(request, canonical), request)
        signer._inject_signature_to_request(request, signature)


class HeaderSigner(_ClockedSigning, S3SigV4Auth):  # type: ignore[misc]
    """``Authorization`` header signing, with the payload hash we chose."""

    def payload(self, request: Any) -> str:
        # A streamed body cannot be hashed before it is sent: the caller
        # says UNSIGNED-PAYLOAD for those and a real hash for small ones.
        return str(request.context["payload"])


class QuerySigner(_ClockedSigning, S3SigV4QueryAuth):  # type: ignore[misc]
    """Presigned URLs."""


def timestamp(seconds: float) -> str:
    """SigV4's form of the time *seconds* (``20210101T000000Z``, UTC)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y%m%dT%H%M%SZ")


def aws_quote(text: str, safe: str = "") -> str:
    """AWS's URI encoding: everything but ``A-Za-z0-9-_.~`` (and *safe*)."""
    return quote(text, safe=safe + "~")
