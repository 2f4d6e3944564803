"""
Blob bodies on plain-TCP connections go out with ``sendfile(2)``, straight
from the cache file or the growing spool: every byte exact, for whole
blobs and ranges, with keep-alive and pipelining, with back-pressure from
a client that stops reading, and with a broken connection when the
download fails.  Under TLS the mirror copies as before.

Each test checks ``regmirror_sendfile_bytes_total``, so that a silent
fall-back to copying fails it.  Clients are raw sockets, so that every
byte on the wire is seen.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    mirror_config_upstreams,
    poll_until,
)
from .images import MANIFEST_ACCEPT, Blob, Catalog
from .servers import FakeUpstream, ThrottleRelay

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
SENDFILE = "regmirror_sendfile_bytes_total"
SERVED = "regmirror_served_bytes_total"
#: longest wait for one socket operation
SOCKET_TIMEOUT = 30.0
READ_CHUNK = 256 * 1024
#: where the fault injector holds each transfer of a blob
HOLD_AFTER = MIB


# -- a raw HTTP/1.1 client -------------------------------------------------------------


class Connection:
    """One keep-alive connection; requests may be pipelined."""

    def __init__(self, port: int, *, receive_buffer: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Before connecting: the window is agreed on at the handshake.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(SOCKET_TIMEOUT)
        self.sock.connect((LOCALHOST, port))
        self.host = f"{LOCALHOST}:{port}"
        self._pending = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, *paths: str, headers: dict[str, str] | None = None) -> None:
        """GET each of *paths*, all in one write."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(
            "".join(
                f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{extra}\r\n"
                for path in paths
            ).encode()
        )

    def _receive(self) -> bytes:
        data = self._pending or self.sock.recv(READ_CHUNK)
        self._pending = b""
        if not data:
            raise ConnectionError("the mirror closed the connection")
        return data

    def head(self) -> tuple[int, dict[str, str]]:
        """The status and headers (lower-case names) of the next response."""
        head = b""
        for _ in range(64):
            head += self._receive()
            if b"\r\n\r\n" in head:
                break
        else:
            raise AssertionError(f"no end of the head in {head[:200]!r}")
        head, _, self._pending = head.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        fields = {}
        for line in lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), fields

    def body(self, length: int, *, up_to: int | None = None) -> bytes:
        """The next *length* bytes of body (or only the first *up_to*)."""
        wanted = length if up_to is None else min(length, up_to)
        chunks, received = [], 0
        for _ in range(wanted + 1):
            if received >= wanted:
                break
            data = self._receive()
            if len(data) > wanted - received:
                data, self._pending = (
                    data[: wanted - received],
                    data[wanted - received :],
                )
            chunks.append(data)
            received += len(data)
        return b"".join(chunks)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status, fields = self.head()
        return status, fields, self.body(int(fields["content-length"]))


def blob_path(repository: str, digest: str) -> str:
    return f"/v2/{repository}/blobs/{digest}"


def get_blob(port: int, path: str) -> bytes:
    connection = Connection(port)
    try:
        connection.send(path)
        status, fields, body = connection.response()
    finally:
        connection.close()
    assert status == 200, (status, fields)
    return body


@pytest.fixture
def big(catalog: Catalog) -> tuple[str, Blob]:
    """The path and the blob of the big (40 MiB) layer."""
    layer = catalog.big.layers[0]
    return blob_path(catalog.big.repository, layer.digest), layer


# -- from the cache --------------------------------------------------------------------


def test_whole_blobs_and_ranges_go_out_with_sendfile_byte_for_byte(
    mirror: MirrorProcess, big: tuple[str, Blob]
) -> None:
    """
    A cached 40 MiB layer, whole and in ranges (from the start, in the
    middle, the last byte, a suffix, an open end), arrives exact over plain
    TCP, and every one of its bytes was counted as sent by ``sendfile``
    (those of the download before, mostly sent from memory as they came,
    are counted as served).
    """
    path, layer = big
    assert get_blob(mirror.port, path) == layer.data  # from the download
    sent_before = mirror.metric(SENDFILE)
    size = layer.size
    ranges = {
        "bytes=0-99": (0, 100),
        "bytes=12345678-23456788": (12345678, 23456789),
        f"bytes={size - 1}-{size - 1}": (size - 1, size),
        "bytes=-1000": (size - 1000, size),
        f"bytes={size - 3 * MIB}-": (size - 3 * MIB, size),
    }
    assert get_blob(mirror.port, path) == layer.data  # from the cache
    expected = size
    for value, (start, end) in ranges.items():
        connection = Connection(mirror.port)
        try:
            connection.send(path, headers={"Range": value})
            status, fields, body = connection.response()
        finally:
            connection.close()
        assert status == 206, (value, fields)
        assert fields["content-range"] == f"bytes {start}-{end - 1}/{size}", value
        assert body == layer.data[start:end], value
        expected += end - start

    assert mirror.metric(SENDFILE) - sent_before == expected
    assert mirror.metric(SERVED) == size + expected


