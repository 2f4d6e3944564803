"""
The per-request state (:mod:`regmirror.http.request`) and the one mapping
of errors to answers (:mod:`regmirror.http.errors`): what the API learns
about a request reaches the access log through the request itself, and
every writer of an OCI error writes the same answer.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from fakeregistry import FakeRegistry
from memory import LAYER, Harness, image
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, formatEvent
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from regmirror.errors import RangeInvalid, Unsupported
from regmirror.http.errors import error_answer
from regmirror.http.request import MirrorRequest
from regmirror.http.site import MirrorSite
from regmirror.ini_values import parse_networks
from regmirror.metrics import Metrics
from regmirror.reference import parse_digest


def _get(mirror: Harness, target: str) -> tuple[bytes, list[Any]]:
    """A GET of *target* through a MirrorSite over the harness's resources:
    the raw response and the requests the site made."""
    site = MirrorSite(mirror.root, mirror.clock)
    made: list[Any] = []

    def factory(*args: Any, **kwargs: Any) -> MirrorRequest:
        request = MirrorRequest(*args, **kwargs)
        made.append(request)
        return request

    site.requestFactory = factory
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        b"GET %s HTTP/1.1\r\nHost: mirror.test\r\n\r\n" % target.encode()
    )
    for _ in range(5):
        mirror.settle()
    return transport.value(), made


def _access(logged: list[LogEvent]) -> list[LogEvent]:
    return [e for e in logged if e.get("log_namespace") == "regmirror.access"]


def test_site_makes_mirror_requests() -> None:
    """The site's requests are MirrorRequests, which carry the state."""
    assert MirrorSite.requestFactory is MirrorRequest


def test_access_log_reads_the_request_info(
    mirror: Harness, origin: FakeRegistry, logged: list[LogEvent]
) -> None:
    """A blob pulled through the site: the access line has the namespace,
    how the cache served it and the upstream, from the request's info; the
    second pull is a hit."""
    content = image(origin)
    target = f"/v2/library/app/blobs/{content['layer']}"
    raw, made = _get(mirror, target)
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(LAYER)
    [request] = made
    assert request.info is not None
    assert (request.info.namespace, request.info.endpoint) == ("docker.io", "blobs")
    info = request.info
    [line] = _access(logged)
    assert (line["namespace"], line["cache"], line["upstream"]) == (
        "docker.io",
        info.cache,
        info.upstream or "-",
    )
    assert info.cache in ("miss", "hit")
    logged.clear()
    _get(mirror, target)
    [line] = _access(logged)
    assert (line["cache"], line["upstream"]) == ("hit", "-")


@pytest.mark.parametrize("why", ["too big", "cache unwritable"])
def test_a_relayed_blob_counts_and_names_its_upstream(
    mirror: Harness, origin: FakeRegistry, logged: list[LogEvent], why: str
) -> None:
    """
    A blob relayed uncached (larger than the cache keeps, or the cache
    folder refusing writes) was received from its upstream all the same:
    its bytes count in ``regmirror_upstream_bytes_total`` for that
    upstream (the status page's "fetched upstream"), and its access line
    names the upstream beside ``cache=relay``.
    """
    content = image(origin)
    if why == "too big":
        mirror.store.max_size = len(LAYER)  # keeps 90% of it after eviction
    else:
        mirror.store.degrade(OSError(errno.EROFS, "Read-only file system"))
    raw, _ = _get(mirror, f"/v2/library/app/blobs/{content['layer']}")
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(LAYER)
    assert not mirror.store.has_blob(parse_digest(content["layer"]))
    [line] = _access(logged)
    assert (line["cache"], line["upstream"]) == ("relay", "origin")
    registry = mirror.metrics.registry
    assert registry.get_sample_value(
        "regmirror_served_bytes_total", {"source": "relay"}
    ) == len(LAYER)
    assert registry.get_sample_value(
        "regmirror_upstream_bytes_total", {"upstream": "origin"}
    ) == len(LAYER)


def test_access_log_outside_the_api(mirror: Harness, logged: list[LogEvent]) -> None:
    """A request the API did not answer has no info: dashes, no duration."""
    raw, [request] = _get(mirror, "/elsewhere")
    assert raw.startswith(b"HTTP/1.1 404 ")
    assert request.info is None
    [line] = _access(logged)
    assert (line["namespace"], line["cache"], line["user"]) == ("-", "-", "-")
    assert line["duration"] == 0.0


