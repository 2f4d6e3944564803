"""
Request headers that arrive on several lines.

RFC 9110 (5.3): a list-based field sent on several lines means the lines
joined with ", ", so ``Accept`` and ``Range`` are read whole, every line.
Fields that may appear only once (``Host``, ``Authorization``, the
cluster's token) are refused when repeated: which line counts would
depend on who reads them (a proxy in front may take the first, Twisted's
``getHeader`` takes the last), and a request that says two things about
where it goes or who sends it is not an honest one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fakeregistry import FakeRegistry
from memory import LAYER, Harness, error_code, image, index_manifest, result
from test_access import PASSWORD, basic, guarded
from test_fetch_cluster import Cluster
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from regmirror import nodes
from regmirror.reference import OCI_INDEX, OCI_MANIFEST, parse_digest


@pytest.fixture
def mirror(tmp_path: Any) -> Harness:
    return Harness(str(tmp_path), {"origin": FakeRegistry()})


def _index(origin: FakeRegistry) -> str:
    child = image(origin, tag=None)
    document = index_manifest([(child, "amd64")])
    digest, _ = origin.add_manifest("library/app", "multi", document, OCI_INDEX)
    return digest


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_accept_lines_are_read_together(mirror: Harness, by: str) -> None:
    """``Accept: <index>`` then ``Accept: <image manifest>`` on two lines
    accepts the index: 200 with the index, by tag and by digest (the last
    line alone gave 404 by digest and the amd64 image by tag)."""
    index = _index(mirror.fakes["origin"])
    reference = "multi" if by == "tag" else index
    response = mirror.request(
        "GET",
        f"/v2/app/manifests/{reference}",
        headers={"Accept": [OCI_INDEX, OCI_MANIFEST]},
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [index]


@pytest.mark.parametrize("cached", [False, True])
def test_range_on_several_lines_is_several_ranges_and_ignored(
    mirror: Harness, cached: bool
) -> None:
    """Two ``Range`` lines are two ranges (``bytes=0-9, bytes=20-29``), which
    a server may ignore (RFC 9110 14.2): the whole blob, 200, whether cached
    or not; never the range of one line only."""
    content = image(mirror.fakes["origin"])
    path = f"/v2/app/blobs/{content['layer']}"
    if cached:
        mirror.body(mirror.request("GET", path))
    response = mirror.request(
        "GET", path, headers={"Range": ["bytes=0-9", "bytes=20-29"]}
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Range") is None
    assert mirror.body(response) == LAYER


def _raw(harness: Harness, head: bytes) -> bytes:
    """
    Send a raw request head to the mirror (twisted's client will not send
    two ``Host`` lines) and return what it answered.
    """
    channel = Site(harness.root).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(head)
    harness.settle()
    return bytes(transport.value())


def _status_and_body(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), fields, body


def test_a_repeated_host_is_refused(mirror: Harness) -> None:
    """Two ``Host`` lines (RFC 9112 3.2: a server must answer 400): 400
    before any routing, and nothing is asked upstream."""
    image(mirror.fakes["origin"])
    status, _, body = _status_and_body(
        _raw(
            mirror,
            b"GET /v2/app/manifests/latest HTTP/1.1\r\n"
            b"Host: mirror.test\r\nHost: ghcr.example\r\n\r\n",
        )
    )
    assert status == 400
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    assert mirror.fakes["origin"].requests == []


def test_a_repeated_host_never_names_the_token_realm(tmp_path: Path) -> None:
    """A challenge names our token endpoint with the request's ``Host``: with
    two of them the request is refused instead, so no realm can be steered
    elsewhere by a second line."""
    harness, _ = guarded(tmp_path)
    status, fields, _ = _status_and_body(
        _raw(
            harness,
            b"GET /v2/app/manifests/latest HTTP/1.1\r\n"
            b"Host: mirror.test\r\nHost: elsewhere.example\r\n\r\n",
        )
    )
    assert status == 400
    assert "WWW-Authenticate" not in fields


def test_a_repeated_authorization_is_refused(tmp_path: Path) -> None:
    """Two ``Authorization`` lines are not joined (credentials are no list):
    400, even when one of them is right."""
    harness, origin = guarded(tmp_path)
    wrong, right = basic("alice", "nope"), basic("alice", PASSWORD)
    response = harness.request(
        "GET",
        "/v2/app/manifests/latest",
        headers={"Authorization": [wrong["Authorization"], right["Authorization"]]},
    )
    assert response.code == 400
    assert error_code(harness, response) == "UNSUPPORTED"
    assert origin.requests == []


def test_the_token_endpoint_refuses_a_repeated_authorization(
    tmp_path: Path,
) -> None:
    """``/token`` with two ``Authorization`` lines issues no token: 400."""
    harness, _ = guarded(tmp_path)
    wrong, right = basic("bob", "nope"), basic("alice", PASSWORD)
    response = harness.request(
        "GET",
        "/token?service=regmirror&scope=repository:app:pull",
        headers={"Authorization": [wrong["Authorization"], right["Authorization"]]},
    )
    assert response.code == 400
    assert "token" not in json.loads(harness.body(response))


def test_the_peer_endpoint_refuses_a_repeated_cluster_token(tmp_path: Path) -> None:
    """The node-to-node endpoint takes its HMAC on one line only: two lines,
    even with the right token among them, are 403 DENIED."""
    c = Cluster(tmp_path)
    layer = image(c.origin)["layer"]
    c.body(c.request("a", "GET", f"/v2/app/blobs/{layer}"))
    key = c.run(c.coordinators["a"].peer_key())
    good = nodes.token(key, parse_digest(layer)).encode()
    sent = Headers({nodes.AUTH_HEADER: [good, b"0" * 64]})
    d = c.network.request(b"GET", f"{c.url('a')}/_cluster/blobs/{layer}".encode(), sent)
    c.settle()
    response = result(d)
    assert response.code == 403
    body = c.body(response)
    assert json.loads(body)["errors"][0]["code"] == "DENIED"
