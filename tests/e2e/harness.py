"""
Real processes for the end-to-end suite: an upstream ``docker-registry``,
``skopeo`` and the mirror itself under ``twistd``.

Everything binds 127.0.0.1.  Every wait is a bounded poll, and every process
started here is stopped by its owner (terminate, bounded wait, kill).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .images import Image, write_layout

LOCALHOST = "127.0.0.1"
REGISTRY_BINARY = "/usr/bin/docker-registry"
SKOPEO_BINARY = "/usr/bin/skopeo"

POLL_INTERVAL = 0.05
REGISTRY_START_TIMEOUT = 10.0
MIRROR_START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
SKOPEO_TIMEOUT = 120.0


class HarnessError(AssertionError):
    """The test environment itself misbehaved (a process failed to start...)."""


#: Ports :func:`free_port` handed out in this run: never twice.
_HANDED_OUT: set[int] = set()
#: Where :func:`free_port` looks: below the kernel's ephemeral range.
_LOWEST_PORT = 10000


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_slice() -> tuple[int, int]:
    """
    Where this process looks for ports: all of it, or under pytest-xdist
    the worker's own slice, so that two workers never pick the same port
    between one's check and its server's bind.
    """
    low, high = _LOWEST_PORT, _ephemeral_start()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2:
        return low, high
    width = (high - low) // count
    start = low + int(worker[2:]) * width
    return start, start + width


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now, for a
    process that binds it later.  Picked below the kernel's ephemeral
    range, so that no outgoing connection's source port takes it in
    between (binding port 0 picks from that range), and never handed out
    twice in one run (two calls in a row could get the same port).
    """
    rng = random.Random()
    low, high = _port_slice()
    for _ in range(1000):
        port = rng.randrange(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOCALHOST, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise HarnessError("no free port below the ephemeral range")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((LOCALHOST, port)) != 0


def poll_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    describe: Callable[[], str],
    interval: float = POLL_INTERVAL,
) -> None:
    """Call *condition* every *interval* until true; at most *timeout* seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        if condition():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    if condition():
        return
    raise HarnessError(f"gave up after {timeout:.1f}s: {describe()}")


def await_start(
    process: subprocess.Popen[bytes],
    what: str,
    probe: Callable[[], bool],
    log: Callable[[], str],
    stop: Callable[[], None],
    *,
    timeout: float,
    interval: float = POLL_INTERVAL,
) -> None:
    """
    Poll *probe* until the freshly started *process* is ready; fail at once,
    with its log, if it exits first.  On any failure *stop* it.
    """

    def ready() -> bool:
        if process.poll() is not None:
            raise HarnessError(f"{what} exited with {process.returncode}:\n{log()}")
        return probe()

    try:
        poll_until(
            ready,
            timeout=timeout,
            interval=interval,
            describe=lambda: f"{what} not ready:\n{log()}",
        )
    except BaseException:
        stop()
        raise


def stop_process(
    process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT
) -> None:
    """SIGTERM, wait up to *timeout*, then SIGKILL and reap."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


# -- plain HTTP ---------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> Any:
        return json.loads(self.body)

    def error_codes(self) -> list[str]:
        """The ``code`` of each entry of an OCI error body."""
        return [entry["code"] for entry in self.json()["errors"]]


def http_request(
    port: int,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = 10.0,
) -> Response:
    """
    One request to 127.0.0.1:*port*, sending *path* byte for byte (no
    normalisation of ``..`` or percent-escapes).
    """
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=timeout)
    try:
        connection.request(method, path, headers=dict(headers or {}))
        response = connection.getresponse()
        body = response.read()
        return Response(response.status, response.headers, body)
    finally:
        connection.close()


def responds_ok(port: int, path: str = "/v2/") -> bool:
    try:
        return http_request(port, "GET", path, timeout=1.0).status == 200
    except (OSError, http.client.HTTPException):
        return False


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON records in the log at *path* that a process has finished
    writing: a last line without its newline is still being written (a
    buffered writer flushes at its buffer's size, mid-line) and is left for
    the next look."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    return [
        json.loads(line)
        for line in text[: text.rfind("\n") + 1].splitlines()
        if line.strip()
    ]