def test_the_connection_carries_on_after_a_sendfile_body(
    mirror: MirrorProcess, catalog: Catalog, big: tuple[str, Blob]
) -> None:
    """
    On one keep-alive connection, three pipelined requests (a range of the
    big layer, all of it, its image's manifest) and then one more each get
    their exact answer, in order, with nothing in between.
    """
    path, layer = big
    manifest = catalog.big.root
    manifest_path = f"/v2/{catalog.big.repository}/manifests/{manifest.digest}"
    connection = Connection(mirror.port)
    try:
        connection.send(path, path, manifest_path, headers={"Accept": MANIFEST_ACCEPT})
        # The first answer is the download's: the second one the cache's.
        assert connection.response()[::2] == (200, layer.data)
        assert connection.response()[::2] == (200, layer.data)
        assert connection.response()[::2] == (200, manifest.data)
        connection.send(path, headers={"Range": "bytes=100-199"})
        assert connection.response()[::2] == (206, layer.data[100:200])
        connection.send(manifest_path, headers={"Accept": MANIFEST_ACCEPT})
        assert connection.response()[::2] == (200, manifest.data)
    finally:
        connection.close()

    # The first body mostly from memory as it came, the others from the
    # cache file.
    assert layer.size + 100 <= mirror.metric(SENDFILE) <= 2 * layer.size + 100
    assert mirror.metric(SERVED) == 2 * layer.size + 100


def test_a_client_that_stops_reading_holds_the_sender_back_not_memory(
    mirror: MirrorProcess, big: tuple[str, Blob]
) -> None:
    """
    A client with a small receive buffer that reads 256 KiB of the cached
    40 MiB layer and then stops: the mirror sends no more than the socket
    buffers hold, its memory does not grow by the blob, another client
    meanwhile gets the whole layer, and once the first one reads again it
    gets the rest, exact.
    """
    path, layer = big
    assert get_blob(mirror.port, path) == layer.data  # cached now
    sent_before = mirror.metric(SENDFILE)
    memory_before = mirror.rss_kib()
    stalled = Connection(mirror.port, receive_buffer=64 * 1024)
    try:
        stalled.send(path)
        status, fields = stalled.head()
        assert status == 200
        first = stalled.body(layer.size, up_to=256 * 1024)

        assert get_blob(mirror.port, path) == layer.data
        # Filled up: what the stalled connection got stays put.
        poll_until(
            lambda: mirror.metric(SENDFILE) == mirror.metric(SENDFILE),
            timeout=10.0,
            describe=lambda: "the sender never stopped",
        )
        stalled_sent = mirror.metric(SENDFILE) - sent_before - layer.size
        grown = mirror.rss_kib() - memory_before
        assert 256 * 1024 <= stalled_sent < 8 * MIB, stalled_sent
        assert grown < 8 * 1024, f"the mirror grew by {grown} KiB"

        rest = stalled.body(layer.size - len(first))
    finally:
        stalled.close()
    assert first + rest == layer.data
    assert mirror.metric(SENDFILE) == sent_before + 2 * layer.size


# -- from a download under way ---------------------------------------------------------


def cached_file(mirror: MirrorProcess, digest: str) -> Path:
    algorithm, hex_ = digest.split(":", 1)
    return mirror.cache_dir / "blobs" / algorithm / hex_[:2] / hex_


def test_a_growing_spool_is_sent_as_it_grows(
    tmp_path: Path,
    start_program: Callable[[ThrottleRelay], ThrottleRelay],
    start_mirror: Callable[..., MirrorProcess],
    upstream: RegistryProcess,
    big: tuple[str, Blob],
) -> None:
    """
    With the upstream slowed to 16 MiB/s, a client of the uncached 40 MiB
    layer has its first mebibyte while the download is still under way,
    and then the whole layer, exact: sent as it arrives, from the spool
    file with ``sendfile`` or, for bytes not yet written when the sender
    woke, from the download's window in memory; all of it counted as
    served, and as ``sendfile``'s only what ``sendfile`` sent (a
    fresh-eyes review: bytes sent from memory were counted as its).
    """
    path, layer = big
    relay = start_program(ThrottleRelay(tmp_path / "relay", upstream.port, 16 * MIB))
    mirror = start_mirror(
        lambda port: mirror_config_upstreams(
            port, {"origin": {"url": relay.url}}, origin="origin"
        )
    )
    connection = Connection(mirror.port)
    try:
        connection.send(path)
        status, fields = connection.head()
        assert status == 200
        first = connection.body(layer.size, up_to=MIB)
        assert not cached_file(mirror, layer.digest).exists()
        rest = connection.body(layer.size - len(first))
    finally:
        connection.close()

    assert first + rest == layer.data
    assert 0 < mirror.metric(SENDFILE) <= layer.size
    assert mirror.metric(SERVED, source="download") == layer.size


