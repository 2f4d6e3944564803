"""
One upstream download per blob, whatever the clients do: many at once, one
that stalls, one that comes late, all of them hanging up, or an upstream
that serves the wrong bytes.

The upstream is a real ``docker-registry`` whose access log counts the GETs
of each blob, except for the wrong-bytes case, which needs an upstream that
lies (:class:`WrongBytesUpstream`, in this file).  Clients are threads with
``http.client`` or raw sockets, and ``skopeo`` processes; every body is
hashed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    free_port,
    mirror_config,
    poll_until,
)
from .images import MANIFEST_ACCEPT, Blob, Catalog, assert_layout_matches

pytestmark = pytest.mark.e2e

CLIENTS = 20
MIB = 1024 * 1024
#: longest wait for any one client (a socket operation, a whole transfer)
CLIENT_TIMEOUT = 60.0
#: longest a paused reader waits for the others
GATE_TIMEOUT = 60.0
#: longest wait for a blob abandoned by its clients to reach the cache
CACHE_TIMEOUT = 30.0
READ_CHUNK = 64 * 1024


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture
def origin(tmp_path: Path, seeded_storage: Path) -> Iterator[RegistryProcess]:
    """A fresh ``docker-registry`` over the seeded images, its own access log."""
    registry = RegistryProcess(seeded_storage, tmp_path / "origin")
    registry.start()
    yield registry
    registry.stop()


def _run_mirror(workdir: Path, upstream_url: str) -> Iterator[MirrorProcess]:
    port = free_port()
    process = MirrorProcess(workdir, mirror_config(port, upstream_url), port)
    process.start()
    yield process
    died = process.returncode
    process.stop()
    assert died is None, f"the mirror died during the test:\n{process.log()}"
    assert not process.unhandled_errors(), process.log()


@pytest.fixture
def cold_mirror(tmp_path: Path, origin: RegistryProcess) -> Iterator[MirrorProcess]:
    """A mirror with an empty cache in front of ``origin``."""
    yield from _run_mirror(tmp_path / "mirror", origin.url)


# -- clients ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """What one client got: status, byte count and digest of the body."""

    status: int
    size: int
    digest: str
    #: why the body ended early (a broken connection), if it did
    error: str | None = None


def blob_path(repository: str, digest: str) -> str:
    return f"/v2/{repository}/blobs/{digest}"


def get(
    port: int,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    pause_after: int | None = None,
    gate: threading.Event | None = None,
    progress: tuple[int, threading.Event] | None = None,
) -> Received:
    """
    GET *path*, hashing the body as it arrives.  With *pause_after*, stop
    reading after that many bytes until *gate* is set; with *progress*
    ``(n, event)``, set *event* once *n* bytes have arrived.
    """
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=CLIENT_TIMEOUT)
    hasher = hashlib.sha256()
    received = 0
    status = 0
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        status = response.status
        length = response.length or 0
        # One more read to reach the pause, one to see the end.
        for _ in range(length // READ_CHUNK + 3):
            want = READ_CHUNK
            if pause_after is not None:
                want = max(1, min(READ_CHUNK, pause_after - received))
            data = response.read(want)
            if not data:
                break
            hasher.update(data)
            received += len(data)
            if progress is not None and received >= progress[0]:
                progress[1].set()
            if pause_after is not None and received >= pause_after:
                pause_after = None
                assert gate is not None
                assert gate.wait(GATE_TIMEOUT), "the other clients never finished"
        else:
            raise AssertionError(f"{path}: more bytes than Content-Length {length}")
    except (OSError, http.client.HTTPException) as e:
        return Received(status, received, "", f"{type(e).__name__}: {e}")
    finally:
        connection.close()
    return Received(status, received, "sha256:" + hasher.hexdigest())


def expect(blob: Blob) -> Received:
    return Received(200, blob.size, blob.digest)


def in_threads(count: int, work: Callable[[], Received]) -> list[Received]:
    """*count* calls of *work* in threads released together; bounded."""
    barrier = threading.Barrier(count, timeout=CLIENT_TIMEOUT)

    def released() -> Received:
        barrier.wait()
        return work()

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(released) for _ in range(count)]
        return [f.result(timeout=CLIENT_TIMEOUT) for f in futures]


def cached_file(mirror: MirrorProcess, digest: str) -> Path:
    algorithm, hex_ = digest.split(":", 1)
    return mirror.cache_dir / "blobs" / algorithm / hex_[:2] / hex_


def file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        for _ in range(path.stat().st_size // MIB + 2):
            chunk = f.read(MIB)
            if not chunk:
                break
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def spool_entries(mirror: MirrorProcess) -> list[str]:
    spool = mirror.cache_dir / "spool"
    return sorted(p.name for p in spool.iterdir()) if spool.exists() else []


def assert_one_get_each(upstream: RegistryProcess, blobs: tuple[Blob, ...]) -> None:
    """
    The upstream logged exactly one GET of each blob.  A GET is logged once
    it is answered in full; the clients only got their last byte after
    that, so waiting for the first line is waiting for a few microseconds.
    """
    poll_until(
        lambda: all(upstream.count_blob_gets(b.digest) >= 1 for b in blobs),
        timeout=5.0,
        describe=lambda: f"some of {[b.digest for b in blobs]} never fetched",
    )
    counts = {blob.digest: upstream.count_blob_gets(blob.digest) for blob in blobs}
    assert counts == {blob.digest: 1 for blob in blobs}


# -- many clients at once --------------------------------------------------------------


def test_twenty_clients_of_a_cold_image_share_one_upstream_get_per_blob(
    catalog: Catalog, origin: RegistryProcess, cold_mirror: MirrorProcess
) -> None:
    """
    Twenty clients pulling one uncached image at the same moment (manifest
    by tag, then its config and its 40 MiB layer) each get the exact pushed
    bytes, and the upstream sees one GET per blob.
    """
    image = catalog.big

    def pull() -> Received:
        manifest = get(
            cold_mirror.port,
            f"/v2/{image.repository}/manifests/{image.tag}",
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if manifest != expect(image.root):
            return manifest
        for blob in image.blobs:
            got = get(cold_mirror.port, blob_path(image.repository, blob.digest))
            if got != expect(blob):
                return got
        return expect(image.root)

    results = in_threads(CLIENTS, pull)

    assert results == [expect(image.root)] * CLIENTS
    assert_one_get_each(origin, image.blobs)


def test_twenty_skopeo_copies_of_a_cold_image_share_one_upstream_get_per_blob(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    origin: RegistryProcess,
    cold_mirror: MirrorProcess,
) -> None:
    """
    Twenty ``skopeo copy`` processes of one uncached image, started
    together, all write the pushed image bit for bit, and the upstream sees
    one GET per blob.
    """
    image = catalog.big
    destinations = [tmp_path / f"copy-{i}" for i in range(CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [
            pool.submit(
                skopeo.pull, cold_mirror.host, image.reference, destination, "latest"
            )
            for destination in destinations
        ]
        for future in futures:
            future.result(timeout=2 * CLIENT_TIMEOUT)

    for destination in destinations:
        assert_layout_matches(destination, image, "latest")
    assert_one_get_each(origin, image.blobs)


# -- a reader that stalls, a reader that comes late ------------------------------------


def test_a_stalled_reader_and_a_late_joiner_get_the_whole_blob_of_one_get(
    catalog: Catalog, origin: RegistryProcess, cold_mirror: MirrorProcess
) -> None:
    """
    While one client reads a few KiB of the uncached 40 MiB layer and then
    stops reading until the others are done, a second client streams it at
    full speed and a third one starts once the second has 1 MiB: all three
    get the exact bytes, and the upstream sees one GET.
    """
    layer = catalog.big.layers[0]
    path = blob_path(catalog.big.repository, layer.digest)
    stalled_has_bytes = threading.Event()
    fast_has_a_mebibyte = threading.Event()
    others_done = threading.Event()

    with ThreadPoolExecutor(3) as pool:
        stalled = pool.submit(
            get,
            cold_mirror.port,
            path,
            pause_after=4 * 1024,
            gate=others_done,
            progress=(1, stalled_has_bytes),
        )
        try:
            assert stalled_has_bytes.wait(CLIENT_TIMEOUT), "the stalled reader got 0"
            fast = pool.submit(
                get, cold_mirror.port, path, progress=(MIB, fast_has_a_mebibyte)
            )
            assert fast_has_a_mebibyte.wait(CLIENT_TIMEOUT), "the fast reader stuck"
            late = pool.submit(get, cold_mirror.port, path)
            others = [fast.result(CLIENT_TIMEOUT), late.result(CLIENT_TIMEOUT)]
        finally:
            others_done.set()
        assert others == [expect(layer)] * 2
        assert stalled.result(CLIENT_TIMEOUT) == expect(layer)

    assert_one_get_each(origin, (layer,))


# -- every client hangs up -------------------------------------------------------------


def test_clients_hanging_up_midway_leave_a_verified_blob_in_the_cache(
    catalog: Catalog, origin: RegistryProcess, cold_mirror: MirrorProcess
) -> None:
    """
    Three clients that each read about 1 MiB of the uncached 40 MiB layer
    and close their sockets do not stop its download: the layer lands in
    the cache, hashing to its digest, after one upstream GET, and nothing
    is left in the spool.
    """
    layer = catalog.big.layers[0]
    request = (
        f"GET {blob_path(catalog.big.repository, layer.digest)} HTTP/1.1\r\n"
        f"Host: {cold_mirror.host}\r\n\r\n"
    ).encode()
    sockets = [
        socket.create_connection((LOCALHOST, cold_mirror.port), CLIENT_TIMEOUT)
        for _ in range(3)
    ]
    try:
        for sock in sockets:
            sock.sendall(request)
        for sock in sockets:
            received = 0
            for _ in range(MIB):
                data = sock.recv(READ_CHUNK)
                assert data, "the mirror closed the connection"
                received += len(data)
                if received >= MIB:
                    break
    finally:
        for sock in sockets:
            sock.close()

    cached = cached_file(cold_mirror, layer.digest)
    poll_until(
        cached.exists,
        timeout=CACHE_TIMEOUT,
        describe=lambda: f"{cached} never appeared:\n{cold_mirror.log()}",
    )
    assert file_digest(cached) == layer.digest
    assert_one_get_each(origin, (layer,))
    poll_until(
        lambda: not spool_entries(cold_mirror),
        timeout=CACHE_TIMEOUT,
        describe=lambda: f"the spool still holds {spool_entries(cold_mirror)}",
    )


# -- an upstream that serves the wrong bytes -------------------------------------------


class WrongBytesUpstream:
    """
    A registry on 127.0.0.1 whose blobs are served with one byte changed:
    the length and the ``Docker-Content-Digest`` header are right, the bytes
    are not.  ``requests`` records ``(method, path)`` of every request.
    """

    def __init__(self, repository: str, blobs: list[bytes]) -> None:
        self.served = {}
        for data in blobs:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            wrong = bytearray(data)
            wrong[len(wrong) // 2] ^= 0xFF
            self.served[f"/v2/{repository}/blobs/{digest}"] = (digest, bytes(wrong))
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def _answer(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                with upstream._lock:
                    upstream.requests.append((self.command, path))
                if path in ("/v2", "/v2/"):
                    self._send(200, b"{}", "application/json", body)
                elif path in upstream.served:
                    digest, data = upstream.served[path]
                    self._send(200, data, "application/octet-stream", body, digest)
                else:
                    error = {"errors": [{"code": "BLOB_UNKNOWN", "message": path}]}
                    self._send(
                        404, json.dumps(error).encode(), "application/json", body
                    )

            def _send(
                self,
                status: int,
                data: bytes,
                content_type: str,
                body: bool,
                digest: str | None = None,
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Docker-Distribution-API-Version", "registry/2.0")
                if digest is not None:
                    self.send_header("Docker-Content-Digest", digest)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}
        )

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.server.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10.0)

    def gets(self, path: str) -> int:
        with self._lock:
            return self.requests.count(("GET", path))


WRONG_REPOSITORY = "test/wrong"
#: the blobs of the lying upstream, by size: small, and bigger than a read
WRONG_BLOBS = {size: random.Random(size).randbytes(size) for size in (1024, 4 * MIB)}


@pytest.fixture
def liar() -> Iterator[WrongBytesUpstream]:
    upstream = WrongBytesUpstream(WRONG_REPOSITORY, list(WRONG_BLOBS.values()))
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture
def liars_mirror(tmp_path: Path, liar: WrongBytesUpstream) -> Iterator[MirrorProcess]:
    """A mirror with an empty cache in front of ``liar``."""
    yield from _run_mirror(tmp_path / "mirror", liar.url)


@pytest.mark.parametrize("size", sorted(WRONG_BLOBS), ids=["1KiB", "4MiB"])
def test_a_blob_with_the_wrong_bytes_leaves_nothing_behind(
    liar: WrongBytesUpstream, liars_mirror: MirrorProcess, size: int
) -> None:
    """
    A blob whose upstream bytes do not match its digest reaches the client
    as a 502 or a broken connection, never as a complete body, and leaves
    no file for that digest in the cache and nothing in the spool.
    """
    digest = "sha256:" + hashlib.sha256(WRONG_BLOBS[size]).hexdigest()
    path = blob_path(WRONG_REPOSITORY, digest)

    got = get(liars_mirror.port, path)

    assert got.status == 502 or (got.status == 200 and got.error), got
    assert got.status != 200 or got.size < size, got
    assert liar.gets(path) >= 1
    poll_until(
        lambda: not spool_entries(liars_mirror),
        timeout=CACHE_TIMEOUT,
        describe=lambda: f"the spool still holds {spool_entries(liars_mirror)}",
    )
    assert not cached_file(liars_mirror, digest).exists()
