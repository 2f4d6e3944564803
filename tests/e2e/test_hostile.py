"""
The hostile-input and fault campaign, end to end.

1. Bad client input, over raw sockets (no library normalises anything):
   path traversal in every part of a path, names, tags and digests that
   break the grammar, ``Range`` headers, ``Host`` values that are no
   ``host[:port]``, oversized request heads, request smuggling, request
   bodies, slowloris connections and thousands of idle keep-alive
   connections.  Each gets the right status, an OCI error body
   where the mirror answers, leaves the cache unchanged, and the mirror
   goes on serving.  These share one mirror in front of a real
   ``docker-registry`` (the ``target`` fixture), with a slowloris observer
   running beside them the whole time.
2. Misbehaving upstreams (``programs/hostile_upstream.py``): oversize and
   endless manifests, over-long, endless, short and corrupt blob bodies,
   redirect loops, redirects to other schemes and to cloud metadata
   addresses (through a proxy that refuses anything but 127.0.0.1, so that
   nothing ever leaves loopback even if the mirror's deny list failed), a
   gzip bomb, and manifests that lie about their media type.
3. Faults: the upstream ``docker-registry`` killed with SIGKILL while a
   40 MiB blob streams (through a throttling relay, so the kill lands
   mid-transfer), and a cached file corrupted on disk.

Every loop is bounded in count and time; every process is stopped.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    free_port,
    http_request,
    mirror_config,
    mirror_config_upstreams,
    poll_until,
)
from .images import (
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    Blob,
    Catalog,
    Image,
    canonical_json,
    sha256_digest,
)
from .servers import ConnectProxy, ProgramProcess, ThrottleRelay

pytestmark = pytest.mark.e2e

StartMirror = Callable[..., MirrorProcess]
StartProgram = Callable[[Any], Any]

#: How long any single exchange with the mirror may take before it counts
#: as a hang.
ANSWER_TIMEOUT = 5.0
#: The error codes of the OCI distribution spec, plus the mirror's own
#: ``TAG_INVALID`` and ``NOT_FOUND`` (README, "Errors").
OCI_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
        "UNAVAILABLE",
        "RANGE_INVALID",
        "PAGINATION_NUMBER_INVALID",
        "TAG_INVALID",
        "NOT_FOUND",
        "UNKNOWN",
    }
)


# -- raw HTTP -------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One HTTP response parsed from raw bytes."""

    status: int | None
    headers: dict[str, str]
    body: bytes

    def error_codes(self) -> list[str] | None:
        """The codes of an OCI error body, or ``None`` if it is not one."""
        try:
            document = json.loads(self.body)
            codes = [str(entry["code"]) for entry in document["errors"]]
        except (ValueError, KeyError, TypeError):
            return None
        return codes if codes and all(c in OCI_CODES for c in codes) else None


@dataclass(frozen=True)
class Exchange:
    """What came back on one connection: answers in order, and how it ended."""

    answers: list[Answer]
    #: the server closed the connection (rather than the client timing out)
    closed: bool
    elapsed: float
    raw: bytes

    @property
    def first(self) -> Answer | None:
        return self.answers[0] if self.answers else None

    def describe(self) -> str:
        return (
            f"{len(self.answers)} answer(s) in {self.elapsed:.2f}s, "
            f"{'closed' if self.closed else 'left open'}: {self.raw[:300]!r}"
        )


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    body = b""
    for _ in range(100_000):
        line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return body, b""
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            _, _, after = rest.partition(b"\r\n")
            return body, after
        body += rest[:size]
        data = rest[size + 2 :]
    return body, data


def parse_answers(raw: bytes, *, head: bool = False) -> list[Answer]:
    """Every response in *raw*, in order (Content-Length, chunked or to EOF)."""
    answers = []
    rest = raw
    for _ in range(100):
        if not rest:
            break
        end = rest.find(b"\r\n\r\n")
        if end < 0:
            answers.append(Answer(None, {}, rest))
            break
        lines = rest[:end].decode("latin-1").split("\r\n")
        words = lines[0].split(" ", 2)
        status = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = rest[end + 4 :]
        if head or status in (204, 304):
            body = b""
        elif "content-length" in headers and headers["content-length"].isdigit():
            length = int(headers["content-length"])
            body, rest = rest[:length], rest[length:]
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body, rest = _dechunk(rest)
        else:
            body, rest = rest, b""
        answers.append(Answer(status, headers, body))
    return answers


