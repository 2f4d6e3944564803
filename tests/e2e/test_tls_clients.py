"""
The ``ssl:`` listeners as the clients people use meet them: curl with its
defaults, Python offering ``h2`` and ``http/1.1`` over ALPN (urllib3 2.x),
headless Chromium on the status page, skopeo; with one process and with
two workers sharing the listening sockets, before and after a certificate
reload (SIGHUP).  Every one of them that offers ALPN must get ``http/1.1``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    chromium,
    free_port,
    mirror_config,
    poll_until,
)
from .images import Catalog
from .servers import write_certificate

pytestmark = pytest.mark.e2e

#: Longest any one client may take for one exchange.
CLIENT_TIMEOUT = 20.0


# -- the clients ----------------------------------------------------------------


def curl(port: int, ca: Path, path: str = "/v2/") -> tuple[int, str]:
    """``curl --cacert CA https://127.0.0.1:PORT/PATH``, otherwise as it comes:
    it offers ``h2`` and ``http/1.1``.  Its status and HTTP version."""
    result = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--cacert",
            str(ca),
            "--max-time",
            str(CLIENT_TIMEOUT),
            "--output",
            os.devnull,
            "--write-out",
            "%{http_code} %{http_version}",
            f"https://{LOCALHOST}:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT + 10,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"curl exited {result.returncode}: {result.stderr}"
    status, version = result.stdout.split()
    return int(status), version


def python_alpn(port: int, ca: Path, path: str = "/v2/") -> tuple[str | None, bytes]:
    """Python's ``ssl`` offering ``h2`` then ``http/1.1``, as urllib3 2.x
    does: the protocol the server picked, and its answer's status line."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2", "http/1.1"])
    raw = socket.create_connection((LOCALHOST, port), timeout=CLIENT_TIMEOUT)
    with context.wrap_socket(raw, server_hostname=LOCALHOST) as connection:
        selected = connection.selected_alpn_protocol()
        connection.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {LOCALHOST}:{port}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        answer = b""
        for _ in range(10_000):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    return selected, answer.split(b"\r\n", 1)[0]


def png_colours(png: bytes, step: int = 7) -> int:
    """How many distinct colours a (sampled) 8-bit RGB or RGBA PNG shows."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", png[:16]
    width = height = 0
    channels = 3
    data = b""
    at = 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind, body = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            channels = 4 if colour == 6 else 3
        elif kind == b"IDAT":
            data += body
        at += 12 + length
    pixels = zlib.decompress(data)
    stride = width * channels
    previous = bytearray(stride)
    seen = set()
    for row in range(height):
        start = row * (stride + 1)
        kind = pixels[start]
        line = bytearray(pixels[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                guess = left + up - corner
                near = min(
                    (abs(guess - left), 0, left),
                    (abs(guess - up), 1, up),
                    (abs(guess - corner), 2, corner),
                )[2]
                line[i] = (line[i] + near) & 0xFF
        if row % step == 0:
            for x in range(0, stride, channels * step):
                seen.add(bytes(line[x : x + channels]))
        previous = line
    return len(seen)


@dataclass
class Secure:
    """A mirror serving HTTPS on ``port`` and metrics over HTTPS on
    ``metrics``, with the certificate (its own CA) in ``workdir``."""

    mirror: MirrorProcess
    port: int
    metrics: int

    @property
    def ca(self) -> Path:
        return self.mirror.workdir / "cert.pem"

    def pids(self) -> list[int]:
        """The parent first, then its workers."""
        process = self.mirror._process  # noqa: SLF001 (the harness keeps it)
        assert process is not None
        found = subprocess.run(
            ["pgrep", "-P", str(process.pid), "-f", "regmirror.worker"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return [process.pid, *(int(pid) for pid in found.stdout.split())]

    @contextmanager
    def only(self, pid: int) -> Iterator[None]:
        """
        Every other process of the mirror stopped (SIGSTOP), so that the
        connections made meanwhile are accepted by *pid*; resumed after.
        """
        others = [other for other in self.pids() if other != pid]
        for other in others:
            os.kill(other, signal.SIGSTOP)
        try:
            yield
        finally:
            for other in others:
                os.kill(other, signal.SIGCONT)

    def certificate(self) -> bytes:
        """The certificate a new connection gets now."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection((LOCALHOST, self.port), timeout=5)
        with context.wrap_socket(raw) as connection:
            certificate = connection.getpeercert(binary_form=True)
        assert certificate is not None
        return certificate


def _secure_config(
    port: int, secure: int, metrics: int, upstream: str, workers: int
) -> str:
    tls = f"privateKey=key.pem:certKey=cert.pem:interface={LOCALHOST}"
    return mirror_config(port, upstream).replace(
        f"listen = tcp:{port}:interface={LOCALHOST}",
        f"listen = tcp:{port}:interface={LOCALHOST}\n    ssl:{secure}:{tls}\n"
        f"metrics_listen = ssl:{metrics}:{tls}\n"
        f"workers = {workers}",
    )


