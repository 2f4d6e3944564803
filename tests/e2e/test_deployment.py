"""
The deployment examples under ``etc/deploy/`` do what they say: the systemd
unit's command starts the mirror, docker compose runs the same command, and
the nginx site proxies pulls to it over TLS.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from .containers import PODMAN, Podman
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


def test_compose_runs_the_image_with_the_units_command() -> None:
    """docker compose builds the project's Containerfile and keeps the cache
    in a volume at the image's cache folder; the image's entry point starts
    twistd with the unit's arguments (text logs on standard output)."""
    compose = (DEPLOY / "docker-compose.yml").read_text()
    assert re.search(r"context: \.\./\.\.\n\s+dockerfile: Containerfile\n", compose)
    assert "- regmirror-cache:/var/lib/regmirror\n" in compose
    containerfile = (DEPLOY.parents[1] / "Containerfile").read_text()
    assert "VOLUME /var/lib/regmirror\n" in containerfile
    entrypoint = (DEPLOY / "container-entrypoint.sh").read_text()
    assert "text) set -- --logfile=- ;;" in entrypoint
    match = re.search(r"^exec (twistd .+)$", entrypoint, re.MULTILINE)
    assert match
    command = shlex.split(match.group(1).replace('"$@"', "--logfile=-"))
    assert command[1:] == unit_command()[1:]


def _compose_restart() -> str:
    """The compose file's restart policy, as compose resolves it with no
    variable of the operator's set."""
    compose = (DEPLOY / "docker-compose.yml").read_text()
    match = re.search(r"^    restart: (\S+)$", compose, re.MULTILINE)
    assert match, "no restart policy in the compose file"
    return re.sub(r"\$\{\w+:-([^}]+)\}", r"\1", match.group(1))


def test_compose_gives_up_on_a_configuration_that_cannot_start() -> None:
    """
    ``restart: unless-stopped`` restarted a mirror whose configuration
    is bad (``twistd`` exits with 1 at once) forever; the systemd unit stops
    on it (``RestartPreventExitStatus=1``).  Compose has no such setting:
    its policy restarts a mirror that failed a few times in a row only
    (``on-failure`` with a maximum count, which docker compose and
    podman-compose both pass to the engine), and the README says so.
    """
    policy, _, count = _compose_restart().partition(":")
    assert policy == "on-failure" and 1 <= int(count) <= 10, _compose_restart()
    unit = (DEPLOY / "regmirror.service").read_text()
    assert "RestartPreventExitStatus=1" in unit
    readme = (DEPLOY.parents[1] / "README.rst").read_text()
    assert f"on-failure:{count}" in readme