def test_error_answer_is_type_length_then_the_errors_headers() -> None:
    """An error's answer: its status, JSON type and length, its own headers
    after them, and the OCI body."""
    error = RangeInvalid("no", {"Content-Range": "bytes */10"})
    answer = error_answer(error)
    assert answer.status == 416
    assert answer.body == error.body()
    assert answer.headers == (
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"%d" % len(error.body())),
        (b"Content-Range", b"bytes */10"),
    )


def test_channel_and_resources_write_the_same_error(mirror: Harness) -> None:
    """A write method refused by the channel (no request object) and by
    the API (in memory, no channel) gets the same OCI body and Allow."""
    site = MirrorSite(mirror.root, mirror.clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"DELETE /healthz HTTP/1.1\r\nHost: mirror.test\r\n\r\n")
    raw = transport.value()
    message = "this mirror is read-only: only GET and HEAD here"
    expected = error_answer(Unsupported(message, {"Allow": "GET, HEAD"}))
    assert raw.startswith(b"HTTP/1.1 405 ")
    assert raw.endswith(b"\r\n\r\n" + expected.body)
    assert b"Allow: GET, HEAD\r\n" in raw


class _Unfinished(Resource):
    """Answers with the head and *body*, then never finishes."""

    isLeaf = True

    def __init__(self, body: bytes | None) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: Any) -> Any:
        if self.body is not None:
            request.setHeader("Content-Length", "1000")
            request.write(self.body)
        return NOT_DONE_YET


@pytest.mark.parametrize(
    ("body", "status", "sent"), [(None, 499, 0), (b"x" * 100, 200, 100)]
)
def test_a_request_whose_connection_is_lost_has_its_line(
    logged: list[LogEvent], body: bytes | None, status: int, sent: int
) -> None:
    """A request whose connection is lost before it finished had no access
    line: it has one, marked aborted, with the status sent (499 when no
    head was) and the bytes written; a finished request is not aborted."""
    site = MirrorSite(_Unfinished(body), Clock())
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: mirror.test\r\n\r\n")
    assert _access(logged) == []
    channel.connectionLost(Failure(ConnectionDone()))
    [line] = _access(logged)
    assert (line["status"], line["bytes"], line["aborted"]) == (status, sent, True)
    assert formatEvent(line).endswith(" aborted")
    channel.connectionLost(Failure(ConnectionDone()))
    assert len(_access(logged)) == 1


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"curl/8.5.0", "curl/8.5.0"),
        (b"a\x1b[31mb", "a\\x1B[31mb"),
        (b'say "hi" \\o/', "say \\x22hi\\x22 \\x5Co/"),
        (b"\x07\x7f\x9b\xff", "\\x07\\x7F\\x9B\\xFF"),
        ("caf\u00e9".encode(), "caf\u00e9"),
        ("\u202eevil".encode(), "\\u202Eevil"),
        ("\u0085".encode(), "\\x85"),
    ],
)
def test_client_chosen_text_is_escaped_in_the_access_line(
    logged: list[LogEvent], raw: bytes, shown: str
) -> None:
    """What a client chose reaches the access event escaped: controls
    (C0, DEL, C1), format characters, bytes that are no UTF-8, the quote
    and the backslash as ``\\xHH`` (``\\uHHHH`` beyond); other text as is."""
    site = MirrorSite(_Unfinished(b""), Clock())
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(
        b"GET /x HTTP/1.1\r\nHost: mirror.test\r\nUser-Agent: " + raw + b"\r\n\r\n"
    )
    channel.connectionLost(Failure(ConnectionDone()))
    [line] = _access(logged)
    assert line["agent"] == shown