def test_a_failed_download_breaks_a_sendfile_response(
    tmp_path: Path,
    catalog: Catalog,
    start_program: Callable[[FakeUpstream], FakeUpstream],
    start_mirror: Callable[..., MirrorProcess],
    big_layout: Path,
    big: tuple[str, Blob],
) -> None:
    """
    The only upstream stalls after every mebibyte, and sends nothing past
    the second: the client gets the bytes as they come (all but the last
    one held back), more after a resume, and once the resumes stop
    bringing bytes a broken connection, never a complete body.
    """
    path, layer = big
    holding = start_program(
        FakeUpstream(
            tmp_path / "fake",
            images=[(catalog.big.repository, big_layout)],
            hold_after=HOLD_AFTER,
            stall_at=2 * HOLD_AFTER,
        )
    )
    mirror = start_mirror(
        lambda port: mirror_config_upstreams(
            port,
            {"faulty": {"url": holding.url, "idle_timeout": "1s"}},
            origin="faulty",
        )
    )
    connection = Connection(mirror.port)
    try:
        connection.send(path)
        status, fields = connection.head()
        assert (status, int(fields["content-length"])) == (200, layer.size)
        first = connection.body(layer.size, up_to=HOLD_AFTER - 1)
        # Held: the download waits for its upstream, the sender for it.
        assert mirror.metric(SERVED, source="download") == HOLD_AFTER - 1
        more = connection.body(layer.size, up_to=HOLD_AFTER)
        with pytest.raises(ConnectionError):
            connection.body(layer.size - len(first) - len(more))
    finally:
        connection.close()

    assert first + more == layer.data[: 2 * HOLD_AFTER - 1]
    assert mirror.wait_for_log(r"download of sha256:\w+ from faulty failed")
    assert HOLD_AFTER < mirror.metric(SERVED, source="download") < layer.size


# -- under TLS -------------------------------------------------------------------------


def test_under_tls_blobs_are_copied_not_sent_with_sendfile(
    tls_mirror: tuple[MirrorProcess, int], big: tuple[str, Blob]
) -> None:
    """
    Over HTTPS the layer arrives exact, downloaded and then cached, twice
    on one connection, and none of it went through ``sendfile`` (which
    would bypass the encryption); over plain TCP it then does.
    """
    mirror, secure = tls_mirror
    path, layer = big
    context = ssl.create_default_context(cafile=str(mirror.workdir / "cert.pem"))
    connection = http.client.HTTPSConnection(
        LOCALHOST, secure, context=context, timeout=SOCKET_TIMEOUT
    )
    digests = []
    try:
        for _ in range(2):
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == 200
            digests.append("sha256:" + hashlib.sha256(response.read()).hexdigest())
    finally:
        connection.close()

    assert digests == [layer.digest] * 2
    assert mirror.metric(SERVED) == 2 * layer.size
    assert mirror.metric(SENDFILE) == 0
    assert get_blob(mirror.port, path) == layer.data
    assert mirror.metric(SENDFILE) == layer.size


def test_many_clients_of_one_download_each_get_every_byte(
    mirror: MirrorProcess, big: tuple[str, Blob]
) -> None:
    """
    Sixteen clients of the uncached layer at once all get it exact, from
    the one download (its window in memory and its growing spool; the last
    byte of each from the cached file, with ``sendfile``).
    """
    path, layer = big
    results: list[bytes | BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16, timeout=SOCKET_TIMEOUT)

    def client() -> None:
        barrier.wait()
        try:
            body: bytes | BaseException = get_blob(mirror.port, path)
        except (OSError, AssertionError) as e:
            body = e
        with lock:
            results.append(body)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=2 * SOCKET_TIMEOUT)

    assert [r == layer.data for r in results] == [True] * 16
    assert mirror.metric(SERVED) == 16 * layer.size
    assert mirror.metric(SERVED, source="download") > 0
    assert 16 <= mirror.metric(SENDFILE) <= 16 * layer.size
