"""A base for every resource of the mirror: read-only, with OCI errors."""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from regmirror.errors import Unsupported


class ReadOnlyResource(Resource):
    """
    Answers any method but GET and HEAD with 405 and an OCI error body,
    instead of twisted.web's HTML error pages.
    """

    def render(self, request: Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            error = Unsupported("this mirror is read-only: only GET and HEAD")
            body = error.body()
            request.setResponseCode(error.status)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", str(len(body)).encode("ascii"))
            return b"" if request.method == b"HEAD" else body
        return super().render(request)
