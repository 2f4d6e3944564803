"""A base for every resource of the mirror: read-only, with OCI errors."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from regmirror.errors import Unsupported
from regmirror.http.errors import write_error

_log = Logger()


class ReadOnlyResource(Resource):
    """
    Answers any method but GET and HEAD with 405 and an OCI error body,
    instead of twisted.web's HTML error pages.
    """

    def render(self, request: Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            write_error(
                request,
                Unsupported(
                    "this mirror is read-only: only GET and HEAD",
                    {"Allow": "GET, HEAD"},
                ),
            )
            return NOT_DONE_YET
        return super().render(request)


def answer_later(
    request: Request, body: Callable[[], Coroutine[Any, Any, bytes]], what: str
) -> int:
    """
    Answer *request* with the bytes *body* makes (it sets the headers it
    wants), once they are ready: a client that goes away meanwhile cancels
    it, a failure is logged as *what* and answered with a 500.

    :return: ``NOT_DONE_YET``, for ``render_GET`` to return.
    """
    finished = request.notifyFinish()
    d = Deferred.fromCoroutine(_answer(request, body, what, finished))
    finished.addErrback(lambda _: d.cancel())
    return NOT_DONE_YET


async def _answer(
    request: Request,
    body: Callable[[], Coroutine[Any, Any, bytes]],
    what: str,
    finished: Deferred[None],
) -> None:
    try:
        data = await body()
    except CancelledError:
        return  # the client went away
    except Exception:
        _log.failure("cannot make {what}", what=what)
        request.setResponseCode(500)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        data = f"cannot make {what}\n".encode()
    if finished.called:
        return  # the client went away, and the work did not notice
    request.setHeader(b"content-length", str(len(data)).encode("ascii"))
    request.write(data)
    request.finish()
