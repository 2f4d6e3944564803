"""
The request: what the mirror learns about one as it answers it
(:class:`RequestInfo`, for the metrics and the access log), carried by
:class:`MirrorRequest`; the way its query and head are read, and a whole
body written.
"""

from __future__ import annotations

from attrs import define
from twisted.python.failure import Failure
from twisted.web.server import Request

from regmirror.access.clients import valid_host
from regmirror.errors import BadRequest
from regmirror.routing import Route, Router

__all__ = [
    "MirrorRequest",
    "RequestInfo",
    "ns",
    "query",
    "refuse_malformed_head",
    "route_request",
    "start_info",
    "text_header",
    "write_body",
]


@define
class RequestInfo:
    """
    What the API learnt about a request while answering it.

    :ivar started: when the API took it, in the reactor's seconds.
    :ivar namespace: the namespace it was routed to; empty before routing.
    :ivar endpoint: ``base``, ``manifests``, ``blobs``, ``tags``,
        ``referrers``, ``cluster``, ``token`` or ``other``.
    :ivar user: who the access rules let in, if anyone logged in.
    :ivar cache: how a blob was served: ``hit``, ``miss``, ``relay``,
        ``redirect``.
    :ivar upstream: where a download the blob came from reads.
    """

    started: float
    namespace: str = ""
    endpoint: str = "other"
    user: str | None = None
    cache: str | None = None
    upstream: str | None = None


class MirrorRequest(Request):
    """
    The mirror's requests (``MirrorSite.requestFactory``): a request the
    API answers carries its :class:`RequestInfo` for the access log, and
    one whose connection is lost before it finished (the client went away,
    or the mirror broke the response) is logged all the same, as
    ``aborted``.

    :ivar info: set by the API; ``None`` for other resources.
    :ivar aborted: its connection was lost before it finished.
    """

    info: RequestInfo | None = None
    aborted: bool = False
    #: its head was read whole: a request the access log must have a line for
    _received: bool = False

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._received = True
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        # The site logs finished requests; the base class forgets the
        # channel (and with it the site) here.
        site = getattr(self.channel, "factory", None)
        super().connectionLost(reason)
        if self._received and not self.finished and not self.aborted:
            self.aborted = True
            if site is not None:
                site.log(self)


def start_info(request: Request, started: float) -> RequestInfo:
    """
    The info of a request the API begins to answer at *started*, attached
    to it when it is a :class:`MirrorRequest`.  A plain ``Request`` (the
    unit tests' in-memory site) gets one all the same: the API's metrics
    read it; only the access log, which such a site does not write, would.
    """
    info = RequestInfo(started=started)
    if isinstance(request, MirrorRequest):
        request.info = info
    return info


def query(request: Request, name: str) -> str | None:
    """The first value of query parameter *name*, if any."""
    values: list[bytes] | None = request.args.get(name.encode("ascii"))
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


def write_body(
    request: Request, content_type: str, body: bytes, status: int = 200
) -> None:
    """Answer *request* with *body*, whole, and finish it."""
    request.setResponseCode(status)
    request.setHeader("Content-Type", content_type)
    request.setHeader("Content-Length", str(len(body)))
    request.write(body)
    request.finish()


def route_request(router: Router, request: Request, name: str) -> Route:
    """
    The route of a request for repository *name*, from its ``ns`` parameter
    and ``Host`` header: the one decision of a request's namespace, for a
    pull and for a token (``/token`` routes each scope's name with its own
    ``ns`` and ``Host``, which a client takes from our challenge's realm).

    :raises BadRequest: for ``ns`` given more than once.
    """
    return router.route(name, ns=ns(request), host=text_header(request, "Host"))


def ns(request: Request) -> str | None:
    """
    The ``ns`` parameter.

    :raises BadRequest: when given more than once: which one counts would
        depend on who reads it (a proxy in front, or us).
    """
    values = request.args.get(b"ns") or []
    if len(values) > 1:
        raise BadRequest(f"{len(values)} ns parameters; one allowed")
    return query(request, "ns")


def text_header(request: Request, name: str) -> str | None:
    """
    A request header read whole: a list-based field (``Accept``, ``Range``)
    sent on several lines means the lines joined with ", " (RFC 9110
    5.3).  ``getHeader`` would keep only the last line: dockerd sends each
    ``Accept`` type on a line of its own, in an order that changes.
    """
    # By bytes: a str name makes Twisted decode the value as UTF-8, which
    # any client can make fail.
    lines = request.requestHeaders.getRawHeaders(name.lower().encode("ascii"))
    if not lines:
        return None
    return ", ".join(line.decode("latin-1") for line in lines)


#: Fields that may appear once only (RFC 9110 5.3, RFC 9112 3.2 for
#: ``Host``): which of several lines counts would depend on who reads them
#: (a proxy in front may take the first, Twisted's ``getHeader`` the last).
_SINGLETONS = (b"host", b"authorization")


def refuse_malformed_head(request: Request) -> None:
    """
    :raises BadRequest: when a field that may appear once appears more
        often, or the ``Host`` is missing (HTTP/1.1) or no ``host[:port]``
        (RFC 9112 3.2: 400),
        before anything reads it: routing, and the challenge's realm.
    """
    for name in _SINGLETONS:
        lines = request.requestHeaders.getRawHeaders(name) or []
        if len(lines) > 1:
            raise BadRequest(f"{len(lines)} {name.decode()} header lines; one allowed")
    host = request.requestHeaders.getRawHeaders(b"host")
    if not host and request.clientproto == b"HTTP/1.1":
        raise BadRequest("an HTTP/1.1 request must have a Host header")
    if host and not valid_host(host[0].decode("latin-1")):
        raise BadRequest("the Host header is not a host[:port]")
