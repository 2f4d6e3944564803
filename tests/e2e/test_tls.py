"""The mirror serving HTTPS on an ``ssl:`` listener beside a plain one."""

from __future__ import annotations

import signal
import socket
import ssl
import warnings
from pathlib import Path

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    Skopeo,
    poll_until,
)
from .images import Catalog
from .servers import write_certificate

pytestmark = pytest.mark.e2e


def test_pull_over_verified_https(
    tls_mirror: tuple[MirrorProcess, int],
    skopeo: Skopeo,
    catalog: Catalog,
    tmp_path: Path,
) -> None:
    """skopeo, verifying the mirror's certificate against the test CA, pulls
    through the ``ssl:`` listener and gets the pushed manifest."""
    _, secure = tls_mirror
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes((tls_mirror[0].workdir / "cert.pem").read_bytes())
    image = catalog.small
    raw = skopeo.run(
        "inspect",
        "--raw",
        "--tls-verify=true",
        "--cert-dir",
        str(certs),
        f"docker://{LOCALHOST}:{secure}/{image.repository}:{image.tag}",
    )
    assert raw == image.root.data


def test_https_refused_without_the_ca(
    tls_mirror: tuple[MirrorProcess, int], skopeo: Skopeo, catalog: Catalog
) -> None:
    """Without the CA, a verifying client refuses the mirror's certificate:
    the listener really speaks TLS with the configured certificate."""
    _, secure = tls_mirror
    image = catalog.small
    with pytest.raises(AssertionError, match="certificate"):
        skopeo.run(
            "inspect",
            "--raw",
            "--tls-verify=true",
            f"docker://{LOCALHOST}:{secure}/{image.repository}:{image.tag}",
        )


def _handshake(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection((LOCALHOST, port), timeout=5)
    return context.wrap_socket(raw, server_hostname=LOCALHOST)


def _unverified(maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        # Allow the old protocol on our side, so that only the server can
        # be the one refusing it.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
    return context


def _request(connection: ssl.SSLSocket) -> bytes:
    connection.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n\r\n")
    return connection.recv(4096)


def test_old_tls_versions_are_refused(tls_mirror: tuple[MirrorProcess, int]) -> None:
    """The ``ssl:`` listener speaks TLS 1.2 or newer only."""
    _, secure = tls_mirror
    modern = _handshake(secure, _unverified())
    assert modern.version() in ("TLSv1.2", "TLSv1.3")
    modern.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = _unverified(ssl.TLSVersion.TLSv1_1)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(secure, old).close()


def test_sighup_reloads_the_certificate_without_dropping_connections(
    tls_mirror: tuple[MirrorProcess, int],
) -> None:
    """After new certificate files are written (a certbot renewal), SIGHUP
    makes new connections get the new certificate, while a keep-alive
    connection opened before goes on working."""
    process, secure = tls_mirror
    before = _handshake(secure, _unverified())
    first = before.getpeercert(binary_form=True)
    assert _request(before).startswith(b"HTTP/1.1 200")
    write_certificate(process.workdir)
    assert process._process is not None
    process._process.send_signal(signal.SIGHUP)

    def renewed() -> bool:
        probe = _handshake(secure, _unverified())
        certificate = probe.getpeercert(binary_form=True)
        probe.close()
        return certificate != first

    poll_until(renewed, timeout=10, describe=lambda: "certificate not reloaded")
    assert _request(before).startswith(b"HTTP/1.1 200")
    before.close()
    assert "certificate reloaded" in process.log()