@pytest.fixture
def secure_mirror(
    tmp_path: Path,
    upstream: RegistryProcess,
    start_mirror: Callable[..., MirrorProcess],
) -> Callable[[int], Secure]:
    """Start a mirror with ``ssl:`` listeners and *workers* processes."""

    def start(workers: int) -> Secure:
        secure, metrics = free_port(), free_port()
        folder = tmp_path / "certificate"
        write_certificate(folder)
        mirror = start_mirror(
            lambda port: _secure_config(port, secure, metrics, upstream.url, workers),
            files={
                "key.pem": (folder / "key.pem").read_bytes(),
                "cert.pem": (folder / "cert.pem").read_bytes(),
            },
        )
        started = Secure(mirror, secure, metrics)
        poll_until(
            lambda: len(started.pids()) == workers,
            timeout=20,
            describe=lambda: f"not {workers} processes: {started.pids()}",
        )
        if workers > 1:
            poll_until(
                lambda: (
                    len(re.findall(r"worker \d+ serving", mirror.log())) >= workers - 1
                ),
                timeout=20,
                describe=mirror.log,
            )
        return started

    return start


# -- one client at a time ----------------------------------------------------------


def test_curl_with_its_defaults_gets_http11(
    secure_mirror: Callable[[int], Secure],
) -> None:
    """curl as it comes (offering ``h2`` and ``http/1.1`` over ALPN) gets a
    TLS connection, HTTP/1.1 and a 200 for ``/v2/``, where it used to get
    an ``internal_error`` alert."""
    site = secure_mirror(1)
    assert curl(site.port, site.ca) == (200, "1.1")


def test_python_offering_h2_gets_http11(secure_mirror: Callable[[int], Secure]) -> None:
    """A Python client offering ``["h2", "http/1.1"]`` (urllib3 2.x) is
    given ``http/1.1``, never ``h2`` (the channel speaks HTTP/1.1 only),
    and a 200."""
    site = secure_mirror(1)
    selected, status = python_alpn(site.port, site.ca)
    assert selected == "http/1.1"
    assert status.startswith(b"HTTP/1.1 200 "), status


def test_chromium_shows_the_status_page_over_https(
    tmp_path: Path, secure_mirror: Callable[[int], Secure]
) -> None:
    """Headless Chromium opens ``https://…/`` (the status page, whose
    script then fetches ``/_status.json`` over the same TLS listener): the
    page fills in, and its screenshot is a page, not a blank or an error."""
    site = secure_mirror(1)
    _chromium_sees_the_status_page(tmp_path, site.port)


def _chromium_sees_the_status_page(tmp_path: Path, port: int) -> None:
    url = f"https://{LOCALHOST}:{port}/"
    ignore = "--ignore-certificate-errors"
    dom = chromium(tmp_path, url, ignore, "--dump-dom")
    assert 'id="updated">updated' in dom, dom[:2000]
    assert "docker.io" in dom
    shot = tmp_path / "status.png"
    shot.unlink(missing_ok=True)
    chromium(tmp_path, url, ignore, f"--screenshot={shot}", "--window-size=1100,900")
    assert png_colours(shot.read_bytes()) > 8, "the screenshot is blank"


# -- every client, every process, before and after a reload ---------------------------


def _every_client(
    site: Secure,
    skopeo: Skopeo,
    catalog: Catalog,
    tmp_path: Path,
    *,
    parent: bool,
    browser: bool,
) -> None:
    """Every client against the process that accepts now; on the metrics
    listener too if that is the *parent* (workers do not serve it);
    Chromium too if *browser* (it offers ALPN as curl and Python do, and
    each launch costs seconds, so it runs where it adds something)."""
    image = catalog.small
    served = [(site.port, "/v2/")] + [(site.metrics, "/metrics")] * parent
    for port, path in served:
        assert curl(port, site.ca, path) == (200, "1.1"), port
        selected, status = python_alpn(port, site.ca, path)
        assert (selected, status[:13]) == ("http/1.1", b"HTTP/1.1 200 "), port
    if browser:
        _chromium_sees_the_status_page(tmp_path, site.port)
    certs = tmp_path / "skopeo-certs"
    certs.mkdir(parents=True, exist_ok=True)
    (certs / "ca.crt").write_bytes(site.ca.read_bytes())
    raw = skopeo.run(
        "inspect",
        "--raw",
        "--tls-verify=true",
        "--cert-dir",
        str(certs),
        f"docker://{LOCALHOST}:{site.port}/{image.repository}:{image.tag}",
    )
    assert raw == image.root.data


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_every_client_on_every_process_before_and_after_a_reload(
    tmp_path: Path,
    secure_mirror: Callable[[int], Secure],
    skopeo: Skopeo,
    catalog: Catalog,
    workers: int,
) -> None:
    """
    curl, Python with ALPN and skopeo each succeed against every process
    that accepts on the ``ssl:`` listeners (each in turn alone, the others
    stopped), on the API and on the metrics listener (the parent's alone);
    then new certificate files and a SIGHUP: every process hands out the
    new certificate, and every client succeeds again against it, Chromium
    too (once, on the parent: its ALPN offer is curl's and Python's).
    """
    site = secure_mirror(workers)
    pids = site.pids()
    assert len(pids) == workers
    before = site.certificate()
    for pid in pids:
        with site.only(pid):
            _every_client(
                site,
                skopeo,
                catalog,
                tmp_path / f"before-{pid}",
                parent=pid == pids[0],
                browser=False,
            )

    write_certificate(site.mirror.workdir)
    os.kill(pids[0], signal.SIGHUP)
    for pid in pids:
        with site.only(pid):
            poll_until(
                lambda: site.certificate() != before,
                timeout=10,
                describe=lambda: f"{site.pids()}: one kept the old certificate",
            )
    for pid in pids:
        with site.only(pid):
            _every_client(
                site,
                skopeo,
                catalog,
                tmp_path / f"after-{pid}",
                parent=pid == pids[0],
                browser=pid == pids[0],
            )
    assert site.pids() == pids, "a process was restarted"
