"""
Side-by-side benchmark of regmirror, the reference registry's proxy mode and
nginx, on this machine, over loopback only.

Run from the repository root::

    .venv/bin/python benchmarks/bench.py [--size-mib 256] [--out FILE] [--cluster]
        [--only main|tls|slow ...]

An upstream ``docker-registry`` (access log on) gets one generated image
whose single layer is *size* MiB of seeded pseudo-random bytes, pushed with
the registry API (one monolithic ``PUT`` streamed from a file).  Then, for
regmirror (``twistd -n regmirror``) and for a second ``docker-registry``
with ``proxy.remoteurl`` pointing at the upstream:

- cold: 1 and 32 concurrent clients of the big blob, each case on a fresh
  process with an empty cache (wall time, aggregate MiB/s, time to first
  body byte, and the upstream's GETs of that blob from its access log);
- warm: 1 and 8 concurrent clients (MiB/s), on a restarted process that
  keeps its cache; nginx serving the same blob file with ``sendfile on``
  gives the machine's limit here;
- manifests: 2,000 GETs by tag and 2,000 by digest, 16 clients on
  keep-alive connections (p50/p99 latency, requests/s), on a restarted
  process that keeps its cache; regmirror with its default ``tag_ttl``;
- after each phase: the server's peak RSS (``VmHWM``) and CPU seconds.

With ``--cluster``, also three regmirror nodes on loopback sharing a
``redis-server`` (``[cluster]``, each advertising its own URL) and, when
Ceph is installed, a single-node Ceph RGW bucket (``[cache] backend = s3``),
both started with ``tests/e2e/engines.py``:

- cold: 32 clients spread over the three nodes, everything fresh each run
  (Redis flushed, a new bucket, empty caches): as above, plus where each
  node took the blob from (its log: the upstream, the lease holder, the
  bucket);
- from the bucket: three new nodes with empty caches, 8 clients over them,
  the blob only in the bucket now (MiB/s; the upstream's GETs of the blob
  since the cold run stay 1);
- warm: those nodes restarted on the caches they filled, 8 clients;
- each node's peak RSS and CPU seconds per phase.

The TLS section (``--only tls`` runs it alone): the warm blob over TLS,
one and eight clients, from regmirror's ``ssl:`` listener with ``workers``
1 and 2 and from nginx with ``worker_processes`` 1 and 2, all with the
same self-signed certificate; every server runs at once and the columns
take turns, run after run; MiB/s, the server processes' CPU seconds per
GiB sent, and the cipher the clients negotiated.

The slow section (``--only slow``): ``relay.py`` between the servers under
test and the upstream limits every connection to ``--slow-mib-s`` (10) MiB/s
each way; through it, for regmirror and the reference proxy with empty
caches, a cold ``skopeo copy`` of a 12-layer image (2 to 24 MiB layers,
156 MiB), a cold ``docker pull`` of it by a Docker daemon whose
``registry-mirrors`` is the server (three layers at a time, as dockerd
pulls; started afresh each run from ``tests/e2e/daemons.py``; left out
where dockerd cannot run) and one cold client of the big blob (wall time,
MiB/s, the upstream's GETs).

Clients are threads: blob clients on raw sockets, which receive every body
to its end into one reusable buffer and discard it (time to first byte is
to the first body byte; "last-byte wait" is how long a client holding all
but the last byte waited for it); manifest clients with ``http.client`` on
keep-alive connections.  They share the machine's cores with the servers.
Each measurement runs ``--repeat`` times (3); the run with the median
throughput is reported, with every run's figure beside it in the JSON.

Everything listens on 127.0.0.1; every process started is stopped; every
wait is bounded.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import http.client
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

LOCALHOST = "127.0.0.1"
REGISTRY_BINARY = "/usr/bin/docker-registry"
NGINX_BINARY = "/usr/sbin/nginx"
SKOPEO_BINARY = "/usr/bin/skopeo"
OPENSSL_BINARY = "/usr/bin/openssl"
RELAY_SCRIPT = Path(__file__).resolve().parent / "relay.py"

REPOSITORY = "bench/big"
TAG = "latest"
SEED = 20240601

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MANIFEST_ACCEPT = ", ".join(
    (
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)

MIB = 1024 * 1024
GENERATE_CHUNK = 4 * MIB
READ_BUFFER = MIB

POLL_INTERVAL = 0.05
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
#: longest wait for one socket operation of a client
SOCKET_TIMEOUT = 120.0
#: longest wait for a whole group of concurrent clients
CLIENTS_TIMEOUT = 600.0
#: longest wait for a proxy to have a blob in its store after its clients
STORED_TIMEOUT = 120.0

COLD_CLIENTS = (1, 32)
WARM_CLIENTS = (1, 8)

#: What a run measures: the side-by-side rows above, the warm blob over
#: TLS, and cold pulls through a slow link (``--only``).
SECTIONS = ("main", "tls", "slow")
TLS_CLIENTS = (1, 8)
TLS_WORKERS = (1, 2)
#: The slow link: every upstream connection, each direction, at this rate.
SLOW_MIB_S = 10.0
#: The many-layer image of the slow section: layer *i* (from 1) is
#: ``i * SLOW_LAYER_STEP_MIB`` MiB, 156 MiB in all.
SLOW_REPOSITORY = "bench/layers"
SLOW_LAYERS = 12
SLOW_LAYER_STEP_MIB = 2

# ``python -m twisted`` is the newer ``twist`` runner; twistd has no __main__.
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"


class BenchError(RuntimeError):
    """Something in the benchmark's own set-up went wrong."""


# -- small helpers -------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], bool], *, timeout: float, what: Callable[[], str]
) -> None:
    """Poll *condition* every ``POLL_INTERVAL``, for at most *timeout* seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_INTERVAL) + 1):
        if condition():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_INTERVAL)
    if not condition():
        raise BenchError(f"gave up after {timeout:.0f}s: {what()}")


def answers(port: int, path: str) -> bool:
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=2.0)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def proc_status(pid: int, key: str) -> int | None:
    """A ``kB`` field of ``/proc/PID/status`` in bytes (``VmHWM``, ``VmRSS``)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of *pid* so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of stat(5)); utime and stime are 14, 15.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy (all CPUs, from boot)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_busy_seconds() -> float:
    """CPU time of this process and of its children that have been reaped."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def machine() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text()
    match = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(int(match.group(1)) / 1024 / 1024, 1) if match else None,
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def tool_version(command: Sequence[str]) -> str:
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (result.stdout + result.stderr).strip().splitlines()[0]


# -- the image -----------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    path: Path


def write_layer(path: Path, size: int, seed: int = SEED) -> Blob:
    """
    An uncompressed tar holding one file of *size* seeded pseudo-random
    bytes, written and hashed a chunk at a time.
    """
    info = tarfile.TarInfo("big.bin")
    info.size = size
    info.mtime = 1_700_000_000
    info.mode = 0o644
    info.uname = info.gname = "root"
    hasher = hashlib.sha256()
    written = 0
    generator = random.Random(seed)
    with path.open("wb") as f:

        def put(data: bytes) -> None:
            nonlocal written
            f.write(data)
            hasher.update(data)
            written += len(data)

        put(info.tobuf(format=tarfile.PAX_FORMAT))
        remaining = size
        for _ in range(size // GENERATE_CHUNK + 1):
            if remaining <= 0:
                break
            step = min(GENERATE_CHUNK, remaining)
            put(generator.randbytes(step))
            remaining -= step
        # End of the member, then the two zero blocks that end an archive.
        put(b"\0" * (-size % tarfile.BLOCKSIZE) + b"\0" * (2 * tarfile.BLOCKSIZE))
    return Blob("sha256:" + hasher.hexdigest(), written, path)


def canonical_json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Image:
    layers: tuple[Blob, ...]
    config: bytes
    manifest: bytes

    @property
    def layer(self) -> Blob:
        """The first layer: the main section's image has only one."""
        return self.layers[0]

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def make_image(folder: Path, size: int) -> Image:
    return image_of((write_layer(folder / "layer.tar", size),))