# -- a browser ---------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium(tmp_path: Path, url: str, *extra: str) -> str:
    """
    Load *url* headless, let its scripts run, and return the DOM.

    Headless Chromium now and then hangs before it opens any connection
    (seen in CI: minutes with no socket to the server, which answered curl
    at once meanwhile); such a run is killed after 30 s and started
    afresh, twice at most.
    """
    if not Path(CHROMIUM).exists():
        raise HarnessError("chromium is not installed: run scripts/dev test")
    for attempt in range(3):
        process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-proxy-server",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / f'chromium-{attempt}'}",
                "--virtual-time-budget=5000",
                *extra,
                url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # its helpers are killed with it
        )
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            continue
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # helpers left behind
            except ProcessLookupError:
                pass
        assert process.returncode == 0, err[-2000:]
        return out
    raise HarnessError(f"chromium hung three times loading {url}")


# -- the upstream registry ------------------------------------------------------

_REGISTRY_CONFIG = """\
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: false
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {host}:{port}
  secret: regmirror-e2e-not-a-secret
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: false
"""


@dataclass(frozen=True)
class RegistryTls:
    """
    ``http.tls`` of a registry: its certificate and key, and the CAs whose
    client certificates it requires (none: no client certificate asked).
    ``probe_client`` is a ``(certificate, key)`` the readiness probe presents.
    """

    certificate: Path
    key: Path
    client_cas: tuple[Path, ...] = ()
    probe_client: tuple[Path, Path] | None = None


def _yaml_scalar(value: object) -> str:
    # JSON strings are YAML scalars, quoted and escaped.
    return json.dumps(str(value))


class RegistryProcess:
    """
    A CNCF distribution registry on 127.0.0.1 with filesystem storage.

    Its access log (stdout) and its own log (stderr) go to separate files, so
    that :meth:`count_requests` sees only access-log lines.

    *auth* is the registry's ``auth`` section, e.g.
    ``{"htpasswd": {"realm": "test", "path": "/x/htpasswd"}}``; *tls* makes
    it serve HTTPS only.
    """

    def __init__(
        self,
        storage: Path,
        workdir: Path,
        *,
        auth: Mapping[str, Mapping[str, object]] | None = None,
        tls: RegistryTls | None = None,
    ) -> None:
        self.storage = storage
        self.workdir = workdir
        if tls is not None and tls.client_cas and tls.probe_client is None:
            raise HarnessError("a registry wanting client certificates needs a probe")
        self.auth = auth
        self.tls = tls
        self.port = free_port()
        self.config_path = workdir / "registry.yml"
        self.access_log_path = workdir / "registry-access.log"
        self.log_path = workdir / "registry.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    @property
    def host(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def url(self) -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://{self.host}"

    def _config_text(self) -> str:
        text = _REGISTRY_CONFIG.format(
            storage=self.storage, host=LOCALHOST, port=self.port
        )
        if self.tls is not None:
            http_tls = (
                "  tls:\n"
                f"    certificate: {_yaml_scalar(self.tls.certificate)}\n"
                f"    key: {_yaml_scalar(self.tls.key)}\n"
            )
            if self.tls.client_cas:
                http_tls += "    clientcas:\n" + "".join(
                    f"      - {_yaml_scalar(ca)}\n" for ca in self.tls.client_cas
                )
            text = text.replace("  headers:\n", http_tls + "  headers:\n", 1)
        if self.auth is not None:
            text += "auth:\n"
            for kind, options in self.auth.items():
                text += f"  {kind}:\n" + "".join(
                    f"    {key}: {_yaml_scalar(value)}\n"
                    for key, value in options.items()
                )
        return text

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config_text())
        stdout = self.access_log_path.open("ab")
        stderr = self.log_path.open("ab")
        self._files = [stdout, stderr]
        self._process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=self.workdir,
        )
        await_start(
            self._process,
            f"registry on {self.host}",
            self._ready,
            self.log,
            self.stop,
            timeout=REGISTRY_START_TIMEOUT,
        )

    def _ready(self) -> bool:
        if self.auth is None and self.tls is None:
            return responds_ok(self.port)
        return self._answers()

    def _answers(self) -> bool:
        """``/v2/`` answers 200 or, behind auth, 401 (over TLS if served so)."""
        if self.tls is None:
            connection = http.client.HTTPConnection(LOCALHOST, self.port, timeout=1.0)
        else:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            if self.tls.probe_client is not None:
                context.load_cert_chain(*self.tls.probe_client)
            connection = http.client.HTTPSConnection(
                LOCALHOST, self.port, timeout=1.0, context=context
            )
        try:
            connection.request("GET", "/v2/")
            return connection.getresponse().status in (200, 401)
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)
        for f in self._files:
            f.close()
        self._files = []

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        return (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )

    def access_log(self) -> list[str]:
        if not self.access_log_path.exists():
            return []
        return self.access_log_path.read_text(errors="replace").splitlines()

    def count_requests(self, method: str, path_pattern: str) -> int:
        """
        Count access-log lines for *method* on a path fully matching the
        regular expression *path_pattern* (query strings are ignored).
        """
        line = re.compile(
            rf'"{re.escape(method)} ({path_pattern})(\?\S*)? HTTP/1\.[01]"'
        )
        return sum(1 for entry in self.access_log() if line.search(entry))

    def count_blob_gets(self, digest: str) -> int:
        """How many times any repository's blob *digest* was fetched with GET."""
        return self.count_requests("GET", rf"/v2/\S+/blobs/{re.escape(digest)}")


