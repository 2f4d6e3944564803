"""
The root of the resource tree, what it answers outside the API (an OCI
404), and the health probes ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from regmirror.errors import NotFound
from regmirror.http.errors import write_error
from regmirror.http.resource import ReadOnlyResource

__all__ = ["Health", "NotFoundResource", "Root"]


class NotFoundResource(ReadOnlyResource):
    """Anything outside ``/v2/``: an OCI error, not an HTML page."""

    isLeaf = True

    def render(self, request: Request) -> Any:
        write_error(request, NotFound("not a registry API path"))
        return NOT_DONE_YET


class Health(ReadOnlyResource):
    """
    A probe: 200 ``ok`` when *check* finds nothing wrong, else 503 with the
    problems, one per line.  What *degraded* finds follows ``ok`` (still
    200): the node serves, less well.
    """

    isLeaf = True

    def __init__(
        self,
        check: Callable[[], list[str]],
        degraded: Callable[[], list[str]] = list,
    ) -> None:
        super().__init__()
        self._check = check
        self._degraded = degraded

    def render_GET(self, request: Request) -> bytes:
        problems = self._check()
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        request.setHeader("Cache-Control", "no-store")
        if problems:
            request.setResponseCode(503)
            return "".join(f"{problem}\n" for problem in problems).encode("utf-8")
        notes = self._degraded()
        if notes:
            return "".join(f"ok, degraded: {note}\n" for note in notes).encode("utf-8")
        return b"ok\n"

    render_HEAD = render_GET


class Root(Resource):
    """``/v2/`` and whatever else the service mounts beside it."""

    def __init__(
        self, api: Resource, children: dict[bytes, Resource] | None = None
    ) -> None:
        super().__init__()
        self.putChild(b"v2", api)
        for name, child in (children or {}).items():
            self.putChild(name, child)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFoundResource()
