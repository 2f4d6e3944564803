"""
Domain errors as HTTP answers: the one place that turns a
:class:`~regmirror.errors.RegistryError` into a status, headers and an OCI
error body, for every resource and for the channel (which answers protocol
errors before there is a request to write to).
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.web.http import RESPONSES
from twisted.web.server import Request

from regmirror.errors import RegistryError

__all__ = ["ErrorAnswer", "break_connection", "error_answer", "reason", "write_error"]

#: Reason phrases (RFC 9110, RFC 6585) of the statuses the mirror answers
#: that Twisted's table lacks (it would say ``Unknown Status``).
_REASONS = {
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
}

#: Header fields that describe a body a success would carry (a blob's
#: digest, its validator, that ranges may be asked for), set before the
#: answer was known: an error answer is not that body, and drops them.
_SUCCESS_ONLY = (
    b"Docker-Content-Digest",
    b"ETag",
    b"Accept-Ranges",
    b"Content-Range",
    b"Content-Length",
    b"Content-Type",
    b"Location",
)


def reason(status: int) -> bytes:
    """The reason phrase of *status* for a status line."""
    return _REASONS.get(status) or RESPONSES.get(status, b"Unknown Status")


@frozen
class ErrorAnswer:
    """
    What a client is answered for an error.

    :ivar status: the HTTP status.
    :ivar headers: the response's header fields, in order: the type, the
        length, then those the error names (``Allow``, ``Retry-After``…).
    :ivar body: the OCI error body (``{"errors": [{"code": …, …}]}``).
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


def error_answer(error: RegistryError) -> ErrorAnswer:
    """The answer to *error*."""
    body = error.body()
    fields = [
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"%d" % len(body)),
    ]
    fields.extend(
        (name.encode("utf-8"), value.encode("utf-8"))
        for name, value in error.headers.items()
    )
    return ErrorAnswer(error.status, tuple(fields), body)


def write_error(request: Request, error: RegistryError) -> None:
    """
    Answer *request* with *error* and finish it (twisted.web leaves the
    body out for HEAD): its status with its reason phrase, and none of the
    header fields a success would have carried.
    """
    answer = error_answer(error)
    request.setResponseCode(answer.status, reason(answer.status))
    for name in _SUCCESS_ONLY:
        request.responseHeaders.removeHeader(name)
    for name, value in answer.headers:
        request.setHeader(name, value)
    request.write(answer.body)
    request.finish()


def break_connection(request: Request) -> None:
    """
    Drop the client's connection mid-response, so that it sees an error
    rather than a short body it could take for complete: what an error
    becomes once the head has gone.
    """
    transport: Any = request.channel.transport if request.channel else None
    if transport is not None:
        transport.abortConnection()