def test_the_compose_files_podman_build_keeps_the_healthcheck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The compose file said ``(or podman-compose)``, whose ``podman build``
    makes OCI images, which drop the image's ``HEALTHCHECK``.  The
    podman-compose command it gives sets the build's format: built so, an
    image with the Containerfile's ``HEALTHCHECK`` line keeps it.
    """
    compose = (DEPLOY / "docker-compose.yml").read_text()
    match = re.search(
        r"^#\s+(\w+)=(\S+) podman-compose .* up -d --build$", compose, re.M
    )
    assert match, "no podman-compose command in the compose file"
    containerfile = (DEPLOY.parents[1] / "Containerfile").read_text()
    healthcheck = re.search(r"^HEALTHCHECK .*\n.*\n", containerfile, re.MULTILINE)
    assert healthcheck
    if not Path(PODMAN).exists():
        pytest.skip("podman is not installed")
    folder = tmp_path / "image"
    folder.mkdir()
    (folder / "Containerfile").write_text("FROM scratch\n" + healthcheck.group(0))
    monkeypatch.setenv(match.group(1), match.group(2))
    podman = Podman(tmp_path / "podman")
    try:
        podman.run("build", "--quiet", "--tag", "kept", str(folder))
        [image] = json.loads(podman.run("image", "inspect", "kept").stdout)
    finally:
        podman.close()
    assert image["Healthcheck"]["Test"] == [
        "CMD",
        "regmirror",
        "healthcheck",
        "-c",
        "/etc/regmirror/mirror.ini",
    ], image.get("Healthcheck")


def start_nginx(
    tmp_path: Path, mirror_port: int
) -> tuple[subprocess.Popen[bytes], int]:
    """
    The shipped nginx site, on a free port of 127.0.0.1 with the test
    certificate of ``tmp_path/tls``, in front of 127.0.0.1:*mirror_port*
    (port 5000's stand-in): the process and its port.
    """
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed: run scripts/dev test")
    front = free_port()
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
    return process, front


@pytest.fixture
def nginx_front(
    tmp_path: Path, upstream: RegistryProcess
) -> Iterator[tuple[int, Path, MirrorProcess]]:
    """The shipped nginx site, on a free port with a test certificate, in
    front of a mirror on loopback port 5000's stand-in."""
    mirror_port = free_port()
    mirror = MirrorProcess(
        tmp_path / "mirror", mirror_config(mirror_port, upstream.url), mirror_port
    )
    mirror.start()
    try:
        process, front = start_nginx(tmp_path, mirror_port)
    except BaseException:
        mirror.stop()
        raise
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


# -- who the client is, behind the shipped site -------------------------------------

PASSWORD = "pw-nginx-4b8e1f2a-lantern"


@dataclass(frozen=True)
class Front:
    """The shipped nginx site over TLS in front of a mirror with ``[access]``."""

    port: int
    context: ssl.SSLContext
    mirror: MirrorProcess

    def get(
        self,
        source: str,
        path: str = "/v2/test/small/manifests/latest",
        headers: Sequence[tuple[str, str]] = (),
    ) -> tuple[int, http.client.HTTPResponse]:
        """
        GET *path* through nginx from the loopback address *source*, with
        *headers* as given (a name twice is two lines).
        """
        connection = http.client.HTTPSConnection(
            LOCALHOST,
            self.port,
            context=self.context,
            timeout=30,
            source_address=(source, 0),
        )
        try:
            own_host = any(name.lower() == "host" for name, _ in headers)
            connection.putrequest("GET", path, skip_host=own_host)
            for name, value in headers:
                connection.putheader(name, value)
            connection.endheaders()
            response = connection.getresponse()
            response.read()
            return response.status, response
        finally:
            connection.close()


@pytest.fixture
def guarded_front(tmp_path: Path, upstream: RegistryProcess) -> Iterator[Front]:
    """
    A mirror with ``[access] anonymous = 127.0.0.2`` (the only client
    allowed without credentials), alice in its htpasswd file and nginx
    (127.0.0.1) its trusted proxy, behind the shipped site.  Clients come
    from other loopback addresses (127.0.0.3, ...), so that nginx's own
    address and theirs differ.
    """
    yield from _front(
        tmp_path,
        upstream,
        "anonymous = 127.0.0.2\nhtpasswd = users.htpasswd\n"
        "trusted_proxies = 127.0.0.1\n",
    )


def _front(
    tmp_path: Path, upstream: RegistryProcess, access: str
) -> Generator[Front, None, None]:
    mirror_port = free_port()
    workdir = tmp_path / "mirror"
    workdir.mkdir()
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    (workdir / "users.htpasswd").write_text(f"alice:{hashed}\n")
    config = mirror_config(mirror_port, upstream.url) + f"\n[access]\n{access}"
    mirror = MirrorProcess(workdir, config, mirror_port)
    mirror.start()
    nginx: subprocess.Popen[bytes] | None = None
    try:
        nginx, port = start_nginx(tmp_path, mirror_port)
        context = ssl.create_default_context(cafile=str(tmp_path / "tls" / "cert.pem"))
        front = Front(port, context, mirror)

        def ready() -> bool:
            try:
                return front.get("127.0.0.2", "/healthz")[0] == 200
            except OSError:
                return False

        poll_until(ready, timeout=15, describe=lambda: "nginx did not come up")
        yield front
    finally:
        if nginx is not None:
            stop_process(nginx)
        mirror.stop()


def _basic(password: str) -> tuple[str, str]:
    pair = base64.b64encode(f"alice:{password}".encode()).decode()
    return ("Authorization", f"Basic {pair}")


#: what a client sends to pass for 127.0.0.2, the one anonymous address, in
#: every forwarding header and spelling
FORGED = [
    [("Forwarded", "for=127.0.0.2")],
    [("forwarded", 'FOR="127.0.0.2:4711"')],
    [("Forwarded", "for=192.0.2.1"), ("Forwarded", "for=127.0.0.2")],
    [("X-Forwarded-For", "127.0.0.2")],
    [("x-forwarded-for", "192.0.2.1, 127.0.0.2")],
    [("X-Forwarded-For", "127.0.0.2"), ("X-Forwarded-For", "127.0.0.2")],
    [("X-Forwarded-For", "unknown")],
    [("X-Real-IP", "127.0.0.2")],
    [("X-Real-IP", "127.0.0.2"), ("Forwarded", 'for="[::1]:1234"')],
    [("True-Client-IP", "127.0.0.2"), ("X-Client-IP", "127.0.0.2")],
]


def test_behind_nginx_only_the_address_nginx_saw_counts(
    guarded_front: Front,
) -> None:
    """
    Behind the shipped site, the client is the address nginx saw: 127.0.0.2
    pulls anonymously, 127.0.0.3 is challenged, whatever it claims in
    ``Forwarded`` (which the site clears), ``X-Forwarded-For`` (nginx
    appends the real address, the right-most one counts), ``X-Real-IP``
    (which the site sets) or any other header, in any case, on one line
    or several.  The realm is https, as nginx says, whatever the client
    sends as ``X-Forwarded-Proto``.
    """
    front = guarded_front
    assert front.get("127.0.0.2")[0] == 200
    for headers in FORGED:
        assert front.get("127.0.0.2", headers=headers)[0] == 200, headers
        status, response = front.get("127.0.0.3", headers=headers)
        assert status == 401, headers
    status, response = front.get(
        "127.0.0.3", headers=[("X-Forwarded-Proto", "http"), ("Host", "mirror.example")]
    )
    assert status == 401
    challenge = response.getheader("WWW-Authenticate") or ""
    assert challenge.startswith('Bearer realm="https://mirror.example/token"'), (
        challenge
    )


def test_behind_nginx_rotating_forwarding_headers_do_not_defeat_the_throttle(
    guarded_front: Front,
) -> None:
    """
    Five wrong passwords from 127.0.0.3, each claiming another address in
    every forwarding header, make the sixth attempt 429, even with the
    right password; 127.0.0.4 still logs in.
    """
    front = guarded_front
    for n in range(5):
        forged = [
            ("Forwarded", f"for=10.0.0.{n}"),
            ("X-Forwarded-For", f"10.0.1.{n}"),
            ("X-Real-IP", f"10.0.2.{n}"),
            _basic(f"wrong-{n}"),
        ]
        assert front.get("127.0.0.3", headers=forged)[0] == 401
    sixth = [("Forwarded", "for=10.0.0.99"), _basic(PASSWORD)]
    assert front.get("127.0.0.3", headers=sixth)[0] == 429
    assert front.get("127.0.0.4", headers=[_basic(PASSWORD)])[0] == 200


@pytest.mark.parametrize(
    "header",
    [
        'mirror.test",realm="https://evil.example',
        "mirror test",
        "mirror.test/other/path",
    ],
)
def test_behind_nginx_a_bad_host_is_never_echoed(
    guarded_front: Front, header: str
) -> None:
    """A ``Host`` that is no ``host[:port]`` never reaches a challenge
    through the site: nginx or the mirror refuses it (400)."""
    status, response = guarded_front.get("127.0.0.3", headers=[("Host", header)])
    assert status == 400
    assert response.getheader("WWW-Authenticate") is None


def test_the_site_clears_a_client_forwarded_header(
    tmp_path: Path, upstream: RegistryProcess
) -> None:
    """
    The shipped site never passes a client's ``Forwarded`` on: even a
    mirror set to believe ``forwarded_header = forwarded`` (which this site
    does not set) sees none from a client claiming 10.1.2.3, an anonymous
    address, and challenges it.
    """
    fronts = _front(
        tmp_path,
        upstream,
        "anonymous = 10.0.0.0/8\nhtpasswd = users.htpasswd\n"
        "trusted_proxies = 127.0.0.1\nforwarded_header = forwarded\n",
    )
    front = next(fronts)
    try:
        for value in ("for=10.1.2.3", 'for="10.1.2.3:1"', "For=10.1.2.3;proto=https"):
            status, _ = front.get("127.0.0.3", headers=[("Forwarded", value)])
            assert status == 401, value
    finally:
        fronts.close()
