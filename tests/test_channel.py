"""
The HTTP connection (:mod:`regmirror.http.channel`) driven byte by byte over an
in-memory transport: what a read-only registry answers to writes and to
request heads too big to take, before any resource sees the request.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request

from regmirror.http.channel import MAX_HEADER_BYTES, MAX_HEADERS, MAX_REQUEST_LINE
from regmirror.http.site import MirrorSite


class _Leaf(Resource):
    """Answers GET and HEAD with ``ok``: anything else must never get here."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendered: list[bytes] = []

    def render(self, request: Request) -> bytes:
        self.rendered.append(request.method)
        return b"ok"


def _site() -> tuple[MirrorSite, _Leaf]:
    leaf = _Leaf()
    root = Resource()
    for name in (
        b"v2",
        b"token",
        b"metrics",
        b"healthz",
        b"readyz",
        b"_status",
        b"_status.json",
        b"",
    ):
        root.putChild(name, leaf)
    return MirrorSite(root, Clock()), leaf


def _connect() -> tuple[Any, StringTransport, _Leaf]:
    site, leaf = _site()
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, leaf


def _answer(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Status, headers (lower-case names) and body of the one answer in *raw*."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _codes(body: bytes) -> list[str]:
    return [entry["code"] for entry in json.loads(body)["errors"]]


# -- writes: 405 from the request line ------------------------------------------

#: (request head, body sent after it): pushes and other writes, whatever
#: their framing says.
WRITES: list[tuple[str, bytes, bytes]] = [
    (
        "put-manifest-2-bytes",
        b"PUT /v2/library/busybox/manifests/latest HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/vnd.oci.image.manifest.v1+json\r\n"
        b"Content-Length: 2\r\n\r\n",
        b"{}",
    ),
    (
        "post-upload-no-body",
        b"POST /v2/library/busybox/blobs/uploads/ HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"",
    ),
    (
        "post-10GiB",
        b"POST /v2/library/busybox/blobs/uploads/ HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 10737418240\r\n\r\n",
        b"\0" * 100_000,
    ),
    (
        "patch-chunked",
        b"PATCH /v2/library/busybox/blobs/uploads/abc HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "put-cl-and-te",
        b"PUT /v2/a/manifests/b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"0\r\n\r\n",
    ),
    (
        "put-two-content-lengths",
        b"PUT /v2/a/manifests/b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        b"Content-Length: 5\r\n\r\n",
        b"hello",
    ),
    (
        "put-garbage-content-length",
        b"PUT /v2/a/manifests/b HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
        b"hello",
    ),
    (
        "delete-manifest",
        b"DELETE /v2/library/busybox/manifests/sha256:"
        + b"a" * 64
        + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"",
    ),
    ("post-base", b"POST /v2/ HTTP/1.0\r\n\r\n", b""),
    ("options-star", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", b""),
    ("lower-case-get", b"get /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", b""),
    ("post-metrics", b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b""),
    ("put-healthz", b"PUT /healthz HTTP/1.1\r\nContent-Length: 1\r\n\r\n", b"x"),
    ("post-readyz", b"POST /readyz HTTP/1.1\r\n\r\n", b""),
    ("post-status", b"POST /_status HTTP/1.1\r\n\r\n", b""),
    ("post-status-json", b"POST /_status.json HTTP/1.1\r\n\r\n", b""),
    ("post-root", b"POST / HTTP/1.1\r\n\r\n", b""),
    (
        "post-absolute-form",
        b"POST http://mirror.test/v2/a/blobs/uploads/ HTTP/1.1\r\n\r\n",
        b"",
    ),
]


@pytest.mark.parametrize(
    ("head", "body"), [pytest.param(h, b, id=i) for i, h, b in WRITES]
)
def test_writes_get_405_unsupported_from_the_request_line(
    head: bytes, body: bytes
) -> None:
    """
    A push or any other method but GET and HEAD gets ``405`` with the OCI
    ``UNSUPPORTED`` code and ``Allow: GET, HEAD``, decided from the request
    line whatever Content-Length or Transfer-Encoding say (no 400 or 413
    for their framing games): nothing reaches a resource, nothing of the
    body is read, the connection closes, and a request hidden in the body
    is never answered.
    """
    channel, transport, leaf = _connect()
    channel.dataReceived(head + body + b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = transport.value()
    status, headers, answer = _answer(raw)
    assert status == 405, raw
    assert headers[b"allow"] == b"GET, HEAD"
    assert headers[b"connection"] == b"close"
    assert headers[b"content-type"] == b"application/json"
    assert _codes(answer) == ["UNSUPPORTED"]
    assert int(headers[b"content-length"]) == len(answer)
    assert raw.count(b"HTTP/1.") == 1
    assert transport.disconnecting
    assert leaf.rendered == []


def test_405_is_sent_before_the_body_is_read() -> None:
    """The answer to a push goes out as soon as its head has arrived, while
    the body announced (10 GiB) has not: the client is never asked for it
    (no ``100 Continue``) and nothing of it is buffered."""
    channel, transport, _ = _connect()
    channel.dataReceived(
        b"PUT /v2/library/busybox/blobs/uploads/x HTTP/1.1\r\nHost: x\r\n"
        b"Expect: 100-continue\r\nContent-Length: 10737418240\r\n\r\n"
    )
    raw = transport.value()
    assert raw.startswith(b"HTTP/1.1 405 "), raw
    assert b"100 Continue" not in raw
    assert transport.disconnecting
    for _ in range(64):
        channel.dataReceived(b"\0" * (1 << 20))
    assert transport.value() == raw
    assert len(channel.clearLineBuffer()) == 0
    request = channel.requests[-1] if channel.requests else None
    assert getattr(request, "content", None) is None


@pytest.mark.parametrize("method", [b"HEAD", b"POST", b"PUT", b"DELETE"])
def test_token_endpoint_takes_get_only(method: bytes) -> None:
    """``/token`` (a leaf: ``/token/...`` and ``/%74oken`` reach it too)
    answers anything but GET, HEAD included, with 405 and ``Allow: GET``."""
    for path in (b"/token", b"/token?scope=x", b"/token/x", b"/%74oken"):
        channel, transport, leaf = _connect()
        channel.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = _answer(transport.value())
        assert (status, headers[b"allow"]) == (405, b"GET"), path
        assert leaf.rendered == []
        if method == b"HEAD":
            assert body == b""
            assert int(headers[b"content-length"]) > 0
        else:
            assert _codes(body) == ["UNSUPPORTED"]


@pytest.mark.parametrize(
    "path", [b"/v2/", b"/v2/a/manifests/b", b"/token", b"/metrics", b"/_status"]
)
def test_get_is_served(path: bytes) -> None:
    """GET reaches the resources everywhere; HEAD everywhere but /token."""
    for method in (b"GET", b"HEAD"):
        if (method, path) == (b"HEAD", b"/token"):
            continue
        channel, transport, leaf = _connect()
        channel.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 200 "), (method, path)
        assert leaf.rendered == [method]


def test_get_with_a_body_still_gets_413() -> None:
    """A GET announcing a body is not a write: it keeps its 413."""
    channel, transport, _ = _connect()
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting


def test_writes_pipelined_after_a_get_get_405() -> None:
    """On a kept-alive connection, a push after a served GET gets its 405."""
    channel, transport, leaf = _connect()
    channel.dataReceived(
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"
        b"PUT /v2/a/manifests/b HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
    )
    raw = transport.value()
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 405 " in raw
    assert leaf.rendered == [b"GET"]
    assert transport.disconnecting


# -- oversized request heads: 414 and 431 ------------------------------------


def _get(target: bytes, *fields: bytes) -> bytes:
    return b"\r\n".join([b"GET " + target + b" HTTP/1.1", *fields, b"", b""])


def _target(length: int) -> bytes:
    """A ``/v2/...`` request target of exactly *length* bytes."""
    return b"/v2/" + b"a" * (length - 4)


def _line(length: int) -> bytes:
    """A request line (``GET target HTTP/1.1``) of exactly *length* bytes."""
    return _target(length - len(b"GET  HTTP/1.1"))


def _fields(count: int, total: int) -> list[bytes]:
    """*count* header lines of exactly *total* bytes together (line ends
    excluded)."""
    fields = [b"X%05d:" % i for i in range(count)]
    left = total - sum(map(len, fields))
    assert left >= 0
    for i in range(count):
        fields[i] += b"v" * (left // count + (i < left % count))
    assert sum(map(len, fields)) == total
    return fields


OVERSIZED: list[tuple[str, bytes, int]] = [
    ("request-line-16KiB", _get(_line(MAX_REQUEST_LINE + 1), b"Host: x"), 414),
    ("request-line-64KiB", _get(_target(65_536), b"Host: x"), 414),
    (
        "request-line-no-end",
        b"GET /v2/" + b"a" * (MAX_REQUEST_LINE + 100),
        414,
    ),
    ("method-64KiB", b"G" * 65_536 + b" /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("header-block-64KiB", _get(b"/v2/", *_fields(64, 65_536)), 431),
    ("header-block-one-over", _get(b"/v2/", *_fields(20, MAX_HEADER_BYTES + 1)), 431),
    ("header-line-17KiB", _get(b"/v2/", b"X-Big: " + b"a" * 17_408), 431),
    (
        "header-line-no-end",
        b"GET /v2/ HTTP/1.1\r\nX-Big: " + b"a" * (MAX_REQUEST_LINE + 100),
        431,
    ),
    (
        "too-many-headers",
        _get(b"/v2/", *(b"X-%d: y" % i for i in range(MAX_HEADERS + 1))),
        431,
    ),
    (
        "folded-header-block-64KiB",
        _get(b"/v2/", b"X-Fold: a", *([b" " + b"b" * 999] * 65)),
        431,
    ),
    (
        "push-with-64KiB-of-headers",
        b"PUT /v2/a/manifests/b HTTP/1.1\r\n"
        + b"\r\n".join(_fields(64, 65_536))
        + b"\r\n\r\n",
        431,
    ),
]


@pytest.mark.parametrize(
    ("data", "status"), [pytest.param(d, s, id=i) for i, d, s in OVERSIZED]
)
def test_oversized_request_head_is_answered(data: bytes, status: int) -> None:
    """
    A request line longer than :data:`MAX_REQUEST_LINE` gets ``414``; more
    than :data:`MAX_HEADER_BYTES` of header lines, one header line longer
    than that, or more than :data:`MAX_HEADERS` of them get ``431``: each
    with a short OCI error body and ``Connection: close``, instead of a
    silent close; nothing reaches a resource.
    """
    channel, transport, leaf = _connect()
    for start in range(0, len(data), 4096):
        channel.dataReceived(data[start : start + 4096])
    raw = transport.value()
    assert raw, "closed without an answer"
    code, headers, body = _answer(raw)
    assert code == status, raw[:300]
    assert headers[b"connection"] == b"close"
    assert _codes(body) == ["UNSUPPORTED"]
    assert len(body) < 200
    assert raw.count(b"HTTP/1.1 ") == 1
    assert transport.disconnecting
    assert leaf.rendered == []


def test_request_head_at_the_limits_is_served() -> None:
    """A request line of exactly :data:`MAX_REQUEST_LINE` bytes with
    exactly :data:`MAX_HEADER_BYTES` of header lines in :data:`MAX_HEADERS`
    lines is served; the limits are per request, not per connection."""
    fields = _fields(MAX_HEADERS, MAX_HEADER_BYTES)
    request = _get(_line(MAX_REQUEST_LINE), *fields)
    assert len(request.split(b"\r\n")[0]) == MAX_REQUEST_LINE
    channel, transport, leaf = _connect()
    channel.dataReceived(request)
    channel.dataReceived(request)
    raw = transport.value()
    assert raw.count(b"HTTP/1.1 200 ") == 2, raw[:300]
    assert leaf.rendered == [b"GET", b"GET"]
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "pieces",
    [
        [b"GET /v2/ HTTP/1.1\nHost: x\n\n"],
        [b"GET /v2/ HTTP/1.1\r\nHost: x\n\r\n"],
        [b"GET /v2/ HTTP/1.1\r", b"\nHost: x\n"],
        [b"GET /v2/ HTTP/1.1\r\n", b"\nHost: x\r\n\r\n"],
    ],
    ids=["bare-lf", "mixed", "split-crlf-then-lf", "lf-after-split"],
)
def test_bare_lf_gets_400_at_once(pieces: list[bytes]) -> None:
    """A head whose lines end with a bare LF is answered 400 at once, not
    after the 30 s head timeout; a CRLF split between two reads is fine."""
    channel, transport, leaf = _connect()
    for piece in pieces:
        channel.dataReceived(piece)
    assert transport.value().startswith(b"HTTP/1.1 400 "), transport.value()
    assert transport.disconnecting
    assert leaf.rendered == []


def test_crlf_split_between_reads_is_served() -> None:
    """Every byte in its own read: CRLF split across reads is a line end."""
    channel, transport, leaf = _connect()
    for byte in b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n":
        channel.dataReceived(bytes([byte]))
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert leaf.rendered == [b"GET"]