def exchange(
    port: int,
    data: bytes,
    *,
    timeout: float = ANSWER_TIMEOUT,
    head: bool = False,
    limit: int = 64 << 20,
) -> Exchange:
    """
    Send *data* as is and read until the server closes the connection, at
    most *timeout* seconds and *limit* bytes.
    """
    started = time.monotonic()
    raw = bytearray()
    closed = False
    with socket.create_connection((LOCALHOST, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server gave up on the request first; read its answer
        deadline = started + timeout
        for _ in range(100_000):
            left = deadline - time.monotonic()
            if left <= 0 or len(raw) > limit:
                break
            sock.settimeout(left)
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            raw += chunk
    return Exchange(
        parse_answers(bytes(raw), head=head),
        closed,
        time.monotonic() - started,
        bytes(raw),
    )


def get(path: bytes, *headers: bytes, method: bytes = b"GET") -> bytes:
    """A raw request for *path* that asks the server to close afterwards."""
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: mirror.test", *headers]
    return b"\r\n".join([*lines, b"Connection: close", b"", b""])


def read_response(sock: socket.socket, *, timeout: float = ANSWER_TIMEOUT) -> Answer:
    """One response with a Content-Length from a keep-alive connection."""
    sock.settimeout(timeout)
    raw = b""
    for _ in range(10_000):
        end = raw.find(b"\r\n\r\n")
        if end >= 0:
            length = re.search(rb"(?im)^content-length:\s*(\d+)", raw[:end])
            if length is not None and len(raw) >= end + 4 + int(length.group(1)):
                break
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        raw += chunk
    answers = parse_answers(raw)
    assert answers, f"no answer: {raw[:200]!r}"
    return answers[0]


# -- the mirror process from outside ----------------------------------------------


def pid_of(mirror: MirrorProcess) -> int:
    process = mirror._process  # noqa: SLF001 (the harness keeps the Popen private)
    assert process is not None and process.poll() is None, "the mirror is not running"
    return process.pid


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM ... of /proc/PID/status, in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            found[name] = int(value.split()[0])
    return found


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def log_mark(mirror: MirrorProcess) -> int:
    return len(mirror.log_lines())


def unhandled_since(mirror: MirrorProcess, mark: int) -> list[str]:
    markers = ("traceback (most recent call last)", "unhandled error")
    return [
        line
        for line in mirror.log_lines()[mark:]
        if any(marker in line.lower() for marker in markers)
    ]


def assert_still_serving(mirror: MirrorProcess, mark: int | None = None) -> None:
    """The daemon is alive, answers ``GET /v2/`` at once, logged no traceback."""
    assert mirror.returncode is None, f"the mirror died:\n{mirror.log()}"
    started = time.monotonic()
    response = http_request(mirror.port, "GET", "/v2/", timeout=ANSWER_TIMEOUT)
    assert response.status == 200, response
    assert time.monotonic() - started < 2.0
    if mark is not None:
        problems = unhandled_since(mirror, mark)
        assert not problems, "\n".join(mirror.log_lines()[mark:])


def cache_problems(mirror: MirrorProcess) -> list[str]:
    """Cached files whose content is not their name."""
    return [
        f"{name} holds {real}"
        for name, real in mirror.cached_blobs().items()
        if name != real
    ]


def assert_not_cached(mirror: MirrorProcess, digest: str) -> None:
    hex_ = digest.removeprefix("sha256:")
    for kind in ("blobs", "manifests"):
        path = mirror.cache_dir / kind / "sha256" / hex_[:2] / hex_
        assert not path.exists(), f"{path} was cached"


def wait_for_empty_spool(mirror: MirrorProcess, timeout: float = 20.0) -> None:
    spool = mirror.cache_dir / "spool"
    poll_until(
        lambda: not any(spool.iterdir()),
        timeout=timeout,
        describe=lambda: f"spool not emptied: {list(spool.iterdir())}\n{mirror.log()}",
    )


# -- part 1: bad client input ---------------------------------------------------------


class Slowloris(threading.Thread):
    """
    Beside the other tests: three connections that send a partial request
    line and then nothing, and two that drip a byte every ``DRIP_EVERY``
    seconds and never finish their request head: one after a complete
    request line (a header value that never ends), one inside the request
    line itself (no line end ever).  A probe fetches ``/v2/`` and a cached
    blob every second.  It records when the server closes each slow
    connection and how the probes fared.
    """

    SILENT = 3
    DRIPS = {
        "header": b"GET /v2/ HTTP/1.1\r\nHost: mirror.test\r\nX-Slow: ",
        "request-line": b"GET /v2/",
    }
    DRIP_EVERY = 2.0
    #: give up watching after this long (Twisted's idle timeout is 60 s)
    DEADLINE = 80.0
    #: after the silent connections are closed, watch the drips this long
    GRACE = 5.0

    def __init__(self, port: int, probe_path: str, probe_body: bytes) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.probe_path = probe_path
        self.probe_body = probe_body
        self.stopping = threading.Event()
        self.silent_closed: list[float] = []
        self.drip_closed: dict[str, float | None] = dict.fromkeys(self.DRIPS)
        self.drip_bytes: dict[str, int] = dict.fromkeys(self.DRIPS, 0)
        self.probes = 0
        self.probe_failures: list[str] = []
        self.slowest_probe = 0.0
        self.watched = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._watch()
        except BaseException as e:  # reported by the tests
            self.error = e

    def _watch(self) -> None:
        started = time.monotonic()
        opened = []
        watching: dict[socket.socket, str] = {}
        for _ in range(self.SILENT):
            sock = socket.create_connection((LOCALHOST, self.port), timeout=5)
            sock.sendall(b"GET /v2/ HTT")
            opened.append(sock)
            watching[sock] = "silent"
        drips: dict[str, socket.socket] = {}
        for kind, first in self.DRIPS.items():
            sock = socket.create_connection((LOCALHOST, self.port), timeout=5)
            sock.sendall(first)
            opened.append(sock)
            watching[sock] = kind
            drips[kind] = sock
        next_drip = started + self.DRIP_EVERY
        next_probe = started

        def closed(kind: str) -> None:
            now = time.monotonic() - started
            if kind == "silent":
                self.silent_closed.append(now)
            else:
                self.drip_closed[kind] = now

        try:
            for _ in range(int(self.DEADLINE / 0.2) + 100):
                now = time.monotonic()
                if self.stopping.is_set() or now - started > self.DEADLINE:
                    break
                if len(self.silent_closed) == self.SILENT and (
                    all(t is not None for t in self.drip_closed.values())
                    or now - started > max(self.silent_closed) + self.GRACE
                ):
                    break
                readable, _, _ = select.select(list(watching), [], [], 0.2)
                for sock in readable:
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    if data:
                        continue  # an answer (a 408?) before the close
                    closed(watching.pop(sock))
                if now >= next_drip:
                    for kind, sock in drips.items():
                        if sock not in watching:
                            continue
                        try:
                            sock.send(b"a")
                            self.drip_bytes[kind] += 1
                        except OSError:
                            closed(watching.pop(sock))
                    next_drip += self.DRIP_EVERY
                if now >= next_probe:
                    self._probe()
                    next_probe = time.monotonic() + 1.0
        finally:
            self.watched = time.monotonic() - started
            for sock in opened:
                sock.close()

    def _probe(self) -> None:
        self.probes += 1
        begun = time.monotonic()
        try:
            ping = http_request(self.port, "GET", "/v2/", timeout=ANSWER_TIMEOUT)
            blob = http_request(
                self.port, "GET", self.probe_path, timeout=ANSWER_TIMEOUT
            )
        except (OSError, http.client.HTTPException) as e:
            self.probe_failures.append(f"{e.__class__.__name__}: {e}")
            return
        took = time.monotonic() - begun
        self.slowest_probe = max(self.slowest_probe, took)
        if ping.status != 200 or blob.status != 200 or blob.body != self.probe_body:
            self.probe_failures.append(f"{ping.status} / {blob.status}")

    def outcome(self) -> Slowloris:
        """Wait (bounded) until the observation is over."""
        self.join(timeout=self.DEADLINE + 30)
        assert not self.is_alive(), "the slowloris observer did not finish"
        if self.error is not None:
            raise self.error
        return self

    def summary(self) -> str:
        drips = "; ".join(
            f"dripping {kind} "
            + ("still open" if closed is None else f"closed after {closed:.1f} s")
            + f" ({self.drip_bytes[kind]} bytes dripped, head never finished)"
            for kind, closed in self.drip_closed.items()
        )
        return (
            f"silent connections closed after {self.silent_closed} s; {drips}; "
            f"watched {self.watched:.1f} s; {self.probes} probes, slowest "
            f"{self.slowest_probe:.3f} s, failures {self.probe_failures}"
        )


@dataclass
class Target:
    """The shared mirror of part 1, in front of a real registry."""

    mirror: MirrorProcess
    registry: RegistryProcess
    #: a blob the mirror has cached
    cached: Blob
    slowloris: Slowloris

    @property
    def port(self) -> int:
        return self.mirror.port

    def blob_path(
        self, blob: Blob | None = None, repository: str = "test/small"
    ) -> str:
        return f"/v2/{repository}/blobs/{(blob or self.cached).digest}"


@pytest.fixture(scope="module")
def target(
    tmp_path_factory: pytest.TempPathFactory, seeded_storage: Path, catalog: Catalog
) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("hostile-target")
    registry = RegistryProcess(seeded_storage, root / "upstream")
    registry.start()
    port = free_port()
    # Not pulling ahead: the tests compare the cache before and after.
    config = mirror_config(port, registry.url, prefetch=0)
    mirror = MirrorProcess(root / "mirror", config, port)
    slowloris: Slowloris | None = None
    try:
        mirror.start()
        cached = max(catalog.small.layers, key=lambda b: b.size)
        path = f"/v2/{catalog.small.repository}/blobs/{cached.digest}"
        warm = http_request(port, "GET", path)
        assert warm.status == 200 and warm.body == cached.data, warm
        slowloris = Slowloris(port, path, cached.data)
        slowloris.start()
        yield Target(mirror, registry, cached, slowloris)
    finally:
        if slowloris is not None:
            slowloris.stopping.set()
            slowloris.join(timeout=10)
        died = mirror.returncode
        mirror.stop()
        registry.stop()
    # Tracebacks are each test's own business (assert_still_serving).
    assert died is None, f"the shared mirror died:\n{mirror.log()}"


def _name(length: int) -> str:
    """A repository name of exactly *length* characters, two components."""
    first = "a" * (length // 2)
    return f"{first}/{'b' * (length - len(first) - 1)}"


_HEX = "0123456789abcdef" * 8
_SHA = "sha256:" + _HEX[:64]

_SHA512 = "sha512:" + _HEX[:128]
_BUSYBOX = b"/v2/library/busybox"
_MD5 = b"md5:d41d8cd98f00b204e9800998ecf8427e"

#: Request targets refused before any upstream is asked, by expected answer:
#: traversal (raw, ``%2e%2e``, ``%252e%252e``, ``%2f``, backslashes) in every
#: part of a path, and names, tags and digests that break the grammar.
REFUSED: dict[tuple[int, str], dict[str, bytes]] = {
    (400, "NAME_INVALID"): {
        "dotdot-name": b"/v2/../../../etc/passwd/manifests/latest",
        "dotdot-in-name": b"/v2/library/../../manifests/latest",
        "dotdot-tags-list": b"/v2/../tags/list",
        "dot-name": b"/v2/./library/busybox/manifests/latest",
        "empty-component": b"/v2//etc/passwd/manifests/latest",
        "pct-dotdot-name": b"/v2/%2e%2e/%2e%2e/manifests/latest",
        "pct-dotdot-tag": _BUSYBOX + b"/manifests/%2e%2e%2f%2e%2e%2fetc",
        "pct-dotdot-digest": _BUSYBOX + b"/blobs/%2e%2e%2f%2e%2e",
        "pct-colon-digest": _BUSYBOX + b"/blobs/sha256%3a" + _HEX[:64].encode(),
        "pct2-dotdot": b"/v2/%252e%252e/%252e%252e/manifests/latest",
        "pct2-dotdot-tag": _BUSYBOX + b"/manifests/%252e%252e",
        "pct-slash-name": b"/v2/library%2fbusybox/manifests/latest",
        "pct-slash-tags-list": _BUSYBOX + b"%2f..%2f..%2f/tags/list",
        "pct-nul": _BUSYBOX + b"/manifests/latest%00",
        "backslash-name": b"/v2/library\\..\\..\\busybox/manifests/latest",
        "name-256": f"/v2/{_name(256)}/manifests/latest".encode(),
        "name-10000": f"/v2/{_name(10_000)}/manifests/latest".encode(),
        "name-130-components": b"/v2/" + b"a/" * 130 + b"manifests/latest",
        "name-uppercase": b"/v2/Library/BusyBox/manifests/latest",
        "name-leading-dash": b"/v2/-lib/app/manifests/latest",
        "name-three-underscores": b"/v2/a___b/app/manifests/latest",
        "name-store-reserved": b"/v2/_tags/x/manifests/latest",
        "name-host-port": b"/v2/127.0.0.1:1/x/manifests/latest",
    },
    (400, "TAG_INVALID"): {
        "dotdot-tag": _BUSYBOX + b"/manifests/..",
        "dotdot-last-query": _BUSYBOX + b"/tags/list?last=../../x",
        "backslash-tag": _BUSYBOX + b"/manifests/..\\..\\x",
        "tag-129": _BUSYBOX + b"/manifests/" + b"t" * 129,
        "tag-leading-dot": _BUSYBOX + b"/manifests/.hidden",
        "tag-leading-dash": _BUSYBOX + b"/manifests/-x",
        "tag-empty": _BUSYBOX + b"/manifests/",
        "tag-list-last-129": _BUSYBOX + b"/tags/list?last=" + b"t" * 129,
    },
    (400, "DIGEST_INVALID"): {
        "dotdot-digest": _BUSYBOX + b"/blobs/..",
        "dotdot-referrers": _BUSYBOX + b"/referrers/..",
        "backslash-digest": _BUSYBOX + b"/blobs/sha256:..\\..\\x",
        "digest-63-hex": _BUSYBOX + b"/blobs/sha256:" + _HEX[:63].encode(),
        "digest-65-hex": _BUSYBOX + b"/blobs/sha256:" + _HEX[:65].encode(),
        "digest-uppercase-hex": _BUSYBOX
        + b"/blobs/sha256:"
        + _HEX[:64].upper().encode(),
        "digest-uppercase-algorithm": _BUSYBOX + b"/blobs/SHA256:" + _HEX[:64].encode(),
        "digest-md5": _BUSYBOX + b"/blobs/" + _MD5,
        "digest-sha1": _BUSYBOX + b"/blobs/sha1:" + _HEX[:40].encode(),
        "digest-empty-hex": _BUSYBOX + b"/blobs/sha256:",
        "digest-no-colon": _BUSYBOX + b"/blobs/sha256",
        "digest-trailing": _BUSYBOX + b"/blobs/" + _SHA.encode() + b":x",
        "digest-unknown-algorithm": _BUSYBOX + b"/blobs/sha256+b64:abcd",
        "digest-10000": _BUSYBOX + b"/blobs/sha256:" + b"a" * 10_000,
        "digest-manifest-uppercase": _BUSYBOX
        + b"/manifests/sha256:"
        + _HEX[:64].upper().encode(),
        "digest-referrers-md5": _BUSYBOX + b"/referrers/" + _MD5,
    },
    (400, "PAGINATION_NUMBER_INVALID"): {
        "tag-list-n-negative": _BUSYBOX + b"/tags/list?n=-1",
    },
    # Not an open proxy: no namespace but the configured ones.
    (404, "NAME_UNKNOWN"): {
        "ns-traversal": _BUSYBOX + b"/manifests/latest?ns=../../etc",
        "ns-metadata": _BUSYBOX + b"/manifests/latest?ns=169.254.169.254",
        "host-component": b"/v2/169.254.169.254/latest/meta-data/manifests/latest",
    },
    (404, "NOT_FOUND"): {
        "dotdot-after-endpoint": _BUSYBOX + b"/manifests/../../../../etc/passwd",
        "outside-v2": b"/../v2/",
    },
}
#: Names, tags and digests exactly at the limits: accepted, so the upstream
#: is asked (and knows nothing of them).
AT_THE_LIMITS: dict[tuple[int, str], dict[str, bytes]] = {
    (404, "MANIFEST_UNKNOWN"): {
        "name-255-accepted": f"/v2/{_name(255)}/manifests/latest".encode(),
        "tag-128-accepted": _BUSYBOX + b"/manifests/" + b"t" * 128,
    },
    (404, "BLOB_UNKNOWN"): {
        "digest-sha512-accepted": _BUSYBOX + b"/blobs/" + _SHA512.encode(),
    },
}
#: (id, raw request target, expected status, expected error code, whether
#: the upstream may be asked)
BAD_PATHS: list[tuple[str, bytes, int, str, bool]] = [
    (name, path, status, code, asks)
    for table, asks in ((REFUSED, False), (AT_THE_LIMITS, True))
    for (status, code), paths in table.items()
    for name, path in paths.items()
]


@pytest.mark.parametrize(
    ("path", "status", "code", "upstream_may_be_asked"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_PATHS],
)
def test_bad_path_refused_with_oci_error(
    target: Target, path: bytes, status: int, code: str, upstream_may_be_asked: bool
) -> None:
    """
    A request path with traversal (raw, ``%2e%2e``, ``%252e%252e``, ``%2f``,
    backslashes) in any part, or a name, tag or digest that breaks the
    grammar, gets its status and OCI error code; refused ones never reach
    the upstream; the cache is unchanged and the mirror goes on serving.
    Names, tags and digests at the limits are accepted (and unknown
    upstream).
    """
    mark = log_mark(target.mirror)
    upstream_mark = len(target.registry.access_log())
    before = target.mirror.cache_listing()
    result = exchange(target.port, get(path))
    answer = result.first
    assert answer is not None, result.describe()
    assert (answer.status, answer.error_codes()) == (status, [code]), result.describe()
    assert target.mirror.cache_listing() == before
    if not upstream_may_be_asked:
        asked = target.registry.access_log()[upstream_mark:]
        assert not [x for x in asked if "/v2/" in x and '"GET /v2/ ' not in x], asked
    assert_still_serving(target.mirror, mark)


#: (id, Range header, expected status): 200 is the whole blob, 206 the bytes
#: named by ``slice``, 416 an OCI RANGE_INVALID error.
def _range_cases(size: int) -> list[tuple[str, bytes, int, slice | None]]:
    huge = b"9" * 40
    return [
        ("single", b"bytes=10-20", 206, slice(10, 21)),
        ("open-ended", b"bytes=100-", 206, slice(100, None)),
        ("suffix", b"bytes=-100", 206, slice(size - 100, None)),
        ("multi-range", b"bytes=0-0,5-9", 200, None),
        ("multi-range-spaces", b"bytes=0-1, 3-4, 7-", 200, None),
        ("thousand-ranges", b"bytes=" + b",".join([b"0-0"] * 1000), 200, None),
        ("not-bytes", b"items=0-5", 200, None),
        ("garbage", b"bytes=abc", 200, None),
        ("reversed", b"bytes=5-2", 200, None),
        ("empty", b"bytes=", 200, None),
        ("double-dash", b"bytes=--5", 200, None),
        ("negative-start", b"bytes=-5-10", 200, None),
        ("end-past-size-huge", b"bytes=0-" + huge, 206, slice(0, None)),
        ("suffix-huge", b"bytes=-" + huge, 206, slice(0, None)),
        ("suffix-zero", b"bytes=-0", 416, None),
        ("start-at-size", f"bytes={size}-".encode(), 416, None),
        ("start-huge", b"bytes=" + huge + b"-", 416, None),
    ]


@pytest.mark.parametrize(
    "case",
    range(len(_range_cases(1000))),
    ids=[c[0] for c in _range_cases(1000)],
)
def test_range_header_on_cached_blob(target: Target, case: int) -> None:
    """
    On a cached blob: a single satisfiable ``Range`` gives 206 and exactly
    those bytes; several ranges are served whole with 200; a malformed one
    is ignored (200, whole); an unsatisfiable one gives 416 with
    ``Content-Range: bytes */SIZE`` and an OCI RANGE_INVALID body.  The
    cache is unchanged and the mirror goes on serving.
    """
    blob = target.cached
    name, header, status, part = _range_cases(blob.size)[case]
    mark = log_mark(target.mirror)
    before = target.mirror.cache_listing()
    result = exchange(
        target.port, get(target.blob_path().encode(), b"Range: " + header)
    )
    answer = result.first
    assert answer is not None, result.describe()
    assert answer.status == status, (name, result.describe())
    if status == 200:
        assert answer.body == blob.data
    elif status == 206:
        assert part is not None
        wanted = blob.data[part]
        start = part.start
        assert answer.body == wanted
        assert answer.headers.get("content-range") == (
            f"bytes {start}-{start + len(wanted) - 1}/{blob.size}"
        )
    else:
        assert answer.error_codes() == ["RANGE_INVALID"], answer
        assert answer.headers.get("content-range") == f"bytes */{blob.size}"
    assert target.mirror.cache_listing() == before
    assert_still_serving(target.mirror, mark)


def test_range_on_uncached_blob_and_manifest(target: Target, catalog: Catalog) -> None:
    """
    Several ranges on a blob that is not cached yet (a download starts) and
    a ``Range`` on a manifest are both answered whole with 200; the blob
    lands in the cache verified.
    """
    mark = log_mark(target.mirror)
    layer = catalog.shared_one.layers[1]
    path = f"/v2/{catalog.shared_one.repository}/blobs/{layer.digest}".encode()
    result = exchange(target.port, get(path, b"Range: bytes=0-0,2-3"))
    assert result.first is not None, result.describe()
    assert (result.first.status, result.first.body) == (200, layer.data)
    manifest = catalog.small.root
    path = f"/v2/{catalog.small.repository}/manifests/{manifest.digest}".encode()
    result = exchange(
        target.port,
        get(path, b"Range: bytes=0-9", b"Accept: " + MANIFEST_ACCEPT.encode()),
    )
    assert result.first is not None, result.describe()
    assert (result.first.status, result.first.body) == (200, manifest.data)
    assert not cache_problems(target.mirror)
    assert_still_serving(target.mirror, mark)


#: (id, request head, expected status): the request line may be 16 KiB
#: long, the header lines 16 KiB together (line ends not counted), and
#: there may be 500 of them (``regmirror.http.channel``: ``MAX_REQUEST_LINE``,
#: ``MAX_HEADER_BYTES``, ``MAX_HEADERS``).
OVERSIZED_HEADS: list[tuple[str, bytes, int]] = [
    (
        "header-100KiB",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 102_400 + b"\r\n\r\n",
        431,
    ),
    (
        "header-17KiB",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17_408 + b"\r\n\r\n",
        431,
    ),
    (
        "header-block-64KiB",
        b"GET /v2/ HTTP/1.1\r\n"
        + b"".join(b"X-%02d: " % i + b"b" * 1018 + b"\r\n" for i in range(64))
        + b"\r\n",
        431,
    ),
    (
        "request-line-16KiB",
        b"GET /v2/" + b"a" * 16_384 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
    ),
    (
        "url-64KiB",
        b"GET /v2/" + b"a/" * 32_768 + b"manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
    ),
    ("method-64KiB", b"G" * 65_536 + b" /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (
        "600-headers",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: y\r\n" % i for i in range(600))
        + b"\r\n",
        431,
    ),
    (
        "1MiB-of-header-lines",
        b"GET /v2/ HTTP/1.1\r\n"
        + b"X-A: "
        + b"b" * 1000
        + b"\r\n" * 1
        + (b"X-A: " + b"b" * 1000 + b"\r\n") * 1000
        + b"\r\n",
        431,
    ),
    (
        "push-with-64KiB-of-headers",
        b"PUT /v2/a/manifests/b HTTP/1.1\r\n"
        + b"".join(b"X-%02d: " % i + b"b" * 1018 + b"\r\n" for i in range(64))
        + b"\r\n",
        431,
    ),
]


@pytest.mark.parametrize(
    ("data", "status"), [pytest.param(d, s, id=i) for i, d, s in OVERSIZED_HEADS]
)
def test_oversized_request_head_is_refused(
    target: Target, data: bytes, status: int
) -> None:
    """
    A request head far too big gets its answer, not a silent close: ``414``
    for a request line over 16 KiB (a 64 KiB URL or method), ``431`` for
    more than 16 KiB of header lines (one 100 KiB header, 64 KiB of them,
    1 MiB of them) or more than 500 of them; each with an OCI error body
    and ``Connection: close``, at once.  The cache is unchanged and the
    mirror goes on serving.
    """
    mark = log_mark(target.mirror)
    before = target.mirror.cache_listing()
    result = exchange(target.port, data)
    assert result.closed, f"the connection was left hanging: {result.describe()}"
    assert result.elapsed < ANSWER_TIMEOUT
    assert len(result.answers) == 1, f"no single answer: {result.describe()}"
    answer = result.answers[0]
    assert answer.status == status, result.describe()
    assert answer.headers.get("connection") == "close", result.describe()
    assert answer.error_codes() == ["UNSUPPORTED"], result.describe()
    assert target.mirror.cache_listing() == before
    assert_still_serving(target.mirror, mark)


def test_request_head_at_the_limits_is_served(target: Target) -> None:
    """A request line of exactly 16 KiB and 16 KiB of header lines (line
    ends not counted) in 500 lines are within the limits: the request is
    answered as any other (here: a name too long, 400 ``NAME_INVALID``)."""
    frame = b"GET /v2/%s/manifests/latest HTTP/1.1"
    line = frame % (b"a" * (16_384 - len(frame % b"")))
    assert len(line) == 16_384
    # An HTTP/1.1 request without Host is 400 whatever its size.
    closing = [b"Host: x", b"Connection: close"]
    fields = [b"X%05d:" % i for i in range(498)]
    padding = 16_384 - sum(map(len, fields)) - sum(map(len, closing))
    fields = [
        field + b"v" * (padding // 498 + (i < padding % 498))
        for i, field in enumerate(fields)
    ]
    fields += closing
    assert (len(fields), sum(map(len, fields))) == (500, 16_384)
    result = exchange(target.port, b"\r\n".join([line, *fields, b"", b""]))
    assert result.first is not None, result.describe()
    assert result.first.status == 400, result.describe()
    assert result.first.error_codes() == ["NAME_INVALID"], result.describe()


def _smuggle(marker: str, head: bytes, body: bytes) -> bytes:
    """A request whose body hides a second request for a marked repository."""
    hidden = f"GET /v2/smuggled/{marker}/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n"
    return head + body + hidden.encode()


def _head(*fields: bytes) -> bytes:
    """``GET /v2/`` with *fields* as its header lines."""
    return b"\r\n".join([b"GET /v2/ HTTP/1.1", b"Host: x", *fields, b"", b""])


_TE = b"Transfer-Encoding: "
_CL = b"Content-Length: "
_LAST = b"0\r\n\r\n"
SMUGGLING: list[tuple[str, bytes, bytes]] = [
    ("cl-and-te", _head(_CL + b"5", _TE + b"chunked"), _LAST),
    ("te-and-cl", _head(_TE + b"chunked", _CL + b"60"), _LAST),
    ("te-chunked-identity", _head(_TE + b"chunked, identity"), _LAST),
    ("te-identity-chunked", _head(_TE + b"identity, chunked"), _LAST),
    ("two-te-headers", _head(_TE + b"chunked", _TE + b"identity"), _LAST),
    ("two-cl-differing", _head(_CL + b"0", _CL + b"5"), b"hello"),
    ("two-cl-equal", _head(_CL + b"5", _CL + b"5"), b"hello"),
    ("cl-list", _head(_CL + b"5, 5"), b"hello"),
    ("cl-plus-sign", _head(_CL + b"+5"), b"hello"),
    ("te-space-before-colon", _head(b"Transfer-Encoding : chunked"), _LAST),
    ("te-xchunked", _head(_TE + b"xchunked"), _LAST),
    ("te-obs-fold", _head(b"Transfer-Encoding:\r\n chunked"), _LAST),
    ("chunk-size-garbage", _head(_TE + b"chunked"), b"5x\r\nhello\r\n" + _LAST),
]


@pytest.mark.parametrize(
    ("head", "body"), [pytest.param(h, b, id=i) for i, h, b in SMUGGLING]
)
def test_request_smuggling_is_refused(
    target: Target, request: pytest.FixtureRequest, head: bytes, body: bytes
) -> None:
    """
    Ambiguous framing (Content-Length with Transfer-Encoding, ``chunked,
    identity``, two Transfer-Encoding or Content-Length headers,
    ``Transfer-Encoding :``, obs-fold, a garbage chunk size) gets a 400 (or
    413, 501) and a closed connection; the request hidden in the body is
    never answered nor sent upstream; the cache is unchanged and the
    mirror goes on serving.
    """
    marker = re.sub(r"[^a-z0-9]", "", request.node.callspec.id)
    mark = log_mark(target.mirror)
    upstream_mark = len(target.registry.access_log())
    before = target.mirror.cache_listing()
    result = exchange(target.port, _smuggle(marker, head, body), timeout=2.0)
    assert result.closed, f"the connection was left open: {result.describe()}"
    assert len(result.answers) <= 1, f"more than one answer: {result.describe()}"
    if result.answers:
        # 400 (malformed), 413 (a read-only mirror takes no body at all) or
        # 501 (a transfer coding it does not know): refused, either way.
        assert result.answers[0].status in (400, 413, 501), result.describe()
    assert not [
        x for x in target.registry.access_log()[upstream_mark:] if "smuggled" in x
    ]
    assert not [x for x in target.mirror.log_lines()[mark:] if "smuggled" in x]
    assert target.mirror.cache_listing() == before
    assert_still_serving(target.mirror, mark)


_PUSH = b"PUT /v2/library/busybox/manifests/latest HTTP/1.1\r\nHost: x\r\n"
_OCI = b"Content-Type: application/vnd.oci.image.manifest.v1+json\r\n"
_UPLOADS = b"/v2/library/busybox/blobs/uploads/"
#: (id, raw request, the methods the answer must allow): pushes and every
#: other write, whatever their framing says.
WRITES: list[tuple[str, bytes, str]] = [
    ("push-manifest", _PUSH + _OCI + b"Content-Length: 2\r\n\r\n{}", "GET, HEAD"),
    (
        "push-manifest-chunked",
        _PUSH + _OCI + _TE + b"chunked\r\n\r\n" + _LAST,
        "GET, HEAD",
    ),
    (
        "push-manifest-cl-and-te",
        _PUSH + _CL + b"2\r\n" + _TE + b"chunked\r\n\r\n{}",
        "GET, HEAD",
    ),
    (
        "push-manifest-two-cl",
        _PUSH + _CL + b"2\r\n" + _CL + b"0\r\n\r\n{}",
        "GET, HEAD",
    ),
    (
        "start-upload",
        b"POST " + _UPLOADS + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        "GET, HEAD",
    ),
    (
        "patch-upload",
        b"PATCH " + _UPLOADS + b"u HTTP/1.1\r\nHost: x\r\n" + _CL + b"5\r\n\r\nhello",
        "GET, HEAD",
    ),
    (
        "delete-manifest",
        b"DELETE /v2/library/busybox/manifests/" + _SHA.encode() + b" HTTP/1.1\r\n\r\n",
        "GET, HEAD",
    ),
    ("options", b"OPTIONS /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", "GET, HEAD"),
    (
        "token-post",
        b"POST /token HTTP/1.1\r\nHost: x\r\n" + _CL + b"10\r\n\r\ngrant_type",
        "GET",
    ),
    ("token-head", b"HEAD /token?scope=x HTTP/1.1\r\nHost: x\r\n\r\n", "GET"),
    ("metrics", b"POST /metrics HTTP/1.1\r\n" + _CL + b"1\r\n\r\nx", "GET, HEAD"),
    ("healthz", b"PUT /healthz HTTP/1.1\r\n\r\n", "GET, HEAD"),
    ("readyz", b"DELETE /readyz HTTP/1.1\r\n\r\n", "GET, HEAD"),
    ("status-page", b"POST / HTTP/1.1\r\n\r\n", "GET, HEAD"),
    ("status", b"POST /_status HTTP/1.1\r\n\r\n", "GET, HEAD"),
    ("status-json", b"POST /_status.json HTTP/1.1\r\n\r\n", "GET, HEAD"),
]


@pytest.mark.parametrize(
    ("data", "allow"), [pytest.param(d, a, id=i) for i, d, a in WRITES]
)
def test_writes_get_405_unsupported(
    target: Target, request: pytest.FixtureRequest, data: bytes, allow: str
) -> None:
    """
    A push (``PUT`` of a manifest, ``POST``/``PATCH`` of an upload), a
    ``DELETE``, or any method but GET and HEAD anywhere (the token
    endpoint: GET only) gets ``405`` with the OCI ``UNSUPPORTED`` code, an
    ``Allow`` header and a closed connection, decided from the request
    line: Content-Length and Transfer-Encoding, however contradictory,
    change nothing, and a request hidden in the body is never answered.
    Nothing reaches the upstream or the cache.
    """
    marker = re.sub(r"[^a-z0-9]", "", request.node.callspec.id)
    mark = log_mark(target.mirror)
    upstream_mark = len(target.registry.access_log())
    before = target.mirror.cache_listing()
    result = exchange(
        target.port, _smuggle(marker, data, b""), head=data.startswith(b"HEAD")
    )
    assert result.closed, f"the connection was left open: {result.describe()}"
    assert len(result.answers) == 1, result.describe()
    answer = result.answers[0]
    assert answer.status == 405, result.describe()
    assert answer.headers.get("allow") == allow, result.describe()
    assert answer.headers.get("connection") == "close", result.describe()
    if not data.startswith(b"HEAD"):
        assert answer.error_codes() == ["UNSUPPORTED"], result.describe()
    upstream = target.registry.access_log()[upstream_mark:]
    assert not [x for x in upstream if not re.search(r'"(GET|HEAD) ', x)], upstream
    assert not [x for x in upstream if "smuggled" in x], upstream
    assert not [x for x in target.mirror.log_lines()[mark:] if "smuggled" in x]
    assert target.mirror.cache_listing() == before
    assert_still_serving(target.mirror, mark)


PROTOCOL_ERRORS: list[tuple[str, bytes]] = [
    ("cl-and-te", SMUGGLING[0][1] + SMUGGLING[0][2]),
    ("two-cl-differing", SMUGGLING[5][1] + SMUGGLING[5][2]),
    ("600-headers", next(d for i, d, _ in OVERSIZED_HEADS if i == "600-headers")),
    ("garbage-request-line", b"\x00\x01\x02 nonsense\r\n\r\n"),
    (
        "nul-in-path",
        b"GET /v2/library/busy\x00box/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
    (
        "non-ascii-path",
        b"GET /v2/libr\xc3\xa4ry/busybox/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
    (
        "space-in-path",
        b"GET /v2/library/busy box/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
]


@pytest.mark.parametrize("data", [pytest.param(d, id=i) for i, d in PROTOCOL_ERRORS])
def test_protocol_error_answers_carry_oci_error_body(
    target: Target, data: bytes
) -> None:
    """
    Invariant 6 for requests the HTTP parser rejects before any resource
    sees them (smuggling attempts, too many headers, a garbage request
    line, NUL, non-ASCII or a space in the path): where the mirror answers
    at all, the answer is a 4xx with an OCI error body.
    """
    mark = log_mark(target.mirror)
    result = exchange(target.port, data)
    assert result.first is not None or result.closed, result.describe()
    for answer in result.answers:
        assert answer.status is not None and 400 <= answer.status < 500
        assert answer.error_codes() is not None, (
            f"a {answer.status} answer without an OCI error body: {result.describe()}"
        )
    assert_still_serving(target.mirror, mark)


#: ``Host`` values that are no ``host[:port]`` (RFC 3986 reg-name, IPv4 or
#: [IPv6], then an optional port): a challenge's realm echoed such a value,
#: a ``"`` adding parameters to ``WWW-Authenticate``
BAD_HOSTS: list[tuple[str, bytes]] = [
    ("quote-injects-realm", b'mirror.test",realm="http://evil.example'),
    ("quote", b'mirror.test"'),
    ("space", b"mirror test"),
    ("tab", b"mirror\t.test"),
    ("path", b"mirror.test/v2/evil"),
    ("query", b"mirror.test?x=1"),
    ("backslash", b"mirror.test\\evil"),
    ("userinfo", b"user@mirror.test"),
    ("port-not-digits", b"mirror.test:http"),
    ("port-too-big", b"mirror.test:65536"),
    ("two-ports", b"mirror.test:80:80"),
    ("bare-ipv6", b"::1"),
    ("unclosed-ipv6", b"[::1"),
    ("name-in-brackets", b"[mirror.test]"),
    ("non-ascii", b"mirr\xc3\xb6r.test"),
    ("empty", b""),
    ("too-long", b"a" * 300),
]


@pytest.mark.parametrize("host", [pytest.param(h, id=i) for i, h in BAD_HOSTS])
def test_host_that_is_not_host_and_port_is_refused(target: Target, host: bytes) -> None:
    """
    A ``Host`` line (in any case) that is no ``host[:port]`` is 400 with an
    OCI error body before anything else, at the API root, on a manifest
    and on a cached blob: nothing is routed by it, served for it or echoed
    from it.
    """
    mark = log_mark(target.mirror)
    for path in (
        b"/v2/",
        b"/v2/test/small/manifests/latest",
        target.blob_path().encode(),
    ):
        for name in (b"Host", b"HOST"):
            data = b"GET " + path + b" HTTP/1.1\r\n" + name + b": " + host
            result = exchange(target.port, data + b"\r\nConnection: close\r\n\r\n")
            answer = result.first
            assert answer is not None, result.describe()
            assert answer.status == 400, (path, result.describe())
            assert answer.error_codes() == ["UNSUPPORTED"], result.describe()
            assert host not in result.raw or not host
    assert_still_serving(target.mirror, mark)


def _temporary_files(pid: int) -> dict[str, int]:
    """Deleted files the process holds open (request bodies), with sizes."""
    found = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            name = str(fd.readlink())
            size = fd.stat().st_size
        except OSError:
            continue
        if name.endswith("(deleted)"):
            found[name] = size
    return found


@pytest.mark.parametrize("method", [b"POST", b"GET"])
def test_request_body_is_refused_not_buffered(target: Target, method: bytes) -> None:
    """
    A request announcing a 10 GiB body is answered before the client has
    sent 32 MiB of it, a write method (the mirror is read-only) with 405,
    a GET (which needs no body) with 413; the mirror does not buffer the
    body on disk or in memory.
    """
    mark = log_mark(target.mirror)
    pid = pid_of(target.mirror)
    head = (
        method
        + b" /v2/library/busybox/blobs/uploads/ HTTP/1.1\r\nHost: x\r\n"
        + b"Content-Length: 10737418240\r\n\r\n"
    )
    chunk = b"\0" * (1 << 20)
    sent = 0
    answered = b""
    refused = False
    held: dict[str, int] = {}
    with socket.create_connection(
        (LOCALHOST, target.port), timeout=ANSWER_TIMEOUT
    ) as sock:
        sock.sendall(head)
        deadline = time.monotonic() + ANSWER_TIMEOUT
        for _ in range(10_000):
            if sent >= 32 << 20 or time.monotonic() > deadline:
                break
            _, writable, _ = select.select([], [sock], [], 0.5)
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                try:
                    answered = sock.recv(65536)
                except OSError:
                    pass
                refused = True
                break
            if writable:
                try:
                    sent += sock.send(chunk)
                except OSError:
                    refused = True
                    break
        held = _temporary_files(pid)
    poll_until(
        lambda: not _temporary_files(pid),
        timeout=10,
        describe=lambda: f"request body still held: {_temporary_files(pid)}",
    )
    assert refused, (
        f"{method.decode()} with Content-Length: 10 GiB: {sent} bytes of body were "
        f"accepted without an answer; the mirror held {held} (deleted temporary "
        "files, bytes)"
    )
    assert answered, f"{method.decode()}: cut off without an answer"
    status = int(answered.split(b" ", 2)[1])
    assert status == (413 if method == b"GET" else 405), answered[:200]
    assert_still_serving(target.mirror, mark)


def test_thousands_of_idle_keepalive_connections(
    target: Target, catalog: Catalog
) -> None:
    """
    2,000 keep-alive connections (fewer only if ``ulimit -n`` is too low),
    each having made one request and then sitting idle: the mirror keeps
    answering other clients (the API root, a cached blob, a manifest by
    tag) promptly, and gives the connections' descriptors back once they
    close.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = min(2000, (soft - 256) // 2)
    assert count >= 1000, f"ulimit -n is {soft}: too low for this test"
    mark = log_mark(target.mirror)
    pid = pid_of(target.mirror)
    fds_before = fd_count(pid)
    sockets: list[socket.socket] = []
    try:
        # Batches below the listen backlog (Twisted's default: 50), each
        # answered before the next, so that no SYN is dropped and retried.
        for _ in range(count // 40):
            batch = []
            for _ in range(40):
                sock = socket.create_connection((LOCALHOST, target.port), timeout=5)
                sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror.test\r\n\r\n")
                batch.append(sock)
            sockets += batch
            for sock in batch:
                assert read_response(sock).status == 200
        held = fd_count(pid)
        assert held >= fds_before + len(sockets) * 0.9, (fds_before, held)
        started = time.monotonic()
        small = catalog.small
        checks = [
            ("/v2/", None, b"{}"),
            (target.blob_path(), None, target.cached.data),
            (
                f"/v2/{small.repository}/manifests/{small.tag}",
                {"Accept": MANIFEST_ACCEPT},
                small.root.data,
            ),
        ]
        for path, headers, expected in checks:
            begun = time.monotonic()
            response = http_request(target.port, "GET", path, headers)
            assert (response.status, response.body) == (200, expected), path
            assert time.monotonic() - begun < 2.0, f"{path} took too long"
        served = time.monotonic() - started
        # The idle ones are all still there and still usable.
        for sock in sockets[:: max(1, len(sockets) // 20)]:
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror.test\r\n\r\n")
            assert read_response(sock).status == 200
    finally:
        for sock in sockets:
            sock.close()
    poll_until(
        lambda: fd_count(pid) <= fds_before + 20,
        timeout=15,
        describe=lambda: f"descriptors not released: {fd_count(pid)} vs {fds_before}",
    )
    print(
        f"\n{len(sockets)} idle keep-alive connections: mirror fds {fds_before} -> "
        f"{held} -> {fd_count(pid)}; three requests served in {served:.3f} s"
    )
    assert_still_serving(target.mirror, mark)


# -- part 2: misbehaving upstreams ------------------------------------------------


class Plan:
    """What ``programs/hostile_upstream.py`` serves, written as JSON."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.document: dict[str, Any] = {
            "blobs": {},
            "manifests": {},
            "tags": {},
            "modes": {},
        }

    def _write(self, data: bytes) -> str:
        path = self.folder / hashlib.sha256(data).hexdigest()
        path.write_bytes(data)
        return str(path)

    def blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        self.document["blobs"][digest] = self._write(data)
        return digest

    def manifest(
        self,
        data: bytes,
        content_type: str,
        repository: str | None = None,
        tag: str | None = None,
    ) -> str:
        digest = sha256_digest(data)
        self.document["manifests"][digest] = {
            "path": self._write(data),
            "type": content_type,
        }
        if repository is not None and tag is not None:
            self.document["tags"].setdefault(repository, {})[tag] = digest
        return digest

    def image(self, image: Image, repository: str | None = None) -> None:
        for blob in image.blobs:
            self.blob(blob.data)
        for manifest in image.manifests:
            self.manifest(manifest.data, manifest.media_type)
        self.manifest(
            image.root.data,
            image.root.media_type,
            repository or image.repository,
            image.tag,
        )

    def mode(self, repository: str, **mode: Any) -> None:
        self.document["modes"][repository] = mode

    def save(self) -> Path:
        path = self.folder / "plan.json"
        path.write_text(json.dumps(self.document, indent=1))
        return path


class HostileUpstream(ProgramProcess):
    """``programs/hostile_upstream.py`` serving a :class:`Plan`."""

    program = "hostile_upstream"

    def __init__(self, workdir: Path, plan: Plan) -> None:
        super().__init__(workdir, ["--plan", str(plan.save())])

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.ports['registry']}"

    def requests_for(self, fragment: str, method: str = "GET") -> list[dict[str, Any]]:
        return [
            r for r in self.records() if r["method"] == method and fragment in r["path"]
        ]


@dataclass
class Rig:
    mirror: MirrorProcess
    hostile: HostileUpstream


@pytest.fixture
def rig(
    tmp_path: Path, start_program: StartProgram, start_mirror: StartMirror
) -> Callable[..., Rig]:
    """
    ``rig(plan, upstream_keys=..., origin=registry)``: the hostile upstream
    serving *plan*, and a mirror whose docker.io namespace asks it first
    (its breaker never opens, so every request reaches it) and then, if
    given, a real registry as the origin.
    """

    def start(
        plan: Plan,
        *,
        upstream_keys: Mapping[str, str] | None = None,
        origin: RegistryProcess | None = None,
    ) -> Rig:
        hostile = start_program(HostileUpstream(tmp_path / "hostile", plan))
        upstreams: dict[str, dict[str, str]] = {
            "hostile": {
                "url": hostile.url,
                "breaker_failures": "1000",
                "breaker_backoff": "1s",
                **(upstream_keys or {}),
            }
        }
        if origin is not None:
            upstreams["origin"] = {"url": origin.url}
        mirror = start_mirror(
            lambda port: mirror_config_upstreams(
                port, upstreams, origin="origin" if origin else "hostile"
            )
        )
        return Rig(mirror, hostile)

    return start


@dataclass
class Streamed:
    """What a client got from a blob GET read in pieces, within bounds."""

    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool
    error: str | None
    elapsed: float


def stream(
    port: int,
    path: str,
    *,
    timeout: float = 20.0,
    limit: int = 64 << 20,
    headers: Mapping[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Streamed:
    """
    GET *path* and read the body in 64 KiB pieces until it ends, breaks,
    exceeds *limit* bytes or *timeout* seconds pass.
    """
    started = time.monotonic()
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=timeout)
    try:
        connection.request("GET", path, headers=dict(headers or {}))
        response = connection.getresponse()
        got = {k.lower(): v for k, v in response.getheaders()}
        pieces = bytearray()
        error = None
        complete = False
        for _ in range(100_000):
            if len(pieces) > limit or time.monotonic() - started > timeout:
                error = f"stopped reading after {len(pieces)} bytes"
                break
            try:
                piece = response.read1(1 << 16)
            except (http.client.HTTPException, OSError) as e:
                error = f"{e.__class__.__name__}: {e}"
                break
            if not piece:
                declared = got.get("content-length", "")
                complete = not declared.isdigit() or len(pieces) == int(declared)
                if not complete:
                    error = f"closed after {len(pieces)} of {declared} bytes"
                break
            pieces += piece
            if on_bytes is not None:
                on_bytes(len(pieces))
        return Streamed(
            response.status,
            got,
            bytes(pieces),
            complete,
            error,
            time.monotonic() - started,
        )
    finally:
        connection.close()


def no_complete_wrong_blob(result: Streamed, blob_digest: str) -> None:
    """The invariant: a complete 200 body is the blob; anything else broke."""
    if result.status == 200 and result.complete:
        assert sha256_digest(result.body) == blob_digest, (
            f"a complete 200 of {len(result.body)} bytes that is not {blob_digest}"
        )


def _oversize_manifest(catalog: Catalog) -> bytes:
    small = json.loads(catalog.small.root.data)
    small["annotations"] = {"pad": "x" * (5 << 20)}
    return canonical_json(small)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversize_manifest_refused(
    tmp_path: Path, catalog: Catalog, rig: Callable[..., Rig], chunked: bool
) -> None:
    """
    A 5 MiB manifest (over the 4 MiB limit), announced with a
    Content-Length or sent chunked, by digest and by tag: a clean 502 OCI
    UNAVAILABLE error, nothing cached, and the mirror goes on serving.
    """
    plan = Plan(tmp_path / "plan")
    body = _oversize_manifest(catalog)
    digest = plan.manifest(body, OCI_MANIFEST, "hostile/big", "v1")
    if chunked:
        plan.mode("hostile/big", mode="chunked")
    setup = rig(plan)
    mark = log_mark(setup.mirror)
    for reference in (digest, "v1"):
        started = time.monotonic()
        response = http_request(
            setup.mirror.port,
            "GET",
            f"/v2/hostile/big/manifests/{reference}",
            {"Accept": MANIFEST_ACCEPT},
            timeout=15,
        )
        assert (response.status, response.error_codes()) == (502, ["UNAVAILABLE"])
        assert time.monotonic() - started < 10
    assert_not_cached(setup.mirror, digest)
    assert setup.hostile.requests_for(f"/manifests/{digest}")
    assert_still_serving(setup.mirror, mark)


def test_endless_manifest_body_is_cut_at_the_limit(
    tmp_path: Path, rig: Callable[..., Rig]
) -> None:
    """
    A manifest body that never ends (chunked, 4 MiB/s): the mirror stops
    reading once it is over the 4 MiB limit and answers 502 within a few
    seconds, rather than reading on for as long as the upstream sends.
    """
    plan = Plan(tmp_path / "plan")
    plan.mode("hostile/endless", mode="endless", rate=4 << 20, cap=32 << 20)
    setup = rig(plan)
    mark = log_mark(setup.mirror)
    started = time.monotonic()
    try:
        response = http_request(
            setup.mirror.port,
            "GET",
            f"/v2/hostile/endless/manifests/{_SHA}",
            {"Accept": MANIFEST_ACCEPT},
            timeout=6,
        )
    except TimeoutError:
        pytest.fail(
            f"no answer after {time.monotonic() - started:.1f}s: the mirror keeps "
            "reading a manifest body past its 4 MiB limit for as long as the "
            "upstream sends (read_body drops the excess but never stops)"
        )
    took = time.monotonic() - started
    assert (response.status, response.error_codes()) == (502, ["UNAVAILABLE"])
    assert took < 5, f"answered after {took:.1f}s"
    assert_not_cached(setup.mirror, _SHA)
    assert_still_serving(setup.mirror, mark)


@pytest.mark.parametrize("fault", ["stall", "cut"])
def test_stalled_or_cut_manifest_body_fails_over_to_origin(
    tmp_path: Path,
    catalog: Catalog,
    upstream: RegistryProcess,
    rig: Callable[..., Rig],
    fault: str,
) -> None:
    """
    The first upstream sends a manifest's headers and 16 bytes, then
    nothing (with ``idle_timeout = 2s``), or half the manifest and then
    closes the connection: the mirror gives up on it (within the idle
    timeout) and serves the manifest from the origin, with no traceback in
    its log.
    """
    image = catalog.small
    plan = Plan(tmp_path / "plan")
    plan.image(image)
    plan.mode(image.repository, mode=fault, digest=image.root.digest)
    setup = rig(
        plan,
        upstream_keys={"idle_timeout": "2s", "response_timeout": "2s"},
        origin=upstream,
    )
    mark = log_mark(setup.mirror)
    started = time.monotonic()
    path = f"/v2/{image.repository}/manifests/{image.root.digest}"
    try:
        response = http_request(
            setup.mirror.port, "GET", path, {"Accept": MANIFEST_ACCEPT}, timeout=6
        )
    except TimeoutError:
        pytest.fail(
            f"no answer after {time.monotonic() - started:.1f}s: a manifest body "
            "that stalls after its headers is waited for forever (no idle timeout "
            "on manifest bodies), and the origin is never asked"
        )
    took = time.monotonic() - started
    assert (response.status, response.body) == (200, image.root.data), (
        f"{fault}: {response.status} {response.body[:200]!r} after {took:.1f}s; "
        "mirror log:\n" + "\n".join(setup.mirror.log_lines()[mark:])
    )
    assert took < 5
    assert_still_serving(setup.mirror, mark)


def test_overlong_blob_body_is_cut_at_content_length(
    tmp_path: Path, catalog: Catalog, rig: Callable[..., Rig]
) -> None:
    """
    A blob answered with the right Content-Length but followed by 1 MiB
    more (starting with a forged HTTP response, on a connection left open):
    the mirror serves and caches exactly the announced, verified bytes, and
    the forged response never answers a later request (the tag and the
    other blobs still come out right).
    """
    image = catalog.small
    layer = image.layers[0]
    plan = Plan(tmp_path / "plan")
    plan.image(image)
    plan.mode(image.repository, mode="overlong", extra=1 << 20, digest=layer.digest)
    setup = rig(plan)
    mark = log_mark(setup.mirror)
    port = setup.mirror.port
    first = stream(port, f"/v2/{image.repository}/blobs/{layer.digest}")
    assert (first.status, first.complete, first.body) == (200, True, layer.data)
    for _ in range(3):
        tag = http_request(
            port,
            "GET",
            f"/v2/{image.repository}/manifests/{image.tag}",
            {"Accept": MANIFEST_ACCEPT},
        )
        assert tag.status == 200
        assert tag.header("Docker-Content-Digest") == image.root.digest
        assert tag.body == image.root.data
        for blob in image.blobs:
            got = http_request(
                port, "GET", f"/v2/{image.repository}/blobs/{blob.digest}"
            )
            assert (got.status, got.body) == (200, blob.data), blob.digest
    assert not cache_problems(setup.mirror)
    assert layer.digest in setup.mirror.cached_blobs()
    assert_still_serving(setup.mirror, mark)


def test_endless_chunked_blob_never_served_as_complete(
    tmp_path: Path, catalog: Catalog, rig: Callable[..., Rig]
) -> None:
    """
    A blob sent chunked, without Content-Length: its bytes, then random
    bytes at 8 MiB/s, cut after 12 MiB.  The client never receives a
    complete body (the stream breaks), the blob is not cached and the spool
    is emptied; the mirror goes on serving.  (What the mirror does meanwhile
    is printed: it has no size bound for such a body.)
    """
    image = catalog.small
    layer = image.layers[0]
    plan = Plan(tmp_path / "plan")
    plan.image(image)
    cap = 12 << 20
    plan.mode(
        image.repository, mode="endless", rate=8 << 20, cap=cap, digest=layer.digest
    )
    setup = rig(plan)
    mark = log_mark(setup.mirror)
    result = stream(
        setup.mirror.port, f"/v2/{image.repository}/blobs/{layer.digest}", timeout=15
    )
    print(
        f"\nendless chunked blob of {layer.size} real bytes: client got status "
        f"{result.status}, {len(result.body)} bytes in {result.elapsed:.1f}s, "
        f"complete={result.complete}, ended by {result.error}"
    )
    assert not (result.status == 200 and result.complete), (
        f"a complete 200 of {len(result.body)} bytes for a {layer.size}-byte blob"
    )
    no_complete_wrong_blob(result, layer.digest)
    setup.mirror.wait_for_log(rf"download of {layer.digest} from hostile failed")
    wait_for_empty_spool(setup.mirror)
    assert_not_cached(setup.mirror, layer.digest)
    assert not cache_problems(setup.mirror)
    assert_still_serving(setup.mirror, mark)


def test_blob_shorter_than_content_length_is_not_served_complete(
    tmp_path: Path, catalog: Catalog, rig: Callable[..., Rig]
) -> None:
    """
    A blob whose Content-Length announces 1000 bytes more than are sent
    before the connection closes (and whose resumption is refused with
    416): the client's stream breaks, nothing is cached, the mirror goes on
    serving.
    """
    image = catalog.small
    layer = image.layers[0]
    plan = Plan(tmp_path / "plan")
    plan.image(image)
    plan.mode(image.repository, mode="short", missing=1000, digest=layer.digest)
    setup = rig(plan)
    mark = log_mark(setup.mirror)
    result = stream(setup.mirror.port, f"/v2/{image.repository}/blobs/{layer.digest}")
    assert result.status in (200, 502), result
    assert not (result.status == 200 and result.complete), result
    if result.status == 502:
        assert json.loads(result.body)["errors"][0]["code"] == "UNAVAILABLE"
    setup.mirror.wait_for_log(rf"download of {layer.digest} from hostile failed")
    wait_for_empty_spool(setup.mirror)
    assert_not_cached(setup.mirror, layer.digest)
    assert_still_serving(setup.mirror, mark)


def test_blob_with_wrong_bytes_is_taken_from_the_origin(
    tmp_path: Path,
    catalog: Catalog,
    upstream: RegistryProcess,
    rig: Callable[..., Rig],
) -> None:
    """
    The first upstream serves a blob with one byte flipped (same length,
    so only the digest can tell): no client ever gets it as complete, and
    within three attempts a client gets the right bytes from the origin,
    which has them.
    """
    image = catalog.small
    layer = image.layers[0]
    plan = Plan(tmp_path / "plan")
    plan.image(image)
    plan.mode(image.repository, mode="corrupt", digest=layer.digest)
    setup = rig(plan, origin=upstream)
    mark = log_mark(setup.mirror)
    path = f"/v2/{image.repository}/blobs/{layer.digest}"
    outcomes = []
    for _ in range(3):
        result = stream(setup.mirror.port, path)
        no_complete_wrong_blob(result, layer.digest)
        outcomes.append(
            (result.status, result.complete, len(result.body), result.error)
        )
        if result.status == 200 and result.complete:
            break
        wait_for_empty_spool(setup.mirror)
    assert outcomes[-1][:2] == (200, True), (
        f"three attempts, never the right bytes, although the origin has them: "
        f"{outcomes}; the first upstream was asked "
        f"{len(setup.hostile.requests_for(layer.digest))} times, the origin "
        f"{upstream.count_blob_gets(layer.digest)} times"
    )
    assert not cache_problems(setup.mirror)
    assert_still_serving(setup.mirror, mark)


def test_a_response_the_mirror_breaks_has_its_access_line(
    tmp_path: Path, catalog: Catalog, rig: Callable[..., Rig]
) -> None:
    """
    A blob whose only upstream serves wrong bytes: the mirror breaks the
    client's response at the end (the digest does not match), and that
    request had no access line.  It has one, with the status sent, the
    bytes written (the last held back) and ``aborted``.
    """
    image = catalog.small
    layer = image.layers[0]
    plan = Plan(tmp_path / "plan")
    plan.image(image)
    plan.mode(image.repository, mode="corrupt", digest=layer.digest)
    setup = rig(plan)
    mark = log_mark(setup.mirror)
    path = f"/v2/{image.repository}/blobs/{layer.digest}"
    result = stream(setup.mirror.port, path)
    assert not result.complete, result
    (line,) = setup.mirror.wait_for_log(re.escape(f'"GET {path} HTTP/1.1" '))
    assert line.endswith(" aborted"), line
    status, sent = re.findall(r'HTTP/1.1" (\d+) (\d+) ', line)[0]
    assert status == "200" and int(sent) < layer.size, line
    assert " cache=miss upstream=hostile " in line, line
    assert_still_serving(setup.mirror, mark)


def test_redirect_loop_gives_up_after_five_hops(
    tmp_path: Path, catalog: Catalog, rig: Callable[..., Rig]
) -> None:
    """
    A blob that redirects to itself forever: a 502 OCI error after at most
    five redirects followed (six requests upstream), nothing cached.
    """
    image = catalog.small
    layer = image.layers[0]
    plan = Plan(tmp_path / "plan")
    plan.image(image)
    plan.mode(image.repository, mode="loop")
    setup = rig(plan)
    mark = log_mark(setup.mirror)
    response = http_request(
        setup.mirror.port,
        "GET",
        f"/v2/{image.repository}/blobs/{layer.digest}",
        timeout=15,
    )
    assert (response.status, response.error_codes()) == (502, ["UNAVAILABLE"])
    asked = setup.hostile.requests_for(layer.digest)
    assert 1 < len(asked) <= 6, asked
    assert_not_cached(setup.mirror, layer.digest)
    assert_still_serving(setup.mirror, mark)


#: Redirect targets no upstream may send the mirror to.  Each is reached, if
#: the mirror fails to refuse it, only as a request to the test proxy, which
#: never connects anywhere but 127.0.0.1.
OTHER_SCHEMES = [
    "ftp://127.0.0.1:21/blob",
    "file:///etc/passwd",
    "gopher://127.0.0.1:70/_stats",
    "dict://127.0.0.1:11211/stats",
    "ldap://127.0.0.1/o=x",
    "data:application/octet-stream;base64,aGVsbG8=",
    "javascript:alert(1)",
    "jar:http://127.0.0.1/x.jar!/y",
]
METADATA_LITERALS = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "https://169.254.169.254/latest/meta-data/",
    "http://169.254.169.254:8080/",
    "http://user:pass@169.254.169.254/",
    "//169.254.169.254/latest/meta-data/",
    "http://169.254.170.2/v2/credentials/",
    "http://[fe80::a9fe:a9fe]/latest/meta-data/",
    "http://[fe80::a9fe:a9fe%25eth0]/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://100.100.100.200/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://METADATA.GOOGLE.INTERNAL./computeMetadata/v1/",
    "http://metadata/computeMetadata/v1/",
]
METADATA_ENCODED = [
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
    "http://2852039166/latest/meta-data/",
    "http://0xa9fea9fe/latest/meta-data/",
    "http://0xa9.0xfe.0xa9.0xfe/latest/meta-data/",
    "http://0251.0376.0251.0376/latest/meta-data/",
    "http://169.254.43518/latest/meta-data/",
]
REDIRECTS = OTHER_SCHEMES + METADATA_LITERALS + METADATA_ENCODED


@dataclass
class RedirectRig:
    mirror: MirrorProcess
    hostile: HostileUpstream
    proxy: ConnectProxy
    layer: Blob


@pytest.fixture(scope="module")
def redirect_rig(
    tmp_path_factory: pytest.TempPathFactory, catalog: Catalog
) -> Iterator[RedirectRig]:
    """
    A hostile upstream answering blob GETs of ``redirect/N`` with a 302 to
    ``REDIRECTS[N]``, reached through the test proxy (which refuses every
    target but 127.0.0.1 and records what it was asked), and one mirror in
    front of it whose breaker never opens.
    """
    root = tmp_path_factory.mktemp("redirects")
    plan = Plan(root / "plan")
    layer = catalog.small.layers[0]
    plan.blob(layer.data)
    for number, location in enumerate(REDIRECTS):
        plan.mode(f"redirect/{number}", mode="redirect", location=location)
    hostile = HostileUpstream(root / "hostile", plan)
    proxy = ConnectProxy(root / "proxy")
    started: list[Any] = []
    try:
        for program in (hostile, proxy):
            program.start()
            started.append(program)
        port = free_port()
        config = mirror_config_upstreams(
            port,
            {
                "hostile": {
                    "url": hostile.url,
                    "proxy": proxy.url,
                    "breaker_failures": "1000",
                    "breaker_backoff": "1s",
                }
            },
            origin="hostile",
        )
        mirror = MirrorProcess(root / "mirror", config, port)
        mirror.start()
        started.append(mirror)
        yield RedirectRig(mirror, hostile, proxy, layer)
        # Tracebacks are each test's own business (assert_still_serving).
        assert mirror.returncode is None, mirror.log()
    finally:
        for program in reversed(started):
            program.stop()


def _check_refused_redirect(setup: RedirectRig, location: str, why: str) -> None:
    number = REDIRECTS.index(location)
    mark = log_mark(setup.mirror)
    proxy_mark = len(setup.proxy.records())
    before = setup.mirror.cache_listing()
    path = f"/v2/redirect/{number}/blobs/{setup.layer.digest}"
    response = http_request(setup.mirror.port, "GET", path, timeout=15)
    assert setup.hostile.requests_for(f"/v2/redirect/{number}/blobs/"), "not asked"
    hostile_host = setup.hostile.url.removeprefix("http://")
    strays = [
        r for r in setup.proxy.records()[proxy_mark:] if hostile_host not in r["target"]
    ]
    assert not strays, (
        f"the redirect to {location} was followed: the proxy was asked for {strays} "
        f"(status {response.status}); mirror log:\n"
        + "\n".join(setup.mirror.log_lines()[mark:])
    )
    assert response.status == 502 and response.error_codes() == ["UNAVAILABLE"], (
        f"{location}: {response.status} {response.body!r}; mirror log:\n"
        + "\n".join(setup.mirror.log_lines()[mark:])
    )
    refusals = [x for x in setup.mirror.log_lines()[mark:] if re.search(why, x)]
    assert refusals, "\n".join(setup.mirror.log_lines()[mark:])
    assert setup.mirror.cache_listing() == before
    assert_still_serving(setup.mirror, mark)


@pytest.mark.parametrize("location", OTHER_SCHEMES)
def test_redirect_to_other_scheme_refused(
    redirect_rig: RedirectRig, location: str
) -> None:
    """
    A blob redirect to ``ftp:``, ``file:``, ``gopher:``, ``dict:``,
    ``ldap:``, ``data:``, ``javascript:`` or ``jar:``: refused without any
    request (log: "scheme that is not allowed"), a 502 OCI error, nothing
    cached.
    """
    _check_refused_redirect(redirect_rig, location, r"scheme that is not allowed")


@pytest.mark.parametrize("location", METADATA_LITERALS)
def test_redirect_to_metadata_address_refused_before_connecting(
    redirect_rig: RedirectRig, location: str
) -> None:
    """
    A blob redirect to a cloud metadata service (169.254.169.254 over http
    or https, with a port or user info, scheme-relative, ECS's
    169.254.170.2, IPv6 link-local with and without a zone, fd00:ec2::254,
    100.100.100.200, metadata.google.internal in any case with a trailing
    dot, ``metadata``): refused before any connection (log: "denied host"),
    a 502 OCI error, nothing cached.
    """
    _check_refused_redirect(redirect_rig, location, r"denied host")


@pytest.mark.parametrize("location", METADATA_ENCODED)
def test_redirect_to_encoded_metadata_address_refused(
    redirect_rig: RedirectRig, location: str
) -> None:
    """
    The same metadata address written the other ways a resolver accepts
    (IPv4-mapped IPv6, one decimal or hex number, hex or octal octets,
    ``a.b.c`` short form, all of which ``getaddrinfo`` turns into
    169.254.169.254): refused before any connection, like the dotted quad.
    """
    _check_refused_redirect(redirect_rig, location, r"denied host")


#: Redirect targets on the mirror's own machine and its private networks
#: (issue 16, item 7), for an upstream named by a host name (so that none of
#: them is its own host).  ``{port}`` is the hostile upstream's own port:
#: the proxy would reach it there at 127.0.0.1, had the mirror followed.
LOOPBACK_REDIRECTS = [
    "http://127.0.0.1:{port}/v2/plain/blobs/{digest}",
    "HTTP://127.0.0.1:{port}/v2/plain/blobs/{digest}",
    "https://127.0.0.1:{port}/v2/plain/blobs/{digest}",
    "//127.0.0.1:{port}/v2/plain/blobs/{digest}",
    "http://127.0.0.2:{port}/v2/plain/blobs/{digest}",
    "http://localhost:{port}/v2/plain/blobs/{digest}",
    "http://LOCALHOST.:{port}/v2/plain/blobs/{digest}",
    "http://registry.localhost:{port}/v2/plain/blobs/{digest}",
    "http://[::1]:{port}/v2/plain/blobs/{digest}",
    "http://[::ffff:127.0.0.1]:{port}/v2/plain/blobs/{digest}",
    "http://[::ffff:7f00:1]:{port}/v2/plain/blobs/{digest}",
    "http://[::127.0.0.1]:{port}/v2/plain/blobs/{digest}",
    "http://0.0.0.0:{port}/v2/plain/blobs/{digest}",
    "http://0:{port}/v2/plain/blobs/{digest}",
    "http://[::]:{port}/v2/plain/blobs/{digest}",
    "http://2130706433:{port}/v2/plain/blobs/{digest}",
    "http://0x7f000001:{port}/v2/plain/blobs/{digest}",
    "http://0x7f.1:{port}/v2/plain/blobs/{digest}",
    "http://0177.0.0.1:{port}/v2/plain/blobs/{digest}",
    "http://127.1:{port}/v2/plain/blobs/{digest}",
]
PRIVATE_REDIRECTS = [
    "http://10.0.0.1/v2/plain/blobs/{digest}",
    "http://172.16.0.1/v2/plain/blobs/{digest}",
    "http://192.168.1.1/v2/plain/blobs/{digest}",
    "http://0xc0a80101/v2/plain/blobs/{digest}",
    "http://100.64.0.1/v2/plain/blobs/{digest}",
    "http://[fc00::1]/v2/plain/blobs/{digest}",
    "http://[fd12:3456::1]/v2/plain/blobs/{digest}",
    "http://[::ffff:10.0.0.1]/v2/plain/blobs/{digest}",
    "http://[64:ff9b::a00:1]/v2/plain/blobs/{digest}",
    "http://[2002:c0a8:101::1]/v2/plain/blobs/{digest}",
]
#: Locations no URL parser takes (an unclosed or bad IPv6 bracket).
MALFORMED_REDIRECTS = [
    "http://[::1",
    "http://[::1/v2/plain/blobs/{digest}",
    "http://[zz]/v2/plain/blobs/{digest}",
    "http://[127.0.0.1]:{port}/v2/plain/blobs/{digest}",
]
#: The upstream's own host, however written: followed.
OWN_HOST_REDIRECTS = [
    "http://registry.test:{port}/v2/plain/blobs/{digest}",
    "http://REGISTRY.Test.:{port}/v2/plain/blobs/{digest}",
]
#: Token realms the upstream's challenges name: refused like redirects.
PRIVATE_REALMS = [
    "http://127.0.0.1:{port}/token",
    "http://localhost:{port}/token",
    "http://[::1]:{port}/token",
    "http://[::ffff:127.0.0.1]:{port}/token",
    "http://2130706433:{port}/token",
    "http://10.0.0.1/token",
    "http://169.254.169.254/token",
]
#: The hostile upstream's name: the proxy reaches it at 127.0.0.1.
REGISTRY_NAME = "registry.test"


@dataclass
class PrivateRig:
    mirror: MirrorProcess
    hostile: HostileUpstream
    proxy: ConnectProxy
    layer: Blob
    #: one blob for each of OWN_HOST_REDIRECTS (a cached one is not fetched)
    own: list[bytes]


@pytest.fixture(scope="module")
def private_rig(
    tmp_path_factory: pytest.TempPathFactory, catalog: Catalog
) -> Iterator[PrivateRig]:
    """
    A hostile upstream configured as ``http://registry.test:PORT`` (a name,
    so that no loopback or private address is its own host), reached
    through the test proxy, which knows that name as 127.0.0.1 and records
    every target it is asked for; blob GETs of ``loopback/N``,
    ``private/N`` and ``own/N`` redirect to the lists above, manifest and
    blob requests of ``realm/N`` are challenged with ``PRIVATE_REALMS[N]``.
    """
    root = tmp_path_factory.mktemp("private")
    plan = Plan(root / "plan")
    layer = catalog.small.layers[0]
    plan.blob(layer.data)
    lists = {
        "loopback": LOOPBACK_REDIRECTS,
        "private": PRIVATE_REDIRECTS,
        "malformed": MALFORMED_REDIRECTS,
    }
    for prefix, locations in lists.items():
        for number, location in enumerate(locations):
            plan.mode(
                f"{prefix}/{number}",
                mode="redirect",
                location=location.replace("{digest}", layer.digest),
            )
    own = [
        b"own host %d\n" % number * 1000 for number in range(len(OWN_HOST_REDIRECTS))
    ]
    for number, location in enumerate(OWN_HOST_REDIRECTS):
        digest = plan.blob(own[number])
        plan.mode(
            f"own/{number}",
            mode="redirect",
            location=location.replace("{digest}", digest),
        )
    for number, realm in enumerate(PRIVATE_REALMS):
        plan.mode(f"realm/{number}", mode="challenge", realm=realm)
    hostile = HostileUpstream(root / "hostile", plan)
    proxy = ConnectProxy(root / "proxy", aliases=[REGISTRY_NAME])
    started: list[Any] = []
    try:
        for program in (hostile, proxy):
            program.start()
            started.append(program)
        port = free_port()
        config = mirror_config_upstreams(
            port,
            {
                "hostile": {
                    "url": f"http://{REGISTRY_NAME}:{hostile.port}",
                    "proxy": proxy.url,
                    "breaker_failures": "1000",
                    "breaker_backoff": "1s",
                }
            },
            origin="hostile",
        )
        mirror = MirrorProcess(root / "mirror", config, port)
        mirror.start()
        started.append(mirror)
        yield PrivateRig(mirror, hostile, proxy, layer, own)
        assert mirror.returncode is None, mirror.log()
    finally:
        for program in reversed(started):
            program.stop()


def _asked_of_the_proxy(setup: PrivateRig, mark: int) -> list[str]:
    return [str(r["target"]) for r in setup.proxy.records()[mark:]]


def _check_refused_private(
    setup: PrivateRig, path: str, asked: str, why: str = "denied host"
) -> None:
    """
    *path* leads the mirror elsewhere than the upstream's own host: 502
    ``UNAVAILABLE`` after one request to the upstream (for *asked*), no
    other target ever asked of the proxy, *why* in the log, nothing cached.
    """
    mark = log_mark(setup.mirror)
    proxy_mark = len(setup.proxy.records())
    before = setup.mirror.cache_listing()
    response = http_request(setup.mirror.port, "GET", path, timeout=15)
    targets = _asked_of_the_proxy(setup, proxy_mark)
    log = "\n".join(setup.mirror.log_lines()[mark:])
    own = f"{REGISTRY_NAME}:{setup.hostile.port}"
    assert any(asked in t for t in targets), f"not asked: {targets}"
    strays = [t for t in targets if own not in t]
    assert not strays, f"followed: the proxy was asked for {strays}; log:\n{log}"
    assert (response.status, response.error_codes()) == (502, ["UNAVAILABLE"]), (
        f"{response.status} {response.body!r}; log:\n{log}"
    )
    assert re.search(why, log), log
    assert setup.mirror.cache_listing() == before
    assert_still_serving(setup.mirror, mark)


@pytest.mark.parametrize("number", range(len(LOOPBACK_REDIRECTS)))
def test_redirect_to_loopback_refused_before_connecting(
    private_rig: PrivateRig, number: int
) -> None:
    """
    A blob redirect to the mirror's own machine, the hostile upstream's own
    port included: 127.0.0.1 with any case of the scheme, https or
    scheme-relative; 127.0.0.2; ``localhost`` (any case, trailing dot) and
    a name under it; ``::1``; IPv4-mapped (both spellings) and
    IPv4-compatible IPv6; ``0.0.0.0``, ``0`` and ``::``; decimal, hex, short
    and octal IPv4: refused before any connection, a 502, nothing cached.
    """
    path = f"/v2/loopback/{number}/blobs/{private_rig.layer.digest}"
    _check_refused_private(private_rig, path, f"/v2/loopback/{number}/blobs/")


@pytest.mark.parametrize("number", range(len(PRIVATE_REDIRECTS)))
def test_redirect_to_private_network_refused_before_connecting(
    private_rig: PrivateRig, number: int
) -> None:
    """
    A blob redirect into a private network (RFC 1918 in dotted and hex
    form, the shared ``100.64.0.0/10``, unique local IPv6, and private IPv4
    inside IPv6: mapped, NAT64, 6to4): refused before any connection.
    """
    path = f"/v2/private/{number}/blobs/{private_rig.layer.digest}"
    _check_refused_private(private_rig, path, f"/v2/private/{number}/blobs/")


@pytest.mark.parametrize("number", range(len(MALFORMED_REDIRECTS)))
def test_redirect_to_a_malformed_url_is_an_upstream_failure(
    private_rig: PrivateRig, number: int
) -> None:
    """
    A blob redirect to a URL no parser takes (an unclosed IPv6 bracket, a
    bracket that holds no IPv6 address): a 502 naming the unparsable URL in
    the log, no traceback, nothing asked of anyone else.
    """
    path = f"/v2/malformed/{number}/blobs/{private_rig.layer.digest}"
    _check_refused_private(
        private_rig, path, f"/v2/malformed/{number}/blobs/", "cannot be parsed"
    )


@pytest.mark.parametrize("number", range(len(OWN_HOST_REDIRECTS)))
def test_redirect_to_the_upstreams_own_host_is_followed(
    private_rig: PrivateRig, number: int
) -> None:
    """A blob redirect to the upstream's own host name, another path, any
    case, a trailing dot: followed, and the blob served whole."""
    setup = private_rig
    mark = log_mark(setup.mirror)
    proxy_mark = len(setup.proxy.records())
    blob = setup.own[number]
    path = f"/v2/own/{number}/blobs/{sha256_digest(blob)}"
    response = http_request(setup.mirror.port, "GET", path, timeout=15)
    log = "\n".join(setup.mirror.log_lines()[mark:])
    assert response.status == 200, f"{response.status}; log:\n{log}"
    assert response.body == blob
    targets = _asked_of_the_proxy(setup, proxy_mark)
    assert any("/v2/plain/blobs/" in t for t in targets), targets
    assert_still_serving(setup.mirror, mark)


@pytest.mark.parametrize("number", range(len(PRIVATE_REALMS)))
def test_token_realm_on_loopback_or_private_address_refused(
    private_rig: PrivateRig, number: int
) -> None:
    """
    A challenge naming a token realm on loopback (``127.0.0.1``,
    ``localhost``, ``::1``, IPv4-mapped, decimal), a private network or a
    metadata service: no token is asked for anywhere (the proxy sees only
    the challenged request), a 502 or 503 OCI error, "denied host" logged.
    """
    setup = private_rig
    mark = log_mark(setup.mirror)
    proxy_mark = len(setup.proxy.records())
    path = f"/v2/realm/{number}/manifests/latest"
    response = http_request(
        setup.mirror.port, "GET", path, {"Accept": MANIFEST_ACCEPT}, timeout=15
    )
    log = "\n".join(setup.mirror.log_lines()[mark:])
    targets = _asked_of_the_proxy(setup, proxy_mark)
    own = f"{REGISTRY_NAME}:{setup.hostile.port}"
    assert targets and all(own in t and "/token" not in t for t in targets), targets
    assert response.status in (502, 503), f"{response.status}; log:\n{log}"
    assert response.error_codes() == ["UNAVAILABLE"], response.body
    assert re.search("denied host", log), log
    assert_still_serving(setup.mirror, mark)


#: What an upstream may serve as a list, and what the mirror must answer:
#: (repository, body, Content-Type, endpoint, status the client gets).
PAGE = "<html><body><script>alert(document.cookie)</script></body></html>"
LISTINGS = [
    ("list/html", PAGE, "text/html", "tags/list", 502),
    ("list/html-as-json", PAGE, "application/json", "tags/list", 502),
    ("list/array", '["v1","<b>v2</b>"]', "application/json", "tags/list", 502),
    ("list/tags-text", '{"name":"x","tags":"<b>"}', "text/html", "tags/list", 502),
    ("list/good-as-html", '{"name":"x","tags":["v1"]}', "text/html", "tags/list", 200),
    ("list/referrers-html", PAGE, "text/html", "referrers", 502),
    ("list/referrers-as-index", PAGE, OCI_INDEX, "referrers", 502),
    (
        "list/referrers-good-as-html",
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}),
        "text/html",
        "referrers",
        200,
    ),
]


def test_lists_go_out_only_as_json_the_mirror_wrote(
    tmp_path: Path, rig: Callable[..., Rig]
) -> None:
    """
    ``tags/list`` and referrers answers from an upstream that serves a page
    (as ``text/html`` or claiming JSON), JSON that is no tag list, or a
    real list labelled ``text/html`` (issue 16, item 7): the client gets
    either a 502 ``UNAVAILABLE`` OCI error or the list, always as
    ``application/json`` (the OCI index type for referrers) with
    ``X-Content-Type-Options: nosniff``, and never the page's bytes.
    """
    plan = Plan(tmp_path / "plan")
    for repository, body, content_type, _, _ in LISTINGS:
        plan.mode(repository, mode="listing", body=body, type=content_type)
    setup = rig(plan)
    mark = log_mark(setup.mirror)
    subject = "sha256:" + "a" * 64
    outcomes = []
    for repository, _, _, endpoint, status in LISTINGS:
        path = f"/v2/{repository}/" + (
            "tags/list" if endpoint == "tags/list" else f"referrers/{subject}"
        )
        response = http_request(setup.mirror.port, "GET", path, timeout=15)
        kind = response.headers.get("Content-Type")
        outcomes.append((repository, response.status, kind, response.body[:80]))
        assert response.status == status, outcomes[-1]
        assert b"<script>" not in response.body, outcomes[-1]
        if status == 200:
            expected = "application/json" if endpoint == "tags/list" else OCI_INDEX
            assert kind == expected, outcomes[-1]
            assert response.headers.get("X-Content-Type-Options") == "nosniff"
            json.loads(response.body)
        else:
            assert kind == "application/json", outcomes[-1]
            assert response.error_codes() == ["UNAVAILABLE"], outcomes[-1]
    assert_still_serving(setup.mirror, mark)


def _gzip_bomb(expanded: int) -> bytes:
    """gzip of *expanded* zero bytes (about 1/1000 of that)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"\0" * (1 << 20)
    parts = [compressor.compress(zeros) for _ in range(expanded >> 20)]
    return b"".join(parts) + compressor.flush()


def test_gzip_encoded_blob_passes_through_undecompressed(
    tmp_path: Path, rig: Callable[..., Rig]
) -> None:
    """
    A blob (a gzip stream that expands to 128 MiB) served with
    ``Content-Encoding: gzip``: the blob's digest is that of the compressed
    bytes, so the mirror must pass them through as they are: the client gets
    exactly those bytes, the cache holds them verified, and the mirror's
    peak memory (VmHWM) grows by less than 32 MiB.
    """
    bomb = _gzip_bomb(128 << 20)
    plan = Plan(tmp_path / "plan")
    digest = plan.blob(bomb)
    plan.mode("test/bomb", mode="gzip")
    setup = rig(plan)
    mark = log_mark(setup.mirror)
    pid = pid_of(setup.mirror)
    peak_before = proc_status(pid)["VmHWM"]
    result = stream(
        setup.mirror.port, f"/v2/test/bomb/blobs/{digest}", timeout=30, limit=8 << 20
    )
    poll_until(
        lambda: setup.mirror.metric("regmirror_downloads_in_flight") == 0,
        timeout=60,
        describe=lambda: setup.mirror.log(),
    )
    wait_for_empty_spool(setup.mirror, timeout=60)
    peak_after = proc_status(pid)["VmHWM"]
    asked = setup.hostile.requests_for(digest)
    encodings = sorted({str(r["accept_encoding"]) for r in asked})
    summary = (
        f"gzip bomb of {len(bomb)} bytes ({digest}): client got status "
        f"{result.status}, {len(result.body)} bytes, complete={result.complete}, "
        f"{result.error}; mirror VmHWM {peak_before} -> {peak_after} KiB; the "
        f"mirror sent Accept-Encoding {encodings}"
    )
    print("\n" + summary)
    no_complete_wrong_blob(result, digest)
    assert (result.status, result.complete) == (200, True), summary
    assert result.body == bomb, summary
    assert (peak_after - peak_before) < 32 * 1024, summary
    assert setup.mirror.cached_blobs().get(digest) == digest, summary
    assert_still_serving(setup.mirror, mark)


def _ambiguous(catalog: Catalog) -> bytes:
    """A document that is both a manifest and an index (CVE-2021-41190)."""
    small = json.loads(catalog.small.root.data)
    index = json.loads(catalog.multi.root.data)
    small.pop("mediaType", None)
    small["manifests"] = index["manifests"]
    return canonical_json(small)


@pytest.mark.parametrize(
    "case", ["says-manifest-is-index", "says-index-is-manifest", "ambiguous"]
)
def test_manifest_lying_about_its_media_type(
    tmp_path: Path, catalog: Catalog, rig: Callable[..., Rig], case: str
) -> None:
    """
    A manifest whose Content-Type contradicts its own ``mediaType`` (an
    index served as an OCI manifest, a manifest served as an index), or a
    document with both ``layers`` and ``manifests`` and no ``mediaType``:
    the mirror either refuses it (502, nothing cached) or serves the exact
    bytes under the media type the document itself declares; never under a
    type its own body contradicts, and never an ambiguous document.
    """
    if case == "says-manifest-is-index":
        body, content_type, declared = catalog.multi.root.data, OCI_MANIFEST, OCI_INDEX
    elif case == "says-index-is-manifest":
        body, content_type, declared = catalog.small.root.data, OCI_INDEX, OCI_MANIFEST
    else:
        body, content_type, declared = _ambiguous(catalog), OCI_MANIFEST, None
    plan = Plan(tmp_path / "plan")
    digest = plan.manifest(body, content_type, "lies/app", "v1")
    setup = rig(plan)
    mark = log_mark(setup.mirror)
    outcomes = []
    for reference in (digest, "v1"):
        response = http_request(
            setup.mirror.port,
            "GET",
            f"/v2/lies/app/manifests/{reference}",
            {"Accept": MANIFEST_ACCEPT},
        )
        outcomes.append(
            f"{reference}: {response.status} Content-Type "
            f"{response.header('Content-Type')}"
        )
        if response.status == 502:
            assert response.error_codes() == ["UNAVAILABLE"]
            continue
        assert response.status == 200, response
        assert response.body == body
        assert declared is not None and response.header("Content-Type") == declared, (
            f"{case}: served as {response.header('Content-Type')} although the "
            f"document declares {declared}; outcomes {outcomes}"
        )
    print(f"\nmedia type lie {case}: {outcomes}")
    manifest_file = (
        setup.mirror.cache_dir / "manifests" / "sha256" / digest[7:9] / digest[7:]
    )
    if manifest_file.exists():
        assert manifest_file.read_text().strip() == declared
    assert_still_serving(setup.mirror, mark)


# -- part 3: faults ------------------------------------------------------------------


def test_upstream_sigkilled_mid_stream(
    tmp_path: Path,
    catalog: Catalog,
    seeded_storage: Path,
    start_program: StartProgram,
    start_mirror: StartMirror,
) -> None:
    """
    The upstream ``docker-registry`` is killed with SIGKILL while the
    40 MiB layer streams through the mirror (throttled to 16 MiB/s so that
    the kill lands mid-transfer): the client's stream breaks (it never gets
    a complete wrong blob), the cache holds only verified files and an empty
    spool, the mirror goes on serving; once the registry is back on the
    same port the blob comes through whole and right.
    """
    image = catalog.big
    layer = image.layers[0]
    registry = RegistryProcess(seeded_storage, tmp_path / "registry")
    registry.start()
    try:
        relay = start_program(
            ThrottleRelay(tmp_path / "relay", registry.port, 16 << 20)
        )
        mirror = start_mirror(
            lambda port: mirror_config_upstreams(
                port,
                {"origin": {"url": relay.url, "breaker_backoff": "1s"}},
                origin="origin",
            )
        )
        mark = log_mark(mirror)
        path = f"/v2/{image.repository}/blobs/{layer.digest}"
        progress = threading.Event()
        outcome: list[Streamed] = []

        def pull() -> None:
            outcome.append(
                stream(
                    mirror.port,
                    path,
                    timeout=30,
                    on_bytes=lambda n: progress.set() if n >= 4 << 20 else None,
                )
            )

        client = threading.Thread(target=pull, daemon=True)
        client.start()
        assert progress.wait(timeout=20), "the blob did not start streaming"
        killed_process = registry._process  # noqa: SLF001
        assert killed_process is not None
        killed_process.send_signal(signal.SIGKILL)
        killed_process.wait(timeout=10)
        client.join(timeout=40)
        assert not client.is_alive() and outcome, "the client never finished"
        result = outcome[0]
        print(
            f"\nSIGKILL mid-stream: client got {len(result.body)} of {layer.size} "
            f"bytes in {result.elapsed:.1f}s, complete={result.complete}, "
            f"ended by {result.error}"
        )
        no_complete_wrong_blob(result, layer.digest)
        assert not result.complete or result.body == layer.data
        mirror.wait_for_log(rf"download of {layer.digest} from origin failed")
        wait_for_empty_spool(mirror)
        assert not cache_problems(mirror)
        assert_not_cached(mirror, layer.digest)
        assert_still_serving(mirror, mark)
    finally:
        registry.stop()

    revived = RegistryProcess(seeded_storage, tmp_path / "registry")
    revived.port = registry.port
    revived.start()
    try:
        # The breaker (back-off 1 s) lets a probe through soon: retry until then.
        attempts: list[tuple[int, bool, int]] = []

        def pulled() -> bool:
            result = stream(mirror.port, path, timeout=30)
            attempts.append((result.status, result.complete, len(result.body)))
            no_complete_wrong_blob(result, layer.digest)
            return result.complete and result.body == layer.data

        poll_until(
            pulled,
            timeout=20,
            interval=0.25,
            describe=lambda: f"never pulled after the restart: {attempts}",
        )
        assert mirror.cached_blobs().get(layer.digest) == layer.digest
        assert not cache_problems(mirror)
        assert_still_serving(mirror, mark)
    finally:
        revived.stop()


def test_corrupted_cache_file_found_and_removed_by_verify(
    catalog: Catalog, mirror: MirrorProcess
) -> None:
    """
    A byte flipped in a cached blob's file: ``regmirror cache verify``
    finds it, reports it and removes it, leaving the sound files; the next
    request fetches the blob again and serves the right bytes.  (Whether
    the mirror serves the corrupt file before ``verify`` runs is printed:
    files are verified when written, not on every read.)
    """
    image = catalog.small
    layer = max(image.layers, key=lambda b: b.size)
    path = f"/v2/{image.repository}/blobs/{layer.digest}"
    assert mirror.request("GET", path).body == layer.data
    for blob in image.blobs:
        assert (
            mirror.request("GET", f"/v2/{image.repository}/blobs/{blob.digest}").status
            == 200
        )
    cached = (
        mirror.cache_dir / "blobs" / "sha256" / layer.digest[7:9] / layer.digest[7:]
    )
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0x01
    cached.write_bytes(bytes(data))

    served = mirror.request("GET", path)
    served_corrupt = served.body != layer.data
    print(
        f"\ncorrupt cache file: the mirror answered {served.status} with "
        f"{'the CORRUPT bytes' if served_corrupt else 'the right bytes'} before verify"
    )

    verify = subprocess.run(
        [
            sys.executable,
            "-m",
            "regmirror.cli",
            "cache",
            "verify",
            "-c",
            str(mirror.config_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    report = json.loads(verify.stdout)
    assert layer.digest in report["corrupt"], (verify.stdout, verify.stderr)
    assert report["corrupt"] == [layer.digest], report
    assert not cached.exists(), "verify left the corrupt file in place"
    others = {b.digest for b in image.blobs if b.digest != layer.digest}
    assert others <= set(mirror.cached_blobs()), "verify removed sound files"

    again = mirror.request("GET", path)
    assert (again.status, again.body) == (200, layer.data)
    assert mirror.cached_blobs().get(layer.digest) == layer.digest
    assert not cache_problems(mirror)


# -- part 1 (last): slowloris ----------------------------------------------------
# Placed last: the observation started with the ``target`` fixture has been
# running beside every test above, so only the remainder is waited for here.


def test_slowloris_silent_connections_do_not_block_others(target: Target) -> None:
    """
    Three connections that send a partial request line (``GET /v2/ HTT``)
    and then nothing: every other client meanwhile (a probe each second,
    and all the tests above) is served promptly, and the mirror closes the
    silent connections by its idle timeout (Twisted's 60 s), not never.
    """
    seen = target.slowloris.outcome()
    print("\nslowloris: " + seen.summary())
    assert seen.probes >= 10, seen.summary()
    assert not seen.probe_failures, seen.summary()
    assert seen.slowest_probe < 2.0, seen.summary()
    assert len(seen.silent_closed) == Slowloris.SILENT, seen.summary()
    assert max(seen.silent_closed) < 70, seen.summary()
    assert_still_serving(target.mirror)


def test_slowloris_dripping_request_head_is_cut(target: Target) -> None:
    """
    A connection that drips its request head one byte every two seconds and
    never finishes it, whether the drip is in a header or in the request
    line itself, is cut by a header timeout no longer than the idle timeout
    (60 s), like a silent one; without such a timeout every byte resets the
    idle timer and the connection is held for as long as the client likes
    (16 KiB of head at one byte per 59 s is eleven days).
    """
    seen = target.slowloris.outcome()
    assert len(seen.silent_closed) == Slowloris.SILENT, seen.summary()
    limit = max(seen.silent_closed) + Slowloris.GRACE
    for kind, closed in seen.drip_closed.items():
        assert closed is not None, f"no header timeout for {kind}: " + seen.summary()
        assert closed < limit, seen.summary()