def make_layered_image(folder: Path) -> Image:
    """The slow section's image: ``SLOW_LAYERS`` layers of growing sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    return image_of(
        tuple(
            write_layer(
                folder / f"layer{i}.tar", i * SLOW_LAYER_STEP_MIB * MIB, SEED + i
            )
            for i in range(1, SLOW_LAYERS + 1)
        )
    )


def image_of(layers: tuple[Blob, ...]) -> Image:
    config = canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-06-01T00:00:00Z",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": [layer.digest for layer in layers],
            },
        }
    )
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": OCI_LAYER_TAR,
                    "digest": layer.digest,
                    "size": layer.size,
                }
                for layer in layers
            ],
        }
    )
    return Image(layers, config, manifest)


def _upload(
    port: int,
    digest: str,
    size: int,
    body: bytes | IO[bytes],
    repository: str = REPOSITORY,
) -> None:
    """A monolithic blob upload: ``POST`` a session, ``PUT`` all the bytes."""
    connection = http.client.HTTPConnection(
        LOCALHOST, port, timeout=SOCKET_TIMEOUT, blocksize=READ_BUFFER
    )
    try:
        connection.request("POST", f"/v2/{repository}/blobs/uploads/")
        response = connection.getresponse()
        response.read()
        location = response.getheader("Location")
        if response.status != 202 or not location:
            raise BenchError(f"upload session: {response.status}")
        location = re.sub(r"^https?://[^/]+", "", location)
        separator = "&" if "?" in location else "?"
        connection.request(
            "PUT",
            f"{location}{separator}digest={digest}",
            body=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
            },
        )
        response = connection.getresponse()
        text = response.read()
        if response.status != 201:
            raise BenchError(f"upload of {digest}: {response.status} {text[:200]!r}")
    finally:
        connection.close()


def push_image(port: int, image: Image, repository: str = REPOSITORY) -> None:
    for layer in image.layers:
        with layer.path.open("rb") as f:
            _upload(port, layer.digest, layer.size, f, repository)
    config_digest = "sha256:" + hashlib.sha256(image.config).hexdigest()
    _upload(port, config_digest, len(image.config), image.config, repository)
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=SOCKET_TIMEOUT)
    try:
        connection.request(
            "PUT",
            f"/v2/{repository}/manifests/{TAG}",
            body=image.manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        response = connection.getresponse()
        text = response.read()
        if response.status != 201:
            raise BenchError(f"manifest push: {response.status} {text[:200]!r}")
    finally:
        connection.close()


# -- processes -----------------------------------------------------------------


class Server:
    """A process listening on 127.0.0.1:``port``; logs go to files in ``workdir``."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write configuration files before the process starts."""

    def ready_path(self) -> str:
        return "/v2/"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        stdout = (self.workdir / f"{self.name}.out").open("ab")
        stderr = (self.workdir / f"{self.name}.err").open("ab")
        self._files = [stdout, stderr]
        self._process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=self.workdir,
        )
        try:
            wait_until(
                self._ready,
                timeout=START_TIMEOUT,
                what=lambda: f"{self.name} on port {self.port} not ready",
            )
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            err = (self.workdir / f"{self.name}.err").read_text(errors="replace")
            raise BenchError(
                f"{self.name} exited with {self._process.returncode}:\n{err[-2000:]}"
            )
        return answers(self.port, self.ready_path())

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
        for f in self._files:
            f.close()
        self._files = []

    def usage(self) -> dict[str, float | None]:
        """Peak RSS in MiB and CPU seconds of the process so far."""
        hwm = proc_status(self.pid, "VmHWM")
        cpu = cpu_seconds(self.pid)
        return {
            "peak_rss_mib": None if hwm is None else round(hwm / MIB, 1),
            "cpu_s": None if cpu is None else round(cpu, 2),
        }


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
  secret: regmirror-bench-not-a-secret
health:
  storagedriver:
    enabled: false
"""


class Registry(Server):
    """
    Debian's ``docker-registry``; a pull-through proxy of *remote* if given.
    Its access log is its stdout, ``<name>.out``.
    """

    def __init__(
        self, workdir: Path, storage: Path, *, remote: str | None = None
    ) -> None:
        super().__init__(workdir)
        self.name = "proxy" if remote else "upstream"
        self.storage = storage
        self.remote = remote

    def prepare(self) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        text = _REGISTRY_CONFIG.format(
            storage=json.dumps(str(self.storage)), host=LOCALHOST, port=self.port
        )
        if self.remote:
            text += f"proxy:\n  remoteurl: {self.remote}\n"
        (self.workdir / "registry.yml").write_text(text)

    def command(self) -> list[str]:
        return [REGISTRY_BINARY, "serve", str(self.workdir / "registry.yml")]

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def blob_gets(self, digest: str) -> int:
        return self.count(rf'"GET /v2/\S+/blobs/{re.escape(digest)}(\?\S*)? HTTP/')

    def manifest_requests(self) -> int:
        return self.count(r'"(GET|HEAD) /v2/\S+/manifests/\S+ HTTP/')

    def count(self, pattern: str) -> int:
        log = self.workdir / f"{self.name}.out"
        if not log.exists():
            return 0
        line = re.compile(pattern)
        with log.open(errors="replace") as f:
            return sum(1 for entry in f if line.search(entry))

    def stored(self, digest: str) -> bool:
        algorithm, hex_ = digest.split(":", 1)
        return (
            self.storage
            / "docker/registry/v2/blobs"
            / algorithm
            / hex_[:2]
            / hex_
            / "data"
        ).exists()


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files)."""

    key: Path
    cert: Path

    def client_context(self) -> ssl.SSLContext:
        """A client's TLS settings: Python's defaults, trusting *cert*."""
        return ssl.create_default_context(cafile=str(self.cert))


