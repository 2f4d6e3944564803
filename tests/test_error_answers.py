"""
Error answers, as a client sees them: the status line's reason phrase,
and none of the header fields that describe a body a success would carry.
"""

from __future__ import annotations

from typing import Any

import pytest
from fakeregistry import FakeRegistry
from memory import LAYER, Harness, error_code, image
from twisted.web.server import Request

#: What a blob's success answer carries and an error answer must not.
SUCCESS_ONLY = ("Docker-Content-Digest", "ETag", "Accept-Ranges")
UNKNOWN = "sha256:" + "a" * 64


def pull_limit(request: Request) -> tuple[int, bytes]:
    request.setHeader("Retry-After", "30")
    return 429, b"slow down"


def success_headers(response: Any) -> list[str]:
    return [name for name in SUCCESS_ONLY if response.headers.hasHeader(name)]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_an_upstream_pull_limit_is_429_too_many_requests(
    mirror: Harness, origin: FakeRegistry, method: str
) -> None:
    """An upstream's 429 is passed on with the reason phrase ``Too Many
    Requests`` (not ``Unknown Status``), its ``Retry-After``, and no header
    field of a blob answer."""
    origin.fault = pull_limit
    response = mirror.request(method, f"/v2/app/blobs/{UNKNOWN}")
    assert (response.code, response.phrase) == (429, b"Too Many Requests")
    assert response.headers.getRawHeaders("Retry-After") == ["30"]
    assert success_headers(response) == []
    if method == "GET":
        assert error_code(mirror, response) == "TOOMANYREQUESTS"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_an_unknown_blob_has_no_digest_etag_or_ranges(
    mirror: Harness, method: str
) -> None:
    """``404 BLOB_UNKNOWN`` says nothing of a body it does not have."""
    response = mirror.request(method, f"/v2/app/blobs/{UNKNOWN}")
    assert (response.code, response.phrase) == (404, b"Not Found")
    assert success_headers(response) == []


def test_an_unsatisfiable_range_has_only_its_content_range(
    mirror: Harness, origin: FakeRegistry
) -> None:
    """``416`` carries ``Content-Range: bytes */size`` and the error body's
    own type and length, none of the success answer's fields."""
    content = image(origin)
    response = mirror.request(
        "GET",
        f"/v2/app/blobs/{content['layer']}",
        headers={"Range": f"bytes={len(LAYER)}-"},
    )
    assert response.code == 416
    assert response.headers.getRawHeaders("Content-Range") == [f"bytes */{len(LAYER)}"]
    assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
    assert success_headers(response) == []
    assert error_code(mirror, response) == "RANGE_INVALID"
