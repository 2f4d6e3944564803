"""
Numbers an upstream writes in its headers (``RateLimit-*``, a HEAD's
``Content-Length``) count only in ASCII digits: ``str.isdigit`` takes
other scripts' digits (``²``, a byte of Latin-1), which ``int`` refuses.
"""

from __future__ import annotations

from typing import Any

from fakeregistry import FakeRegistry
from memory import Harness, image
from twisted.logger import LogEvent
from twisted.web.server import Request


class _Superscript(FakeRegistry):
    """Sends its pull quota with a superscript two (0xB2 in Latin-1)."""

    def _manifest(self, name: str, reference: str, request: Request) -> Any:
        body = super()._manifest(name, reference, request)
        request.responseHeaders.setRawHeaders(b"RateLimit-Limit", [b"\xb2;w=21600"])
        request.responseHeaders.setRawHeaders(
            b"RateLimit-Remaining", [b"1\xb2;w=21600"]
        )
        return body


def test_a_quota_in_other_digits_is_no_quota(
    tmp_path: Any, logged: list[LogEvent]
) -> None:
    """A manifest answered with ``RateLimit-Remaining: ²`` made the
    request fail with an unhandled ValueError (500): the header is
    ignored, as any other that is no number, and the manifest served."""
    origin = _Superscript()
    image(origin)
    mirror = Harness(str(tmp_path / "cache"), {"origin": origin})
    response = mirror.request("GET", "/v2/library/app/manifests/latest")
    assert response.code == 200, mirror.body(response)
    assert not [e for e in logged if e.get("log_failure") is not None]
