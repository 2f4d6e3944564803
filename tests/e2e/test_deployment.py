"""
The deployment examples under ``etc/deploy/`` do what they say: the systemd
unit's command starts the mirror, docker compose runs the same command, and
the nginx site proxies pulls to it over TLS.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    free_port,
    mirror_config,
    poll_until,
    responds_ok,
    stop_process,
)
from .images import Catalog
from .servers import write_certificate

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).resolve().parents[2] / "etc" / "deploy"
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"


def unit_command() -> list[str]:
    unit = (DEPLOY / "regmirror.service").read_text()
    match = re.search(r"^ExecStart=(.+)$", unit, re.MULTILINE)
    assert match, "no ExecStart in the unit"
    return shlex.split(match.group(1))


def test_systemd_unit_command_starts_the_mirror(
    tmp_path: Path, upstream: RegistryProcess
) -> None:
    """The unit's ExecStart, run with this checkout's twistd and a test
    config in place of /etc/regmirror/mirror.ini, serves; SIGHUP (its
    ExecReload) keeps it running."""
    command = unit_command()
    assert command[0] == "/opt/regmirror/bin/twistd"
    assert command[-2:] == ["-c", "/etc/regmirror/mirror.ini"]
    port = free_port()
    (tmp_path / "mirror.ini").write_text(mirror_config(port, upstream.url))
    arguments = [*command[1:-1], str(tmp_path / "mirror.ini")]
    process = subprocess.Popen(
        [sys.executable, "-c", TWISTD, *arguments],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=(tmp_path / "out.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        poll_until(
            lambda: responds_ok(port, "/healthz"),
            timeout=15,
            describe=lambda: "the unit's command did not serve",
        )
        unit = (DEPLOY / "regmirror.service").read_text()
        assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
        process.send_signal(signal.SIGHUP)
        poll_until(
            lambda: b"reload requested" in (tmp_path / "out.log").read_bytes(),
            timeout=10,
            describe=lambda: "SIGHUP was not handled",
        )
        assert process.poll() is None
        assert responds_ok(port, "/healthz")
    finally:
        stop_process(process)


def test_compose_runs_the_same_command() -> None:
    """docker compose starts twistd with the unit's arguments."""
    compose = (DEPLOY / "docker-compose.yml").read_text()
    match = re.search(r"exec (twistd [^\"]+)\"", compose)
    assert match
    assert shlex.split(match.group(1))[1:] == unit_command()[1:]
    assert "/healthz" in compose


@pytest.fixture
def nginx_front(
    tmp_path: Path, upstream: RegistryProcess
) -> Iterator[tuple[int, Path, MirrorProcess]]:
    """The shipped nginx site, on a free port with a test certificate, in
    front of a mirror on loopback port 5000's stand-in."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed: run scripts/dev test")
    mirror_port, front = free_port(), free_port()
    mirror = MirrorProcess(
        tmp_path / "mirror", mirror_config(mirror_port, upstream.url), mirror_port
    )
    mirror.start()
    write_certificate(tmp_path / "tls")
    site = (DEPLOY / "nginx-regmirror.conf").read_text()
    site = site.replace("listen 443 ssl;", f"listen {LOCALHOST}:{front} ssl;")
    site = site.replace("listen [::]:443 ssl;", "")
    site = site.replace("127.0.0.1:5000", f"127.0.0.1:{mirror_port}")
    site = re.sub(
        r"ssl_certificate\s+\S+;", f"ssl_certificate {tmp_path}/tls/cert.pem;", site
    )
    site = re.sub(
        r"ssl_certificate_key\s+\S+;",
        f"ssl_certificate_key {tmp_path}/tls/key.pem;",
        site,
    )
    (tmp_path / "site.conf").write_text(site)
    prefix = tmp_path / "nginx"
    (prefix / "logs").mkdir(parents=True)
    (tmp_path / "nginx.conf").write_text(
        f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/logs/error.log;\n"
        "events {}\n"
        f"http {{ access_log {prefix}/logs/access.log;\n"
        f"  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;\n"
        f"  include {tmp_path}/site.conf; }}\n"
    )
    checked = subprocess.run(
        [nginx, "-t", "-p", str(prefix), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen(
        [nginx, "-p", str(prefix), "-c", str(tmp_path / "nginx.conf")],
        stdin=subprocess.DEVNULL,
    )
    try:
        yield front, tmp_path / "tls" / "cert.pem", mirror
    finally:
        stop_process(process)
        mirror.stop()


def test_nginx_site_proxies_pulls(
    nginx_front: tuple[int, Path, MirrorProcess], catalog: Catalog
) -> None:
    """Through the shipped nginx site (TLS there, plain HTTP behind), a blob
    arrives whole and right, with the mirror's headers."""
    front, certificate, _ = nginx_front
    context = ssl.create_default_context(cafile=str(certificate))
    image = catalog.big
    layer = image.layers[0]

    def connect() -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            LOCALHOST, front, context=context, timeout=30
        )

    def ready() -> bool:
        try:
            connection = connect()
            connection.request("GET", "/healthz")
            return connection.getresponse().status == 200
        except OSError:
            return False

    poll_until(ready, timeout=15, describe=lambda: "nginx did not come up")
    connection = connect()
    connection.request("GET", f"/v2/{image.repository}/blobs/{layer.digest}")
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Docker-Distribution-API-Version") == "registry/2.0"
    hasher = hashlib.sha256()
    while chunk := response.read(1024 * 1024):
        hasher.update(chunk)
    assert f"sha256:{hasher.hexdigest()}" == layer.digest
