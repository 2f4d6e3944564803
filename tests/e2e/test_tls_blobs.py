"""
Cached blobs over the mirror's own TLS listener, which hands OpenSSL a
reader's whole chunk at once and moves all its records to the socket in
one write (``regmirror.tls_listener.BulkTLS``): every byte exact, for whole
blobs, ranges across TLS records and chunks, pipelined on one connection,
and with back-pressure from a client that stops reading.
"""

from __future__ import annotations

import ssl

import pytest

from .harness import LOCALHOST, MirrorProcess, poll_until
from .images import Blob, Catalog
from .test_sendfile import MIB, SENDFILE, SERVED, Connection, blob_path, get_blob

pytestmark = pytest.mark.e2e

#: a TLS record's most plaintext, and the mirror's read per step
RECORD = 16 * 1024
CHUNK = 256 * 1024


class TLSConnection(Connection):
    """:class:`Connection` over TLS, verifying the mirror's certificate."""

    def __init__(
        self,
        mirror: MirrorProcess,
        port: int,
        *,
        receive_buffer: int | None = None,
        version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    ) -> None:
        super().__init__(port, receive_buffer=receive_buffer)
        context = ssl.create_default_context(cafile=str(mirror.workdir / "cert.pem"))
        context.maximum_version = version
        self.sock = context.wrap_socket(self.sock, server_hostname=LOCALHOST)
        self.version = self.sock.version()


@pytest.fixture
def big(catalog: Catalog) -> tuple[str, Blob]:
    """The path and the blob of the big (40 MiB) layer."""
    layer = catalog.big.layers[0]
    return blob_path(catalog.big.repository, layer.digest), layer


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["1.2", "1.3"]
)
def test_warm_blob_and_ranges_over_tls_byte_for_byte(
    tls_mirror: tuple[MirrorProcess, int],
    big: tuple[str, Blob],
    version: ssl.TLSVersion,
) -> None:
    """
    On one TLS connection (TLS 1.2 and 1.3 alike), pipelined: the cached
    layer whole, then ranges that start and end on and across TLS record
    and read-chunk boundaries, a suffix and the last byte alone: each body
    exact, with its ``Content-Range``; a HEAD says the length and sends no
    body; the served-bytes count grows by exactly what went out, none by
    ``sendfile``.
    """
    mirror, secure = tls_mirror
    path, layer = big
    size = layer.size
    assert get_blob(mirror.port, path) == layer.data  # cached now
    served, sent = mirror.metric(SERVED), mirror.metric(SENDFILE)
    ranges = [
        (0, 0),
        (RECORD - 1, RECORD),
        (RECORD, 3 * RECORD - 1),
        (CHUNK - 7, CHUNK + 7),
        (CHUNK + 1, 5 * CHUNK + RECORD + 3),
        (size // 2, size // 2 + 5 * MIB),
        (size - 1, size - 1),
    ]
    connection = TLSConnection(mirror, secure, version=version)
    assert connection.version == version.name.replace("_", ".")
    try:
        connection.send(path)
        for first, last in ranges:
            connection.send(path, headers={"Range": f"bytes={first}-{last}"})
        connection.send(path, headers={"Range": "bytes=-1000"})
        status, fields, body = connection.response()
        assert status == 200
        assert body == layer.data
        for first, last in ranges:
            status, fields, body = connection.response()
            assert status == 206, (first, last)
            assert fields["content-range"] == f"bytes {first}-{last}/{size}"
            assert body == layer.data[first : last + 1], (first, last)
        status, fields, body = connection.response()
        assert (status, fields["content-range"]) == (
            206,
            f"bytes {size - 1000}-{size - 1}/{size}",
        )
        assert body == layer.data[-1000:]
        connection.sock.sendall(
            f"HEAD {path} HTTP/1.1\r\nHost: {connection.host}\r\n\r\n".encode()
        )
        status, fields = connection.head()
        assert (status, int(fields["content-length"])) == (200, size)
        # Nothing after the head: the next request's answer comes next.
        connection.send(path, headers={"Range": "bytes=5-9"})
        assert connection.response()[2] == layer.data[5:10]
    finally:
        connection.close()
    expected = size + sum(last + 1 - first for first, last in ranges) + 1000 + 5
    assert mirror.metric(SERVED) - served == expected
    assert mirror.metric(SENDFILE) == sent


def test_a_tls_client_that_stops_reading_holds_the_reader_back(
    tls_mirror: tuple[MirrorProcess, int], big: tuple[str, Blob]
) -> None:
    """
    A TLS client with a small receive buffer that reads 256 KiB of the
    cached 40 MiB layer and stops: the mirror reads and encrypts no more
    than the buffers on the way hold (a few MiB), its memory does not grow
    by the blob, another TLS client meanwhile gets the whole layer, and
    the first gets the rest, exact, once it reads again.
    """
    mirror, secure = tls_mirror
    path, layer = big
    assert get_blob(mirror.port, path) == layer.data  # cached now
    served_before = mirror.metric(SERVED)
    memory_before = mirror.rss_kib()
    stalled = TLSConnection(mirror, secure, receive_buffer=64 * 1024)
    try:
        stalled.send(path)
        status, _ = stalled.head()
        assert status == 200
        first = stalled.body(layer.size, up_to=256 * 1024)

        other = TLSConnection(mirror, secure)
        try:
            other.send(path)
            assert other.response()[2] == layer.data
        finally:
            other.close()

        # Filled up: what the stalled connection was given stays put.
        poll_until(
            lambda: mirror.metric(SERVED) == mirror.metric(SERVED),
            timeout=10.0,
            describe=lambda: "the reader never stopped",
        )
        stalled_served = mirror.metric(SERVED) - served_before - layer.size
        grown = mirror.rss_kib() - memory_before
        assert 256 * 1024 <= stalled_served < 8 * MIB, stalled_served
        assert grown < 16 * 1024, f"the mirror grew by {grown} KiB"

        rest = stalled.body(layer.size - len(first))
    finally:
        stalled.close()
    assert first + rest == layer.data
    assert mirror.metric(SERVED) == served_before + 2 * layer.size