# -- skopeo ---------------------------------------------------------------------


class Skopeo:
    """``skopeo`` with a permissive policy and no system registries config."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.policy_path = workdir / "policy.json"
        self.policy_path.write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        )
        self.registries_conf = workdir / "registries.conf"
        self.registries_conf.write_text("")
        self.registries_d = workdir / "registries.d"
        self.registries_d.mkdir(exist_ok=True)
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir(exist_ok=True)

    def run(self, *args: str, timeout: float = SKOPEO_TIMEOUT) -> bytes:
        command = [
            SKOPEO_BINARY,
            "--policy",
            str(self.policy_path),
            "--registries.d",
            str(self.registries_d),
            "--tmpdir",
            str(self.tmpdir),
            *args,
        ]
        env = {
            **os.environ,
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "NO_PROXY": "*",
        }
        for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(proxy, None)
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=env,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited with {result.returncode}:\n"
                f"{result.stderr.decode(errors='replace')}"
            )
        return result.stdout

    def push_layout(
        self, layout: Path, tag: str, registry_host: str, name: str
    ) -> None:
        """Push ``oci:layout:tag`` to ``registry_host/name:tag`` bit for bit."""
        self.run(
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            f"oci:{layout}:{tag}",
            f"docker://{registry_host}/{name}:{tag}",
        )

    def push_images(
        self, registry_host: str, images: Iterable[Image], workdir: Path
    ) -> None:
        """
        Push each image to ``registry_host/<repository>:<tag>``, in order,
        through an OCI layout of its own written under *workdir*.
        """
        for number, image in enumerate(images):
            layout = workdir / f"push-{number}"
            write_layout(layout, [image])
            self.push_layout(layout, image.tag, registry_host, image.repository)

    def pull(
        self,
        registry_host: str,
        reference: str,
        destination: Path,
        tag: str,
        *,
        all_platforms: bool = False,
        extra: Sequence[str] = (),
    ) -> None:
        """
        Copy ``registry_host/reference`` (``name:tag`` or ``name@digest``) to
        the OCI layout *destination* under *tag*, without changing any byte.
        """
        if destination.exists():
            shutil.rmtree(destination)
        self.run(
            "copy",
            "--quiet",
            *(["--all"] if all_platforms else []),
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-oci-accept-uncompressed-layers",
            *extra,
            f"docker://{registry_host}/{reference}",
            f"oci:{destination}:{tag}",
        )

    def inspect_raw(self, registry_host: str, reference: str) -> bytes:
        return self.run(
            "inspect",
            "--raw",
            "--tls-verify=false",
            f"docker://{registry_host}/{reference}",
        )


# -- the mirror -----------------------------------------------------------------


def mirror_config(
    port: int, upstream_url: str, *, tag_ttl: str = "0s", prefetch: int = 3
) -> str:
    """The INI configuration of a mirror with one upstream for docker.io
    (pulling *prefetch* blobs ahead, the default)."""
    return f"""\
[server]
listen = tcp:{port}:interface={LOCALHOST}

[cache]
directory = cache
tag_ttl = {tag_ttl}

[upstream:origin]
url = {upstream_url}
connect_timeout = 2s
response_timeout = 10s
idle_timeout = 10s