def test_a_token_login_logs_its_user(tmp_path: Any, logged: list[LogEvent]) -> None:
    """A ``/token`` request that logged in with Basic had ``-`` as its
    user in the access line: it names the user who logged in; a wrong
    password names none."""
    from test_access import ALICE, PASSWORD, basic, guarded

    harness, _ = guarded(tmp_path)
    site = MirrorSite(harness.root, harness.clock)
    for password, status, user in ((PASSWORD, 200, ALICE), ("wrong", 401, "-")):
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            b"GET /token?scope=repository:app:pull HTTP/1.1\r\n"
            b"Host: mirror.test\r\nAuthorization: %s\r\n\r\n"
            % basic(ALICE, password)["Authorization"].encode()
        )
        for _ in range(5):
            harness.settle()
        assert transport.value().startswith(b"HTTP/1.1 %d " % status)
        [line] = _access(logged)
        assert (line["user"], line["status"], line["uri"]) == (
            user,
            status,
            "/token?scope=repository:app:pull",
        )
        logged.clear()


# -- requests the connection refuses, before any resource ------------------------


class _Ok(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


def _refused_site(**kwargs: Any) -> tuple[MirrorSite, Clock, Metrics]:
    clock, metrics = Clock(), Metrics()
    return MirrorSite(_Ok(), clock, metrics=metrics, **kwargs), clock, metrics


def _requests_total(metrics: Metrics, **labels: str) -> float:
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "regmirror_requests_total" and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


def test_a_head_too_slow_has_its_line_with_what_came(
    logged: list[LogEvent],
) -> None:
    """A request line dripped past the head timeout gets 408 and an access
    line with what of it came (no version yet: ``-``), counted as a
    request refused before routing."""
    site, clock, metrics = _refused_site()
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /v2/sl")
    channel.dataReceived(b"ow/manifests")
    clock.advance(31)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    [line] = _access(logged)
    assert (line["method"], line["uri"], line["protocol"]) == (
        "GET",
        "/v2/slow/manifests",
        "-",
    )
    assert line["status"] == 408 and line["client"] == "192.168.1.1"
    assert line["bytes"] == len(transport.value().partition(b"\r\n\r\n")[2])
    assert _requests_total(metrics, namespace="", endpoint="other", status="408") == 1


def test_a_refused_request_behind_a_trusted_proxy_names_the_client(
    logged: list[LogEvent],
) -> None:
    """A GET with a body, from a trusted proxy: its 413 line names the
    client the proxy's header names, with its User-Agent, as any request's
    line does; a 405 after a served GET on one connection has its own
    line, the GET its own."""
    site, _, metrics = _refused_site(trusted_proxies=parse_networks("192.168.1.1"))
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(
        b"GET /v2/x/manifests/y HTTP/1.1\r\nHost: m\r\nX-Forwarded-For: 10.9.8.7\r\n"
        b"User-Agent: curl\x1b\r\nContent-Length: 3\r\n\r\nabc"
    )
    [line] = _access(logged)
    assert (line["client"], line["status"], line["agent"]) == (
        "10.9.8.7",
        413,
        "curl\\x1B",
    )
    logged.clear()
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(
        b"GET /a HTTP/1.1\r\nHost: m\r\n\r\nDELETE /b HTTP/1.1\r\nHost: m\r\n\r\n"
    )
    assert [(e["method"], e["uri"], e["status"]) for e in _access(logged)] == [
        ("GET", "/a", 200),
        ("DELETE", "/b", 405),
    ]
    assert _requests_total(metrics, method="other", status="405") == 1
    assert _requests_total(metrics, method="GET", status="413") == 1


@pytest.mark.parametrize("n", ["%C2%B2", "%D9%A2", "%EF%BC%91", "1%C2%B9"])
def test_a_page_size_in_other_than_ascii_digits_is_invalid(
    mirror: Harness, origin: FakeRegistry, logged: list[LogEvent], n: str
) -> None:
    """``tags/list?n=`` with a digit of another script (``²``, which
    ``str.isdigit`` takes and ``int`` refuses: a 500 with a traceback;
    ``٢``, ``１``, which ``int`` takes) is ``PAGINATION_NUMBER_INVALID``,
    and the upstream is not asked."""
    image(origin)
    response = mirror.request("GET", f"/v2/library/app/tags/list?n={n}")
    assert response.code == 400
    assert b"PAGINATION_NUMBER_INVALID" in mirror.body(response)
    assert not [r for r in origin.requests if "tags/list" in r[1]]
    assert not [e for e in logged if e.get("log_failure") is not None]