def write_certificate(folder: Path) -> Certificate:
    """An ECDSA P-256 key and a certificate for 127.0.0.1, with ``openssl``."""
    folder.mkdir(parents=True, exist_ok=True)
    certificate = Certificate(folder / "key.pem", folder / "cert.pem")
    subprocess.run(
        [
            OPENSSL_BINARY,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=regmirror bench",
            "-addext",
            f"subjectAltName=IP:{LOCALHOST}",
            "-keyout",
            str(certificate.key),
            "-out",
            str(certificate.cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return certificate


class Mirror(Server):
    """
    ``twistd -n regmirror`` with one upstream and default settings; with a
    *tls* certificate, an ``ssl:`` listener on ``tls_port`` beside the
    plain one.
    """

    name = "regmirror"

    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        workers: int = 1,
        tls: Certificate | None = None,
        upstream_options: str = "",
    ) -> None:
        super().__init__(workdir)
        self.upstream_url = upstream_url
        #: more ``[upstream:origin]`` lines (``--segments``)
        self.upstream_options = upstream_options
        self.workers = workers
        self.tls = tls
        self.tls_port = free_port() if tls is not None else None

    def prepare(self) -> None:
        (self.workdir / "mirror.ini").write_text(self.config())

    def listen(self) -> str:
        plain = f"tcp:{self.port}:interface={LOCALHOST}"
        if self.tls is None:
            return plain
        return (
            f"{plain} ssl:{self.tls_port}:interface={LOCALHOST}"
            f":privateKey={self.tls.key}:certKey={self.tls.cert}"
        )

    def config(self) -> str:
        return f"""\
[server]
listen = {self.listen()}
workers = {self.workers}

[cache]
directory = cache

[upstream:origin]
url = {self.upstream_url}
{self.upstream_options}
[namespace:docker.io]
upstreams = origin
default = true
"""

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-c",
            _TWISTD,
            "--nodaemon",
            "--pidfile=",
            f"--logfile={self.workdir / 'twistd.log'}",
            "regmirror",
            "-c",
            str(self.workdir / "mirror.ini"),
        ]

    def stored(self, digest: str) -> bool:
        algorithm, hex_ = digest.split(":", 1)
        return (self.workdir / "cache/blobs" / algorithm / hex_[:2] / hex_).exists()


class Nginx(Server):
    """
    nginx serving one file at ``/blob`` with ``sendfile on``; with a *tls*
    certificate, also over TLS on ``tls_port`` (OpenSSL's defaults, no
    kernel TLS: the body is read into memory and encrypted there).
    """

    name = "nginx"

    def __init__(
        self,
        workdir: Path,
        blob: Path,
        tls: Certificate | None = None,
        workers: int | None = None,
    ) -> None:
        super().__init__(workdir)
        self.blob = blob
        self.tls = tls
        self.tls_port = free_port() if tls is not None else None
        self.workers = workers

    def ready_path(self) -> str:
        return "/ready"

    def prepare(self) -> None:
        temp = self.workdir / "temp"
        temp.mkdir(exist_ok=True)
        temps = "".join(
            f"  {kind}_temp_path {temp / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # As root the workers would drop to "nobody", who cannot read the
        # benchmark's private temporary folder.
        user = "user root;\n" if os.geteuid() == 0 else ""
        tls = ""
        if self.tls is not None:
            tls = (
                f"    listen {LOCALHOST}:{self.tls_port} ssl;\n"
                "    ssl_protocols TLSv1.2 TLSv1.3;\n"
                f"    ssl_certificate {self.tls.cert};\n"
                f"    ssl_certificate_key {self.tls.key};\n"
            )
        workers = self.workers or "auto"
        (self.workdir / "nginx.conf").write_text(
            f"""\
{user}worker_processes {workers};
daemon off;
pid {self.workdir / "nginx.pid"};
error_log {self.workdir / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
{temps}  server {{
    listen {LOCALHOST}:{self.port};
{tls}    location = /blob {{
      alias {self.blob};
      default_type application/octet-stream;
    }}
    location = /ready {{ return 200 "ok"; }}
  }}
}}
"""
        )

    def command(self) -> list[str]:
        return [
            NGINX_BINARY,
            "-p",
            str(self.workdir),
            "-e",
            str(self.workdir / "error.log"),
            "-c",
            str(self.workdir / "nginx.conf"),
        ]


class SlowLink(Server):
    """``relay.py``: every connection to the *target* port at *mib_s*."""

    name = "relay"

    def __init__(self, workdir: Path, target: int, mib_s: float) -> None:
        super().__init__(workdir)
        self.target = target
        self.mib_s = mib_s

    def command(self) -> list[str]:
        return [
            sys.executable,
            str(RELAY_SCRIPT),
            "--port",
            str(self.port),
            "--target",
            str(self.target),
            "--mib-s",
            str(self.mib_s),
        ]

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"


@contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- clients -------------------------------------------------------------------


@dataclass
class Transfer:
    """One client's GET of a blob."""

    status: int = 0
    length: int = 0
    received: int = 0
    #: from starting to connect to the first body byte
    ttfb: float | None = None
    #: from holding all but the last byte to holding the last one
    last_byte_wait: float | None = None
    elapsed: float = 0.0
    error: str | None = None
    #: over TLS: the protocol and cipher suite negotiated
    cipher: str | None = None


MAX_HEADER_READS = 64


def _parse_head(head: bytes) -> tuple[int, int]:
    """Status and ``Content-Length`` of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if "content-length" not in fields:
        raise BenchError(f"no Content-Length in the answer: {lines}")
    return status, int(fields["content-length"])


def get_blob(port: int, path: str, tls: ssl.SSLContext | None = None) -> Transfer:
    """
    GET *path* over a raw socket, receiving the body into one reusable
    buffer (``recv_into``: whatever has arrived, no copy) and discarding it;
    with *tls*, over TLS on that socket (Python's ``ssl``: each
    ``recv_into`` decrypts at most one TLS record, without the GIL).
    """
    transfer = Transfer()
    view = memoryview(bytearray(READ_BUFFER))
    started = time.perf_counter()
    try:
        with ExitStack() as stack:
            sock = stack.enter_context(
                socket.create_connection((LOCALHOST, port), timeout=SOCKET_TIMEOUT)
            )
            if tls is not None:
                sock = stack.enter_context(
                    tls.wrap_socket(sock, server_hostname=LOCALHOST)
                )
                version, cipher = sock.version(), sock.cipher()
                transfer.cipher = f"{version} {cipher[0] if cipher else '?'}"
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {LOCALHOST}:{port}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            head = b""
            for _ in range(MAX_HEADER_READS):
                n = sock.recv_into(view)
                if not n:
                    raise ConnectionError("closed before the end of the head")
                head += view[:n]
                if b"\r\n\r\n" in head:
                    break
            else:
                raise BenchError("no end of the response head")
            end = head.index(b"\r\n\r\n")
            transfer.status, transfer.length = _parse_head(head[:end])
            length = transfer.length
            received = len(head) - end - 4
            now = time.perf_counter()
            almost = now if received >= length - 1 else None
            if received:
                transfer.ttfb = now - started
            for _ in range(length + 1):
                if received >= length:
                    break
                n = sock.recv_into(view, min(READ_BUFFER, length - received))
                if not n:
                    break
                now = time.perf_counter()
                if transfer.ttfb is None:
                    transfer.ttfb = now - started
                received += n
                if almost is None and received >= length - 1:
                    almost = now
            transfer.received = received
            if almost is not None and received == length:
                transfer.last_byte_wait = now - almost
    except (OSError, ValueError, IndexError) as e:
        transfer.error = f"{type(e).__name__}: {e}"
    transfer.elapsed = time.perf_counter() - started
    return transfer


def concurrently(count: int, work: Callable[[], Any]) -> tuple[list[Any], float]:
    """
    Run *work* in *count* threads released together; their results and the
    wall time from the release to the last one's end.
    """
    results: list[Any] = [None] * count
    barrier = threading.Barrier(count + 1, timeout=30.0)

    def run(slot: int) -> None:
        barrier.wait()
        results[slot] = work()

    threads = [
        threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)
    ]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    deadline = time.monotonic() + CLIENTS_TIMEOUT
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    wall = time.perf_counter() - started
    if any(thread.is_alive() for thread in threads):
        raise BenchError(f"clients still running after {CLIENTS_TIMEOUT:.0f}s")
    return results, wall


def spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
    }


def blob_load(
    port: int | Sequence[int],
    path: str,
    clients: int,
    size: int,
    tls: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """
    *clients* GETs of *path* at once, spread in turn over the *port* (s);
    over TLS with *tls*.
    """
    ports = [port] if isinstance(port, int) else list(port)
    # next() of a count is atomic under the GIL: client i goes to ports[i % n].
    slots = itertools.count()
    transfers, wall = concurrently(
        clients, lambda: get_blob(ports[next(slots) % len(ports)], path, tls)
    )
    bad = [t for t in transfers if t.status != 200 or t.received != size or t.error]
    if bad:
        raise BenchError(f"{len(bad)} of {clients} transfers failed: {bad[0]}")
    extra: dict[str, Any] = {}
    if tls is not None:
        extra["ciphers"] = sorted({t.cipher for t in transfers if t.cipher})
    return extra | {
        "clients": clients,
        "wall_s": wall,
        "mib_s": clients * size / MIB / wall,
        "ttfb_ms": spread([t.ttfb * 1000 for t in transfers if t.ttfb is not None]),
        "last_byte_wait_ms": spread(
            [t.last_byte_wait * 1000 for t in transfers if t.last_byte_wait is not None]
        ),
    }


def manifest_load(
    port: int, path: str, total: int, clients: int
) -> dict[str, float | int]:
    """*total* GETs of *path* shared by *clients* threads on keep-alive connections."""
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    failures: list[str] = []

    def next_request() -> bool:
        nonlocal issued
        with lock:
            if issued >= total or len(failures) > 10:
                return False
            issued += 1
            return True

    def worker() -> None:
        connection = http.client.HTTPConnection(LOCALHOST, port, timeout=30.0)
        mine: list[float] = []
        try:
            for _ in range(total):
                if not next_request():
                    break
                started = time.perf_counter()
                try:
                    connection.request("GET", path, headers={"Accept": MANIFEST_ACCEPT})
                    response = connection.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException) as e:
                    connection.close()
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")
                    continue
                mine.append(time.perf_counter() - started)
                if response.status != 200:
                    with lock:
                        failures.append(f"status {response.status}")
        finally:
            connection.close()
            with lock:
                latencies.extend(mine)

    _, wall = concurrently(clients, worker)
    if failures:
        raise BenchError(f"{len(failures)} manifest GETs failed: {failures[0]}")
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "p50_ms": ordered[len(ordered) // 2] * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "rps": len(ordered) / wall,
    }


# -- phases --------------------------------------------------------------------


@dataclass
class Context:
    workdir: Path
    upstream: Registry
    image: Image
    manifest_requests: int
    manifest_clients: int
    #: runs of each measurement; the one with the median throughput is kept
    repeat: int
    #: regmirror's more ``[upstream:origin]`` lines (``--segments``)
    upstream_options: str = ""
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def blob_path(self) -> str:
        return f"/v2/{REPOSITORY}/blobs/{self.image.layer.digest}"

    @property
    def upstream_blob_file(self) -> Path:
        """The upstream's file of the layer, which nginx serves."""
        algorithm, hex_ = self.image.layer.digest.split(":", 1)
        return (
            self.upstream.storage
            / "docker/registry/v2/blobs"
            / algorithm
            / hex_[:2]
            / hex_
            / "data"
        )


Factory = Callable[[Path], "Mirror | Registry"]


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """
    The run whose *key* is the median (the lower middle one for an even
    count), with every run's *key* beside it and the highest peak RSS.
    """
    ordered = sorted(runs, key=lambda run: float(run[key]))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen[f"{key}_runs"] = [run[key] for run in runs]
    peaks = [run["peak_rss_mib"] for run in runs if run.get("peak_rss_mib")]
    if peaks:
        chosen["peak_rss_mib"] = max(peaks)
    return chosen


def cold(
    ctx: Context, system: str, make: Factory, clients: int, *, keep: bool
) -> dict[str, Any]:
    """
    Fresh process, empty cache, *clients* at once; upstream GETs counted.
    The cache folder is removed afterwards unless *keep*.
    """
    folder = ctx.workdir / f"{system}-cold-{clients}"
    shutil.rmtree(folder, ignore_errors=True)
    server = make(folder)
    digest = ctx.image.layer.digest
    with running(server):
        before = ctx.upstream.blob_gets(digest)
        result = blob_load(server.port, ctx.blob_path, clients, ctx.image.layer.size)
        # Every upstream GET has been answered in full once the blob is in
        # the store (the proxies' own copy ends last), so the count is final.
        wait_until(
            lambda: server.stored(digest),
            timeout=STORED_TIMEOUT,
            what=lambda: f"{system} never stored {digest}",
        )
        result["upstream_blob_gets"] = ctx.upstream.blob_gets(digest) - before
        result.update(server.usage())
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def warm(
    ctx: Context, server: Server, path: str, *, usage: bool = True
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with running(server):
        # One untimed read first: the cache hit path, and the page cache.
        get_blob(server.port, path)
        for clients in WARM_CLIENTS:
            runs = [
                blob_load(server.port, path, clients, ctx.image.layer.size)
                for _ in range(ctx.repeat)
            ]
            result[f"x{clients}"] = median_run(runs, "mib_s")
        if usage:
            result.update(server.usage())
    return result


def manifests(ctx: Context, server: Mirror | Registry) -> dict[str, Any]:
    by_tag = f"/v2/{REPOSITORY}/manifests/{TAG}"
    by_digest = f"/v2/{REPOSITORY}/manifests/{ctx.image.manifest_digest}"
    result: dict[str, Any] = {}
    with running(server):
        for path in (by_tag, by_digest):
            manifest_load(server.port, path, 1, 1)
        before = ctx.upstream.manifest_requests()
        for kind, path in (("by_tag", by_tag), ("by_digest", by_digest)):
            runs = [
                manifest_load(
                    server.port, path, ctx.manifest_requests, ctx.manifest_clients
                )
                for _ in range(ctx.repeat)
            ]
            result[kind] = median_run(runs, "rps")
        # Per run of both kinds: as if each had run once.
        result["upstream_manifest_requests"] = (
            ctx.upstream.manifest_requests() - before
        ) / ctx.repeat
        result.update(server.usage())
    return result


def bench_system(ctx: Context, system: str, make: Factory) -> None:
    print(f"  {system}: cold", end="", flush=True)
    results: dict[str, Any] = {}
    for clients in COLD_CLIENTS:
        runs = [
            cold(
                ctx,
                system,
                make,
                clients,
                keep=clients == max(COLD_CLIENTS) and run == ctx.repeat - 1,
            )
            for run in range(ctx.repeat)
        ]
        results[f"cold_x{clients}"] = median_run(runs, "mib_s")
        results[f"cold_x{clients}"]["upstream_blob_gets_runs"] = [
            run["upstream_blob_gets"] for run in runs
        ]
        print(f" x{clients}", end="", flush=True)
    # The warm and manifest phases reuse the cache of the last cold case,
    # each on a restarted process so that its peak RSS is its own.
    kept = ctx.workdir / f"{system}-cold-{max(COLD_CLIENTS)}"
    print(", warm", end="", flush=True)
    results["warm"] = warm(ctx, make(kept), ctx.blob_path)
    print(", manifests", flush=True)
    results["manifests"] = manifests(ctx, make(kept))
    shutil.rmtree(kept, ignore_errors=True)
    ctx.results[system] = results


def bench_upstream(ctx: Context) -> None:
    """
    One client of the blob straight from the upstream registry: what any
    cold client of a mirror or proxy could get at best on this machine.
    """
    print("  upstream: direct x1", flush=True)
    size = ctx.image.layer.size
    runs = [
        blob_load(ctx.upstream.port, ctx.blob_path, 1, size) for _ in range(ctx.repeat)
    ]
    ctx.results["upstream"] = {"cold_x1": median_run(runs, "mib_s")}


def bench_nginx(ctx: Context) -> None:
    print("  nginx: warm", flush=True)
    server = Nginx(ctx.workdir / "nginx", ctx.upstream_blob_file)
    # Its master's RSS says nothing about its workers: not recorded.
    ctx.results["nginx"] = {"warm": warm(ctx, server, "/blob", usage=False)}


# -- TLS -----------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """*pid* and its descendants (a mirror's workers, nginx's workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(pid) or 0.0 for pid in pids)


@dataclass
class TLSServer:
    """One server of the TLS section, started, and where it serves the blob."""

    system: str
    workers: int
    server: Server
    port: int
    path: str


def bench_tls(ctx: Context, skip: Collection[str], have_nginx: bool) -> None:
    """
    The warm blob over TLS with one certificate for all: regmirror's
    ``ssl:`` listener with ``workers`` 1 and 2 (each on a cache filled over
    its plain listener), nginx with ``worker_processes`` 1 and 2.  All four
    run at once, idle but for the one measured, and each number of clients
    takes them in turn, run after run, so that other work on the machine
    falls on every column and row alike.  Beside the MiB/s, the CPU seconds
    the server's processes spent per GiB sent (the clients' share of the
    cores does not blur it).
    """
    certificate = write_certificate(ctx.workdir / "tls")
    client = certificate.client_context()
    digest = ctx.image.layer.digest
    size = ctx.image.layer.size
    servers: list[TLSServer] = []
    with ExitStack() as stack:
        for workers in TLS_WORKERS:
            if "regmirror" not in skip:
                folder = ctx.workdir / f"regmirror-tls-{workers}"
                mirror = Mirror(folder, ctx.upstream.url, workers, tls=certificate)
                stack.enter_context(running(mirror))
                stack.callback(shutil.rmtree, folder, ignore_errors=True)
                get_blob(mirror.port, ctx.blob_path)
                wait_until(
                    lambda m=mirror: m.stored(digest),
                    timeout=STORED_TIMEOUT,
                    what=lambda: f"regmirror never stored {digest}",
                )
                assert mirror.tls_port is not None
                servers.append(
                    TLSServer(
                        "regmirror", workers, mirror, mirror.tls_port, ctx.blob_path
                    )
                )
            if "nginx" not in skip and have_nginx:
                nginx = Nginx(
                    ctx.workdir / f"nginx-tls-{workers}",
                    ctx.upstream_blob_file,
                    tls=certificate,
                    workers=workers,
                )
                stack.enter_context(running(nginx))
                assert nginx.tls_port is not None
                servers.append(
                    TLSServer("nginx", workers, nginx, nginx.tls_port, "/blob")
                )
        for tls in servers:
            # One untimed read first: the cache hit path, and the page cache.
            get_blob(tls.port, tls.path, client)
        print("  TLS: clients", end="", flush=True)
        for clients in TLS_CLIENTS:
            runs: dict[tuple[str, int], list[dict[str, Any]]] = {
                (t.system, t.workers): [] for t in servers
            }
            for _ in range(ctx.repeat):
                for tls in servers:
                    pids = process_tree(tls.server.pid)
                    before = tree_cpu_seconds(pids)
                    run = blob_load(tls.port, tls.path, clients, size, client)
                    spent = tree_cpu_seconds(pids) - before
                    run["server_cpu_s_per_gib"] = spent / (clients * size / 2**30)
                    runs[tls.system, tls.workers].append(run)
            for (system, workers), measured in runs.items():
                chosen = median_run(measured, "mib_s")
                cpu = [run["server_cpu_s_per_gib"] for run in measured]
                chosen["server_cpu_s_per_gib_runs"] = cpu
                chosen["server_cpu_s_per_gib_median"] = statistics.median(cpu)
                results = ctx.results.setdefault(system, {}).setdefault("tls", {})
                results.setdefault(f"workers_{workers}", {})[f"x{clients}"] = chosen
            print(f" {clients}", end="", flush=True)
        print(flush=True)


# -- a slow link to the upstream ------------------------------------------------


def skopeo_copy(port: int, destination: Path) -> float:
    """A cold ``skopeo copy`` of the layered image to a folder: its wall time."""
    started = time.perf_counter()
    result = subprocess.run(
        [
            SKOPEO_BINARY,
            "--insecure-policy",
            "copy",
            "--quiet",
            "--retry-times",
            "0",
            "--src-tls-verify=false",
            f"docker://{LOCALHOST}:{port}/{SLOW_REPOSITORY}:{TAG}",
            f"dir:{destination}",
        ],
        capture_output=True,
        text=True,
        timeout=CLIENTS_TIMEOUT,
        check=False,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise BenchError(f"skopeo copy failed: {result.stderr[-2000:]}")
    return wall


def docker_daemons_module() -> Any:
    """``tests/e2e/daemons.py``, which runs containerd and dockerd under one
    folder for the end-to-end tests (a plain module: no pytest)."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.e2e import daemons

    return daemons


def docker_pull(port: int) -> float:
    """
    A cold ``docker pull`` of the layered image by a fresh Docker daemon
    whose ``registry-mirrors`` is 127.0.0.1:*port* (its image store empty):
    the pull's wall time, the daemons' start and stop left out.
    """
    daemons = docker_daemons_module()
    # A short folder: the daemons' sockets must fit in sun_path.
    folder = Path(tempfile.mkdtemp(prefix="rm-bench-", dir="/tmp"))
    containerd = daemons.ContainerdProcess(folder / "ctd")
    containerd.start()
    try:
        dockerd = daemons.DockerdProcess(
            folder / "docker", containerd, f"{LOCALHOST}:{port}"
        )
        dockerd.start()
        try:
            started = time.perf_counter()
            dockerd.docker("pull", f"{SLOW_REPOSITORY}:{TAG}", timeout=CLIENTS_TIMEOUT)
            return time.perf_counter() - started
        finally:
            dockerd.stop()
    finally:
        containerd.stop()
        shutil.rmtree(folder, ignore_errors=True)


def slow_run(
    ctx: Context,
    system: str,
    make: Factory,
    blobs: Sequence[Blob],
    work: Callable[[Mirror | Registry], dict[str, Any]],
) -> dict[str, Any]:
    """
    One cold run through the slow link: a fresh process with an empty
    cache, *work*, then the upstream's GETs of *blobs* once all are stored.
    """
    folder = ctx.workdir / f"{system}-slow"
    shutil.rmtree(folder, ignore_errors=True)
    server = make(folder)
    with running(server):
        before = sum(ctx.upstream.blob_gets(b.digest) for b in blobs)
        result = work(server)
        wait_until(
            lambda: all(server.stored(b.digest) for b in blobs),
            timeout=STORED_TIMEOUT,
            what=lambda: f"{system} never stored every blob",
        )
        result["upstream_blob_gets"] = (
            sum(ctx.upstream.blob_gets(b.digest) for b in blobs) - before
        )
        result.update(server.usage())
    shutil.rmtree(folder, ignore_errors=True)
    return result


def bench_slow(ctx: Context, skip: Collection[str], mib_s: float) -> None:
    """
    Through ``relay.py`` at *mib_s* per upstream connection: a cold
    ``skopeo copy`` of the ``SLOW_LAYERS``-layer image, and one cold client
    of the big blob, for regmirror and the reference proxy.
    """
    image = make_layered_image(ctx.workdir / "layers")
    push_image(ctx.upstream.port, image, SLOW_REPOSITORY)
    for layer in image.layers:
        layer.path.unlink()
    link = SlowLink(ctx.workdir / "relay", ctx.upstream.port, mib_s)
    systems: list[tuple[str, Factory]] = [
        (
            "regmirror",
            lambda d: Mirror(d, link.url, upstream_options=ctx.upstream_options),
        ),
        ("proxy", lambda d: Registry(d, d / "storage", remote=link.url)),
    ]
    size = ctx.image.layer.size
    with running(link):
        for system, make in systems:
            if system in skip:
                continue
            print(f"  {system}: slow link, skopeo", end="", flush=True)

            def copy(server: Mirror | Registry, system: str = system) -> dict[str, Any]:
                destination = ctx.workdir / f"{system}-copied"
                shutil.rmtree(destination, ignore_errors=True)
                try:
                    return {"wall_s": skopeo_copy(server.port, destination)}
                finally:
                    shutil.rmtree(destination, ignore_errors=True)

            def one_client(server: Mirror | Registry) -> dict[str, Any]:
                return blob_load(server.port, ctx.blob_path, 1, size)

            def pull(server: Mirror | Registry) -> dict[str, Any]:
                return {"wall_s": docker_pull(server.port)}

            results: dict[str, Any] = {}
            runs = [
                slow_run(ctx, system, make, image.layers, copy)
                for _ in range(ctx.repeat)
            ]
            results["skopeo"] = median_run(runs, "wall_s")
            results["skopeo"]["upstream_blob_gets_runs"] = [
                run["upstream_blob_gets"] for run in runs
            ]
            if not docker_daemons_module().missing_tools():
                print(", docker pull", end="", flush=True)
                runs = [
                    slow_run(ctx, system, make, image.layers, pull)
                    for _ in range(ctx.repeat)
                ]
                results["docker"] = median_run(runs, "wall_s")
                results["docker"]["upstream_blob_gets_runs"] = [
                    run["upstream_blob_gets"] for run in runs
                ]
            print(", blob x1", flush=True)
            runs = [
                slow_run(ctx, system, make, [ctx.image.layer], one_client)
                for _ in range(ctx.repeat)
            ]
            results["blob_x1"] = median_run(runs, "mib_s")
            results["blob_x1"]["upstream_blob_gets_runs"] = [
                run["upstream_blob_gets"] for run in runs
            ]
            ctx.results.setdefault(system, {})["slow"] = results


# -- the cluster ---------------------------------------------------------------

CLUSTER_NODES = 3
CLUSTER_COLD_CLIENTS = 32
CLUSTER_WARM_CLIENTS = 8
#: the key prefix of regmirror's cluster state in Redis
REDIS_PREFIX = "regmirror:"
#: what the bench's buckets may hold in the RGW's memory store, at least
MEMSTORE_MIN = 2 << 30


def cluster_engines_module() -> Any:
    """
    ``tests/e2e/engines.py``, which starts ``redis-server`` and Ceph RGW for
    the end-to-end tests (a plain module: no pytest).
    """
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.e2e import engines

    return engines


def rgw_missing(engines: Any) -> str | None:
    """Why there is no Ceph RGW to use here, or ``None``."""
    if getattr(engines, "CephRGW", None) is None:
        return "tests/e2e/engines.py has no CephRGW"
    missing = [
        binary
        for binary in getattr(engines, "ENGINE_BINARIES", ())
        if not os.access(binary, os.X_OK)
    ]
    return f"{', '.join(missing)} not installed" if missing else None


@dataclass(frozen=True)
class Bucket:
    """Where the nodes of ``[cache] backend = s3`` keep the shared blobs."""

    endpoint: str
    name: str
    region: str
    access_key: str
    secret_key: str


_DOWNLOAD = re.compile(
    r"\b(downloading|resuming) (sha256:[0-9a-f]{64}) .*?\bfrom (.+?)(?: \(.*\))?$"
)


class ClusterNode(Mirror):
    """
    A regmirror node of a cluster: ``[cluster]`` with the shared Redis,
    advertising its own URL; ``[cache] backend = s3`` when given a bucket.
    """

    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        workers: int,
        redis_url: str,
        bucket: Bucket | None,
    ) -> None:
        super().__init__(workdir, upstream_url, workers)
        self.redis_url = redis_url
        self.bucket = bucket
        self._log_start = 0

    def config(self) -> str:
        text = super().config()
        if self.bucket is not None:
            b = self.bucket
            text = text.replace(
                "[cache]\ndirectory = cache\n",
                "[cache]\ndirectory = cache\nbackend = s3\n"
                f"s3_endpoint = {b.endpoint}\ns3_bucket = {b.name}\n"
                f"s3_region = {b.region}\ns3_access_key = {b.access_key}\n"
                f"s3_secret_key = {b.secret_key}\n",
            )
        return text + (
            f"\n[cluster]\nredis = {self.redis_url}\n"
            f"advertise = http://{LOCALHOST}:{self.port}\n"
        )

    def start(self) -> None:
        log = self.workdir / "twistd.log"
        self._log_start = log.stat().st_size if log.exists() else 0
        super().start()

    def sources(self, digest: str) -> list[str]:
        """
        Where this run of the node took *digest* from, in order, from its
        log: ``origin`` (the upstream), ``node`` (another node's download),
        ``bucket`` (the shared store); ``+resume`` for a resumption.
        """
        found = []
        with (self.workdir / "twistd.log").open(errors="replace") as f:
            f.seek(self._log_start)
            for line in f:
                match = _DOWNLOAD.search(line.rstrip("\n"))
                if match is None or match.group(2) != digest:
                    continue
                source = match.group(3)
                kind = (
                    "node"
                    if source.startswith("node ")
                    else "bucket"
                    if source == "shared store"
                    else source
                )
                found.append(kind + ("+resume" if match.group(1) == "resuming" else ""))
        return found


@contextmanager
def running_all(servers: Sequence[Server]) -> Iterator[Sequence[Server]]:
    """Start every server in turn; stop every one started, whatever happens."""
    with ExitStack() as stack:
        for server in servers:
            stack.enter_context(running(server))
        yield servers


@dataclass
class Cluster:
    """The engines three nodes share and how to make the nodes."""

    ctx: Context
    workers: int
    redis: Any
    rgw: Any | None
    buckets: int = 0

    def new_bucket(self) -> Bucket | None:
        if self.rgw is None:
            return None
        self.buckets += 1
        rgw = self.rgw
        name = rgw.make_bucket(f"regmirror-bench-{self.buckets}")
        # RGW answers the first request of a new bucket ~250 ms late (a
        # bucket in use does not): one first, so that the nodes do not.
        rgw.request("GET", f"/{name}/regmirror-bench-warm-up")
        return Bucket(rgw.endpoint, name, rgw.region, rgw.access_key, rgw.secret_key)

    def nodes(self, folder: Path, bucket: Bucket | None) -> list[ClusterNode]:
        return [
            ClusterNode(
                folder / f"node{i}",
                self.ctx.upstream.url,
                self.workers,
                self.redis.url,
                bucket,
            )
            for i in range(1, CLUSTER_NODES + 1)
        ]

    def settled(self, digest: str, bucket: Bucket | None) -> bool:
        """
        Nobody holds *digest*'s lease any more and, with a bucket, the blob
        is in the bucket's index: the lease holder is done with it.
        """
        if self.redis.command("EXISTS", f"{REDIS_PREFIX}lease:{digest}") != 0:
            return False
        return bucket is None or (
            self.redis.command("HEXISTS", f"{REDIS_PREFIX}store:size", digest) == 1
        )


def cluster_usage(nodes: Sequence[ClusterNode]) -> dict[str, Any]:
    """Each node's peak RSS and CPU seconds; the highest RSS, the CPU total."""
    each = [node.usage() for node in nodes]
    peaks = [u["peak_rss_mib"] for u in each if u["peak_rss_mib"] is not None]
    cpus = [u["cpu_s"] for u in each if u["cpu_s"] is not None]
    return {
        "nodes": each,
        "peak_rss_mib": max(peaks) if peaks else None,
        "cpu_s": round(sum(cpus), 2) if cpus else None,
    }


def cluster_phase(
    cl: Cluster,
    folder: Path,
    bucket: Bucket | None,
    clients: int,
    *,
    expect: str,
) -> dict[str, Any]:
    """
    Three nodes on *folder* (fresh, or as left), *clients* at once spread
    over them; once every node holds the blob and the holder is done,
    the upstream GETs of the blob and where each node took it from.
    """
    ctx = cl.ctx
    digest = ctx.image.layer.digest
    nodes = cl.nodes(folder, bucket)
    with running_all(nodes):
        before = ctx.upstream.blob_gets(digest)
        result = blob_load(
            [n.port for n in nodes], ctx.blob_path, clients, ctx.image.layer.size
        )
        wait_until(
            lambda: all(n.stored(digest) for n in nodes) and cl.settled(digest, bucket),
            timeout=STORED_TIMEOUT,
            what=lambda: f"the nodes never all stored {digest} (or the lease stayed)",
        )
        result["upstream_blob_gets"] = ctx.upstream.blob_gets(digest) - before
        result["sources"] = [n.sources(digest) for n in nodes]
        result.update(cluster_usage(nodes))
    odd = odd_sources(result["sources"], expect)
    if odd:
        print(f"\n  ! cluster: {odd}", end="", flush=True)
        result["odd"] = odd
    return result


def odd_sources(sources: list[list[str]], expect: str) -> str | None:
    """
    What is unexpected in where the nodes took the blob: *expect* ``cold``
    (one node from the origin, the others from it), ``bucket`` (every node
    from the bucket) or ``local`` (nothing taken at all).
    """
    flat = [s for node in sources for s in node]
    if expect == "cold":
        fine = sorted(flat) == sorted(["origin"] + ["node"] * (len(sources) - 1))
    elif expect == "bucket":
        fine = flat == ["bucket"] * len(sources)
    else:
        fine = not flat
    if fine:
        return None
    return f"expected {expect} sources, the nodes' logs say {sources}"


def bench_cluster(ctx: Context, workers: int) -> None:
    """
    Three nodes sharing a Redis (and an RGW bucket, when Ceph is here):

    - cold: 32 clients over the three nodes, everything fresh each run
      (Redis flushed, a new bucket, empty caches);
    - from the bucket (with RGW): three new nodes with empty caches,
      8 clients, the blob now only in the last cold run's bucket;
    - warm: the nodes restarted on the caches they filled, 8 clients.
    """
    engines = cluster_engines_module()
    if not os.access(engines.REDIS_BINARY, os.X_OK):
        print(f"  cluster: {engines.REDIS_BINARY} not installed, skipped")
        return
    no_rgw = rgw_missing(engines)
    print(
        "  cluster (Redis"
        + (f"; no bucket: {no_rgw})" if no_rgw else " + Ceph RGW)")
        + ": cold",
        end="",
        flush=True,
    )
    started = time.monotonic()
    results: dict[str, Any] = {
        "nodes": CLUSTER_NODES,
        "backend": "filesystem" if no_rgw else "s3",
        "no_bucket_why": no_rgw,
    }
    folders: list[Path] = []
    with ExitStack() as stack:
        redis = engines.RedisServer(ctx.workdir / "redis")
        stack.callback(redis.stop)
        redis.start()
        rgw = None
        if no_rgw is None:
            # Each cold run has its own bucket; all of them stay in memory.
            need = (ctx.repeat + 1) * ctx.image.layer.size + (512 << 20)
            rgw = engines.CephRGW(
                ctx.workdir / "rgw", memstore_bytes=max(MEMSTORE_MIN, need)
            )
            stack.callback(rgw.stop)
            rgw.start()
        results["versions"] = {
            "redis-server": tool_version([engines.REDIS_BINARY, "--version"]),
            "radosgw": None
            if rgw is None
            else tool_version([engines.RADOSGW_BINARY, "--version"]),
        }
        cl = Cluster(ctx, workers, redis, rgw)

        def fresh(name: str) -> Path:
            folder = ctx.workdir / name
            shutil.rmtree(folder, ignore_errors=True)
            folders.append(folder)
            return folder

        try:
            runs = []
            bucket = None
            kept = None
            for run in range(ctx.repeat):
                redis.flushall()
                bucket = cl.new_bucket()
                if kept is not None:
                    drop_caches(kept)
                kept = fresh(f"cluster-cold-{run}")
                runs.append(
                    cluster_phase(cl, kept, bucket, CLUSTER_COLD_CLIENTS, expect="cold")
                )
            phase = f"cold_x{CLUSTER_COLD_CLIENTS}"
            results[phase] = median_run(runs, "mib_s")
            results[phase]["upstream_blob_gets_runs"] = [
                r["upstream_blob_gets"] for r in runs
            ]
            results[phase]["sources_runs"] = [r["sources"] for r in runs]
            cold_gets = runs[-1]["upstream_blob_gets"]
            assert kept is not None
            if rgw is not None:
                print(", from the bucket", end="", flush=True)
                runs = []
                for run in range(ctx.repeat):
                    drop_caches(kept)
                    kept = fresh(f"cluster-bucket-{run}")
                    runs.append(
                        cluster_phase(
                            cl, kept, bucket, CLUSTER_WARM_CLIENTS, expect="bucket"
                        )
                    )
                results["bucket"] = median_run(runs, "mib_s")
                results["bucket"]["upstream_blob_gets_runs"] = [
                    r["upstream_blob_gets"] for r in runs
                ]
                results["bucket"]["sources_runs"] = [r["sources"] for r in runs]
                # Since the last cold run began: its bucket has served since.
                results["bucket"]["upstream_blob_gets_in_all"] = cold_gets + sum(
                    r["upstream_blob_gets"] for r in runs
                )
            print(", warm", flush=True)
            results["warm"] = cluster_warm(cl, kept, bucket)
        finally:
            # The caches go, the nodes' logs stay (with --workdir).
            for folder in folders:
                drop_caches(folder)
    results["runtime_s"] = round(time.monotonic() - started, 1)
    ctx.results["cluster"] = results


def drop_caches(folder: Path) -> None:
    """Remove the nodes' caches under *folder*, not their logs."""
    for cache in folder.glob("node*/cache"):
        shutil.rmtree(cache, ignore_errors=True)


def cluster_warm(cl: Cluster, folder: Path, bucket: Bucket | None) -> dict[str, Any]:
    """The nodes restarted on the caches they filled: *clients* over them."""
    ctx = cl.ctx
    digest = ctx.image.layer.digest
    nodes = cl.nodes(folder, bucket)
    result: dict[str, Any] = {}
    with running_all(nodes):
        ports = [n.port for n in nodes]
        before = ctx.upstream.blob_gets(digest)
        # One untimed read from each node first: the hit path, the page cache.
        for port in ports:
            get_blob(port, ctx.blob_path)
        runs = [
            blob_load(ports, ctx.blob_path, CLUSTER_WARM_CLIENTS, ctx.image.layer.size)
            for _ in range(ctx.repeat)
        ]
        result[f"x{CLUSTER_WARM_CLIENTS}"] = median_run(runs, "mib_s")
        result["upstream_blob_gets"] = ctx.upstream.blob_gets(digest) - before
        result["sources"] = [n.sources(digest) for n in nodes]
        result.update(cluster_usage(nodes))
    odd = odd_sources(result["sources"], "local")
    if odd:
        print(f"  ! cluster: {odd}", flush=True)
        result["odd"] = odd
    return result


# -- the table -----------------------------------------------------------------

COLUMNS = ("regmirror", "cluster", "proxy", "upstream", "nginx")
HEADINGS = (
    "regmirror",
    "regmirror, 3 nodes",
    "reference proxy",
    "upstream, direct",
    "nginx",
)


def columns(
    results: dict[str, Any], skip: Collection[str] = ()
) -> list[tuple[str, str]]:
    """
    The table's systems and headings: not those left out with ``--skip``,
    the cluster's and the upstream's only if they ran.
    """
    return [
        (system, heading)
        for system, heading in zip(COLUMNS, HEADINGS, strict=True)
        if system not in skip
        and (system not in ("cluster", "upstream") or system in results)
    ]


def _get(results: dict[str, Any], system: str, *keys: str) -> Any:
    value: Any = results.get(system)
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def table_rows(
    results: dict[str, Any],
    skip: Collection[str] = (),
    sections: Collection[str] = SECTIONS,
) -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = []
    systems = [system for system, _ in columns(results, skip)]
    cluster = "cluster" in systems

    def row(label: str, cell: Callable[[str], str]) -> None:
        rows.append((label, [cell(system) for system in systems]))

    def number(*keys: str, digits: int = 0) -> Callable[[str], str]:
        def cell(system: str) -> str:
            return _num(_get(results, system, *keys), digits)

        return cell

    if "main" in sections:
        for clients in COLD_CLIENTS:
            phase = f"cold_x{clients}"
            row(
                f"cold x{clients}: wall s",
                number(phase, "wall_s", digits=2),
            )
            row(
                f"cold x{clients}: MiB/s (aggregate)",
                number(phase, "mib_s"),
            )

            def ttfb(s: str, p: str = phase) -> str:
                t = _get(results, s, p, "ttfb_ms")
                if t is None:
                    return "–"
                return f"{t['min']:.0f} / {t['median']:.0f} / {t['max']:.0f}"

            row(f"cold x{clients}: TTFB ms min/med/max", ttfb)

            def last_byte(s: str, p: str = phase) -> str:
                t = _get(results, s, p, "last_byte_wait_ms")
                return "–" if t is None else f"{t['median']:.0f}"

            row(f"cold x{clients}: last-byte wait ms (median)", last_byte)

            def gets(s: str, p: str = phase) -> str:
                # Every run's count, if they differ.
                counts = _get(results, s, p, "upstream_blob_gets_runs")
                if not counts:
                    return "–"
                return " / ".join(str(c) for c in sorted(set(counts)))

            row(f"cold x{clients}: upstream GETs of the blob", gets)
        if cluster:
            bucket = f"from the bucket x{CLUSTER_WARM_CLIENTS}"

            row(f"{bucket}: wall s", number("bucket", "wall_s", digits=2))
            row(f"{bucket}: MiB/s (aggregate)", number("bucket", "mib_s"))

            def bucket_ttfb(s: str) -> str:
                t = _get(results, s, "bucket", "ttfb_ms")
                if t is None:
                    return "–"
                return f"{t['min']:.0f} / {t['median']:.0f} / {t['max']:.0f}"

            row(f"{bucket}: TTFB ms min/med/max", bucket_ttfb)
            row(
                f"{bucket}: upstream GETs of the blob in all",
                number("bucket", "upstream_blob_gets_in_all"),
            )
        for clients in WARM_CLIENTS:
            row(
                f"warm x{clients}: MiB/s (aggregate)",
                number("warm", f"x{clients}", "mib_s"),
            )
        for kind, label in (("by_tag", "by tag"), ("by_digest", "by digest")):

            def latency(s: str, k: str = kind) -> str:
                m = _get(results, s, "manifests", k)
                if m is None:
                    return "–"
                return f"{m['p50_ms']:.1f} / {m['p99_ms']:.1f}"

            row(f"manifest {label}: p50 / p99 ms", latency)
            row(
                f"manifest {label}: requests/s",
                number("manifests", kind, "rps"),
            )
        row(
            "manifests: upstream requests per run",
            number("manifests", "upstream_manifest_requests"),
        )
        phases = [f"cold_x{c}" for c in COLD_CLIENTS] + ["warm", "manifests"]
        names = "/".join(p.replace("cold_", "c") for p in phases)

        def per_phase(key: str, digits: int) -> Callable[[str], str]:
            def cell(s: str) -> str:
                values = [_get(results, s, p, key) for p in phases]
                if all(v is None for v in values):
                    return "–"
                return " / ".join(_num(v, digits) for v in values)

            return cell

        row(f"peak RSS MiB ({names})", per_phase("peak_rss_mib", 0))
        row(f"CPU s ({names})", per_phase("cpu_s", 1))
    if cluster:
        cluster_phases = [f"cold_x{CLUSTER_COLD_CLIENTS}", "bucket", "warm"]

        def per_node(s: str) -> str:
            if s != "cluster":
                return "–"
            cells = []
            for p in cluster_phases:
                nodes = _get(results, s, p, "nodes")
                cells.append(
                    "–"
                    if not nodes
                    else ", ".join(_num(n["peak_rss_mib"]) for n in nodes)
                )
            return " / ".join(cells)

        row("3 nodes: peak RSS MiB per node (cx32/bucket/warm)", per_node)

        def sources(s: str) -> str:
            if s != "cluster":
                return "–"
            cells = []
            for p in cluster_phases[:2]:
                nodes = _get(results, s, p, "sources")
                cells.append(
                    "–"
                    if nodes is None
                    else ", ".join("+".join(n) or "none" for n in nodes)
                )
            return " / ".join(cells)

        row("3 nodes: where each took the blob (cx32/bucket)", sources)
    if "tls" in sections:
        for workers in TLS_WORKERS:
            for clients in TLS_CLIENTS:
                where = ("tls", f"workers_{workers}", f"x{clients}")
                row(
                    f"TLS warm x{clients}, workers {workers}: MiB/s",
                    number(*where, "mib_s"),
                )
                row(
                    f"TLS warm x{clients}, workers {workers}: server CPU s/GiB",
                    number(*where, "server_cpu_s_per_gib_median", digits=2),
                )

        def ciphers(s: str) -> str:
            found = {
                cipher
                for workers in TLS_WORKERS
                for clients in TLS_CLIENTS
                for cipher in _get(
                    results, s, "tls", f"workers_{workers}", f"x{clients}", "ciphers"
                )
                or ()
            }
            return ", ".join(sorted(found)) or "–"

        row("TLS: negotiated", ciphers)
    if "slow" in sections:
        slow = "slow link"
        row(
            f"{slow}: skopeo copy, {SLOW_LAYERS} layers, wall s",
            number("slow", "skopeo", "wall_s", digits=2),
        )

        def slow_gets(s: str, p: str) -> str:
            counts = _get(results, s, "slow", p, "upstream_blob_gets_runs")
            if not counts:
                return "–"
            return " / ".join(str(c) for c in sorted(set(counts)))

        row(
            f"{slow}: skopeo copy, upstream GETs of the layers",
            lambda s: slow_gets(s, "skopeo"),
        )
        row(
            f"{slow}: docker pull (registry-mirrors), wall s",
            number("slow", "docker", "wall_s", digits=2),
        )
        row(
            f"{slow}: docker pull, upstream GETs of the layers",
            lambda s: slow_gets(s, "docker"),
        )
        row(f"{slow}: cold x1: MiB/s", number("slow", "blob_x1", "mib_s"))
        row(f"{slow}: cold x1: wall s", number("slow", "blob_x1", "wall_s", digits=2))
        row(
            f"{slow}: cold x1: upstream GETs of the blob",
            lambda s: slow_gets(s, "blob_x1"),
        )
    return rows


def render_table(
    results: dict[str, Any],
    skip: Collection[str] = (),
    sections: Collection[str] = SECTIONS,
) -> str:
    """The results as a reStructuredText simple table."""
    rows = table_rows(results, skip, sections)
    header = ["metric", *(heading for _, heading in columns(results, skip))]
    body = [[label, *cells] for label, cells in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) for c, w in zip(cells, widths, strict=True)
        ).rstrip()

    return "\n".join([rule, line(header), rule, *(line(r) for r in body), rule])


# -- main ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark regmirror against docker-registry's proxy and nginx."
    )
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument(
        "--out",
        type=Path,
        help="where the JSON goes (default benchmarks/results.json, or "
        "benchmarks/results-SECTION.json for --only SECTION)",
    )
    parser.add_argument("--manifest-requests", type=int, default=2000)
    parser.add_argument("--manifest-clients", type=int, default=16)
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each measurement, the median one is reported (default 3)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep everything here (default: a temp dir)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="regmirror's [server] workers"
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="also three regmirror nodes sharing Redis and a Ceph RGW bucket",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("regmirror", "proxy", "upstream", "nginx"),
        help="leave a system out (repeatable)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        choices=SECTIONS,
        help="run only this section (repeatable; default: all): main (cold, "
        "warm, manifests), tls (the warm blob over TLS, workers 1 and 2), "
        "slow (cold pulls through a slow link to the upstream)",
    )
    parser.add_argument(
        "--slow-mib-s",
        type=float,
        default=SLOW_MIB_S,
        help=f"the slow link's rate per connection (default {SLOW_MIB_S:g})",
    )
    parser.add_argument(
        "--segments",
        type=int,
        default=None,
        help="regmirror's [upstream:origin] segments in the main and slow "
        "sections (default: not set, 1)",
    )
    parser.add_argument(
        "--segment-min-size",
        default=None,
        help="regmirror's [upstream:origin] segment_min_size in the main and "
        "slow sections",
    )
    options = parser.parse_args(argv)
    sections = [s for s in SECTIONS if s in options.only] if options.only else SECTIONS
    if options.out is None:
        # A run of some sections leaves the full run's results alone.
        suffix = "" if list(sections) == list(SECTIONS) else "-" + "-".join(sections)
        options.out = Path(f"benchmarks/results{suffix}.json")
    needed = [REGISTRY_BINARY]
    if "tls" in sections:
        needed.append(OPENSSL_BINARY)
    if "slow" in sections:
        needed.append(SKOPEO_BINARY)
    for binary in needed:
        if not os.access(binary, os.X_OK):
            parser.error(f"{binary} is not installed")
    have_nginx = os.access(NGINX_BINARY, os.X_OK)

    started = time.monotonic()
    load_before = os.getloadavg()
    busy_before = machine_busy_seconds() - own_busy_seconds()
    if options.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="regmirror-bench-"))
    else:
        workdir = options.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    upstream = Registry(workdir / "upstream", workdir / "upstream" / "storage")
    try:
        print(f"generating a {options.size_mib} MiB layer in {workdir}", flush=True)
        image = make_image(workdir, options.size_mib * MIB)
        with running(upstream):
            push_image(upstream.port, image)
            image.layer.path.unlink()
            ctx = Context(
                workdir,
                upstream,
                image,
                options.manifest_requests,
                options.manifest_clients,
                options.repeat,
                upstream_options="".join(
                    f"{key} = {value}\n"
                    for key, value in (
                        ("segments", options.segments),
                        ("segment_min_size", options.segment_min_size),
                    )
                    if value is not None
                ),
            )
            print("benchmarking", flush=True)
            if "main" in sections:
                if "regmirror" not in options.skip:
                    bench_system(
                        ctx,
                        "regmirror",
                        lambda d: Mirror(
                            d,
                            upstream.url,
                            options.workers,
                            upstream_options=ctx.upstream_options,
                        ),
                    )
                if options.cluster:
                    bench_cluster(ctx, options.workers)
                if "proxy" not in options.skip:
                    bench_system(
                        ctx,
                        "proxy",
                        lambda d: Registry(d, d / "storage", remote=upstream.url),
                    )
                if "upstream" not in options.skip:
                    bench_upstream(ctx)
                if "nginx" in options.skip:
                    pass
                elif have_nginx:
                    bench_nginx(ctx)
                else:
                    print(f"  nginx: {NGINX_BINARY} not installed, skipped")
            if "tls" in sections:
                bench_tls(ctx, options.skip, have_nginx)
            if "slow" in sections:
                bench_slow(ctx, options.skip, options.slow_mib_s)
    finally:
        upstream.stop()
        if options.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    # Every server has been stopped and reaped: what is left is other work.
    other_cpu = machine_busy_seconds() - own_busy_seconds() - busy_before
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": {
            "docker-registry": tool_version([REGISTRY_BINARY, "--version"]),
            "nginx": tool_version([NGINX_BINARY, "-v"]) if have_nginx else None,
        },
        "layer": asdict(image.layer) | {"path": None},
        "size_mib": options.size_mib,
        "manifest_requests": options.manifest_requests,
        "manifest_clients": options.manifest_clients,
        "repeat": options.repeat,
        "sections": list(sections),
        "slow_mib_s": options.slow_mib_s if "slow" in sections else None,
        "segments": options.segments,
        "segment_min_size": options.segment_min_size,
        "runtime_s": round(time.monotonic() - started, 1),
        # Other work on the machine skews everything: say how much there was.
        "other_cpu_s": round(other_cpu, 1),
        "loadavg_1min": {
            "before": load_before[0],
            "after": os.getloadavg()[0],
        },
        "results": ctx.results,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    m = report["machine"]
    print()
    print(
        f"{report['date']}, {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, "
        f"{options.size_mib} MiB layer, {report['runtime_s']} s, "
        f"{other_cpu:.1f} CPU-s of other work on the machine meanwhile"
    )
    print(render_table(ctx.results, options.skip, sections))
    print(
        f"Each figure: the run with the median throughput of {options.repeat}; "
        "peak RSS: the highest of them."
    )
    print(f"\nwritten to {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