[namespace:docker.io]
upstreams = origin
origin = origin
default = true
aliases = index.docker.io registry-1.docker.io
prefetch = {prefetch}
"""


def mirror_config_upstreams(
    port: int,
    upstreams: Mapping[str, Mapping[str, str]],
    *,
    origin: str,
    tag_ttl: str = "0s",
) -> str:
    """
    The INI configuration of a mirror whose docker.io namespace has several
    upstreams, tried in the order of *upstreams* (name → keys, ``url``
    included; short timeouts unless given).
    """
    return mirror_config_namespaces(
        port,
        upstreams,
        {
            "docker.io": {
                "upstreams": " ".join(upstreams),
                "origin": origin,
                "default": "true",
                "aliases": "index.docker.io registry-1.docker.io",
            }
        },
        tag_ttl=tag_ttl,
    )


def mirror_config_namespaces(
    port: int,
    upstreams: Mapping[str, Mapping[str, str]],
    namespaces: Mapping[str, Mapping[str, str]],
    *,
    tag_ttl: str = "0s",
) -> str:
    """
    The INI configuration of a mirror with several namespaces: *upstreams*
    maps each upstream's name to its keys (``url`` included; short timeouts
    unless given), *namespaces* each namespace's name to its keys
    (``upstreams``, ``origin``, ``default``, ``hosts``...), written as given.
    """
    sections = []
    for name, options in upstreams.items():
        keys = {
            "connect_timeout": "2s",
            "response_timeout": "10s",
            "idle_timeout": "10s",
            **options,
        }
        body = "".join(f"{k} = {v}\n" for k, v in keys.items())
        sections.append(f"[upstream:{name}]\n{body}")
    for name, options in namespaces.items():
        body = "".join(f"{k} = {v}\n" for k, v in options.items())
        sections.append(f"[namespace:{name}]\n{body}")
    return f"""\
[server]
listen = tcp:{port}:interface={LOCALHOST}

[cache]
directory = cache
tag_ttl = {tag_ttl}

{chr(10).join(sections)}"""


#: the ``Host`` header that the ghcr.io namespace of
#: :func:`two_namespace_config` answers to
GHCR_HOST = "ghcr.mirror.test"


def two_namespace_config(port: int, hub_url: str, ghcr_url: str) -> str:
    """
    A mirror serving ``docker.io`` (the default, from upstream ``hub``) and
    ``ghcr.io`` (from upstream ``ghcr``, also for ``Host: GHCR_HOST``).
    """
    return mirror_config_namespaces(
        port,
        {"hub": {"url": hub_url}, "ghcr": {"url": ghcr_url}},
        {
            "docker.io": {
                "upstreams": "hub",
                "origin": "hub",
                "default": "true",
                "aliases": "index.docker.io registry-1.docker.io",
            },
            "ghcr.io": {"upstreams": "ghcr", "origin": "ghcr", "hosts": GHCR_HOST},
        },
    )


@dataclass(frozen=True)
class TwoNamespaces:
    """A mirror made by :func:`two_namespace_config` and its upstreams."""

    mirror: MirrorProcess
    #: the docker.io upstream: the seeded catalog
    hub: RegistryProcess
    #: the ghcr.io upstream: :func:`images.ghcr_app` only
    ghcr: RegistryProcess
    #: access-log lengths once the registries were filled
    hub_mark: int
    ghcr_mark: int

    def hub_log(self) -> list[str]:
        """The docker.io upstream's access log since the mirror started."""
        return self.hub.access_log()[self.hub_mark :]

    def ghcr_log(self) -> list[str]:
        """The ghcr.io upstream's access log since the mirror started."""
        return self.ghcr.access_log()[self.ghcr_mark :]


# ``python -m twisted`` is the newer ``twist`` runner, which has no --nodaemon,
# --pidfile or --logfile; twistd itself has no ``__main__``, hence ``-c``.
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"


def twistd_command(
    config_path: Path, log_path: Path, logger: str | None = None
) -> list[str]:
    """``twistd regmirror -c CONFIG`` in the foreground, run by this Python;
    with *logger* (``regmirror.logs.json_lines``), logging through it (to
    standard output) instead of to *log_path*."""
    return [
        sys.executable,
        "-c",
        _TWISTD,
        "--nodaemon",
        "--pidfile=",
        f"--logfile={log_path}",
        *([f"--logger={logger}"] if logger else []),
        "regmirror",
        "-c",
        str(config_path),
    ]


#: one sample of the Prometheus text format: name, optional labels, value
_SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)"
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class MirrorProcess:
    """``twistd regmirror`` in its own directory, with its log in a file."""

    def __init__(
        self,
        workdir: Path,
        config_text: str,
        port: int,
        *,
        env: Mapping[str, str] | None = None,
        logger: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port
        #: twistd's ``--logger`` (the log then in :attr:`output_path`)
        self.logger = logger
        #: variables added to this process's environment for the mirror
        self.env = dict(env or {})
        self.config_path = workdir / "mirror.ini"
        self.log_path = workdir / "twistd.log"
        self.output_path = workdir / "twistd.out"
        self.cache_dir = workdir / "cache"
        self._config_text = config_text
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config_text)
        self._output = self.output_path.open("ab")
        self._process = subprocess.Popen(
            twistd_command(self.config_path, self.log_path, self.logger),
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, **self.env} if self.env else None,
        )
        await_start(
            self._process,
            f"mirror on {self.host}",
            # /healthz, not /v2/: with [access] the API may refuse 127.0.0.1.
            lambda: responds_ok(self.port, "/healthz"),
            self.log,
            self.stop,
            timeout=MIRROR_START_TIMEOUT,
        )

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)
        if self._output is not None:
            self._output.close()
            self._output = None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def rss_kib(self) -> int:
        """The mirror process's resident memory now (``VmRSS``), in KiB."""
        assert self._process is not None, "the mirror is not running"
        status = Path(f"/proc/{self._process.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise HarnessError(f"no VmRSS for the mirror:\n{status}")

    def log(self) -> str:
        """The twistd log file and anything printed to stdout/stderr."""
        parts = []
        for path in (self.log_path, self.output_path):
            if path.exists():
                parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def log_lines(self) -> list[str]:
        if not self.log_path.exists():
            return []
        return self.log_path.read_text(errors="replace").splitlines()

    def unhandled_errors(self) -> list[str]:
        """Log lines that show an exception nobody handled: always a bug."""
        markers = ("Traceback (most recent call last)", "Unhandled error")
        return [
            line
            for line in self.log().splitlines()
            if any(marker.lower() in line.lower() for marker in markers)
        ]

    def request(
        self, method: str, path: str, headers: Mapping[str, str] | None = None
    ) -> Response:
        return http_request(self.port, method, path, headers)

    def cache_listing(self) -> set[str]:
        """Every file and directory under the cache directory, relative to it."""
        if not self.cache_dir.exists():
            return set()
        return {
            str(path.relative_to(self.cache_dir)) for path in self.cache_dir.rglob("*")
        }

    def cached_blobs(self) -> dict[str, str]:
        """
        Each file under ``blobs/sha256/`` of the cache, as the digest its
        name says mapped to the digest of its content.
        """
        found: dict[str, str] = {}
        for path in sorted(self.cache_dir.glob("blobs/sha256/*/*")):
            hasher = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    hasher.update(chunk)
            found["sha256:" + path.name] = "sha256:" + hasher.hexdigest()
        return found

    def metric(self, name: str, **labels: str) -> float:
        """
        The sum of the samples of *name* (``regmirror_..._total``) on the
        mirror's ``/metrics`` whose labels include *labels*; 0 if none.
        """
        response = self.request("GET", "/metrics")
        if response.status != 200:
            raise HarnessError(f"/metrics answered {response.status}")
        total = 0.0
        for line in response.body.decode().splitlines():
            sample = _SAMPLE.fullmatch(line)
            if sample is None or sample["name"] != name:
                continue
            found = dict(_LABEL.findall(sample["labels"] or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(sample["value"])
        return total

    def wait_for_log(self, pattern: str, *, timeout: float = 10.0) -> list[str]:
        """
        Poll the log until a line matches the regular expression *pattern*
        (bounded); the matching lines.
        """
        regex = re.compile(pattern)

        def matching() -> list[str]:
            return [line for line in self.log_lines() if regex.search(line)]

        poll_until(
            lambda: bool(matching()),
            timeout=timeout,
            describe=lambda: f"no log line matches {pattern!r}:\n{self.log()}",
        )
        return matching()


def run_mirror_to_exit(
    workdir: Path, config_text: str, *, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``twistd regmirror`` with a config expected to make it exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "mirror.ini"
    config_path.write_text(config_text)
    return subprocess.run(
        twistd_command(config_path, workdir / "twistd.log"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=workdir,
    )


# -- the processes of workers = N -------------------------------------------------


def workers_of(mirror: MirrorProcess) -> list[int]:
    """The pids of the mirror's worker processes."""
    assert mirror._process is not None
    found = subprocess.run(
        ["pgrep", "-P", str(mirror._process.pid), "-f", "regmirror.worker"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return [int(pid) for pid in found.stdout.split()]


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """*pid* stopped (SIGSTOP) meanwhile: the mirror's other processes
    accept every connection."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
