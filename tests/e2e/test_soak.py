"""
A bounded soak: 32 threaded clients for ``SOAK_SECONDS`` against one
mirror in front of a real ``docker-registry``, mixing cache hits, misses
(fresh blobs pushed upstream beforehand, each asked for by two clients at
once), tag checks (manifests by tag with ``tag_ttl = 0s``, so every one asks
the origin) and HEADs.  Every answer is checked byte for byte; the mirror's
resident memory and open descriptors are read from ``/proc`` before and
after and may not grow beyond small bounds.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    mirror_config,
    poll_until,
)
from .images import (
    OCI_CONFIG,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    canonical_json,
    sha256_digest,
)

pytestmark = pytest.mark.e2e

THREADS = 32
SOAK_SECONDS = 15.0
#: bounds on the loop of each client, whatever the clock says
MAX_REQUESTS_PER_CLIENT = 20_000
REPOSITORY = "soak/app"
HIT_BLOBS = 24
MISS_BLOBS = 300
TAGS = 8
RSS_GROWTH_KIB = 30 * 1024
FD_GROWTH = 20


@dataclass
class Content:
    """What the soak's repository holds upstream, by digest."""

    hits: dict[str, bytes] = field(default_factory=dict)
    misses: dict[str, bytes] = field(default_factory=dict)
    #: tag → (digest, manifest bytes)
    tags: dict[str, tuple[str, bytes]] = field(default_factory=dict)


def _push(registry: RegistryProcess, content: Content) -> None:
    """Push every blob and manifest with the registry API (monolithic PUTs)."""
    connection = http.client.HTTPConnection(LOCALHOST, registry.port, timeout=30)

    def call(
        method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response

    def blob(data: bytes) -> None:
        started = call("POST", f"/v2/{REPOSITORY}/blobs/uploads/", b"", {})
        assert started.status == 202, started.status
        location = urlsplit(started.headers["Location"])
        digest = sha256_digest(data)
        target = f"{location.path}?{location.query}&digest={digest}"
        done = call("PUT", target, data, {"Content-Type": "application/octet-stream"})
        assert done.status == 201, (done.status, digest)

    try:
        for data in (*content.hits.values(), *content.misses.values()):
            blob(data)
        for tag, (_, body) in content.tags.items():
            done = call(
                "PUT",
                f"/v2/{REPOSITORY}/manifests/{tag}",
                body,
                {"Content-Type": OCI_MANIFEST},
            )
            assert done.status == 201, (done.status, tag)
    finally:
        connection.close()


def _content() -> tuple[Content, list[bytes]]:
    """Deterministic hits, misses and tagged manifests; and the configs."""
    rng = random.Random(20241127)
    content = Content()
    for _ in range(HIT_BLOBS):
        data = rng.randbytes(rng.randrange(4 << 10, 64 << 10))
        content.hits[sha256_digest(data)] = data
    for _ in range(MISS_BLOBS):
        data = rng.randbytes(rng.randrange(1 << 10, 16 << 10))
        content.misses[sha256_digest(data)] = data
    configs = []
    layers = list(content.hits.items())
    for number in range(TAGS):
        config = canonical_json(
            {"architecture": "amd64", "os": "linux", "soak": number}
        )
        configs.append(config)
        layer_digest, layer = layers[number]
        manifest = canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": sha256_digest(config),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": OCI_LAYER_TAR,
                        "digest": layer_digest,
                        "size": len(layer),
                    }
                ],
            }
        )
        content.tags[f"t{number}"] = (sha256_digest(manifest), manifest)
    for config in configs:
        content.hits[sha256_digest(config)] = config
    return content, configs


def _vm(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open descriptors) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))


@dataclass
class Tally:
    requests: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, error: str | None) -> None:
        with self.lock:
            self.requests[kind] += 1
            if error is not None and len(self.errors) < 50:
                self.errors.append(f"{kind}: {error}")


def _client(
    number: int,
    port: int,
    content: Content,
    misses: Callable[[], str | None],
    deadline: float,
    tally: Tally,
) -> None:
    rng = random.Random(number)
    hits = sorted(content.hits)
    tags = sorted(content.tags)
    connection: http.client.HTTPConnection | None = None

    def ask(
        method: str, path: str, accept: bool = False
    ) -> tuple[http.client.HTTPResponse, bytes]:
        nonlocal connection
        if connection is None:
            connection = http.client.HTTPConnection(LOCALHOST, port, timeout=30)
        headers = {"Accept": OCI_MANIFEST} if accept else {}
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response, response.read()

    def check_blob(digest: str, data: bytes, kind: str) -> None:
        response, body = ask("GET", f"/v2/{REPOSITORY}/blobs/{digest}")
        if response.status != 200 or body != data:
            raise AssertionError(
                f"{kind} {digest}: {response.status}, {len(body)} bytes"
            )

    for _ in range(MAX_REQUESTS_PER_CLIENT):
        if time.monotonic() >= deadline:
            break
        roll = rng.random()
        kind = "hit"
        try:
            if roll < 0.40:
                digest = rng.choice(hits)
                check_blob(digest, content.hits[digest], kind)
            elif roll < 0.55:
                fresh = misses()
                kind = "miss" if fresh is not None else "hit"
                digest = fresh if fresh is not None else rng.choice(hits)
                check_blob(
                    digest, content.hits.get(digest) or content.misses[digest], kind
                )
            elif roll < 0.80:
                kind = "tag"
                tag = rng.choice(tags)
                expected, body_expected = content.tags[tag]
                response, body = ask(
                    "GET", f"/v2/{REPOSITORY}/manifests/{tag}", accept=True
                )
                if (
                    response.status != 200
                    or response.headers.get("Docker-Content-Digest") != expected
                    or body != body_expected
                ):
                    raise AssertionError(f"tag {tag}: {response.status}")
            else:
                kind = "head"
                if rng.random() < 0.5:
                    digest = rng.choice(hits)
                    path = f"/v2/{REPOSITORY}/blobs/{digest}"
                    size = len(content.hits[digest])
                else:
                    digest, body_expected = content.tags[rng.choice(tags)]
                    path = f"/v2/{REPOSITORY}/manifests/{digest}"
                    size = len(body_expected)
                response, body = ask("HEAD", path, accept=True)
                if (
                    response.status != 200
                    or body
                    or response.headers.get("Content-Length") != str(size)
                    or response.headers.get("Docker-Content-Digest") != digest
                ):
                    raise AssertionError(f"HEAD {path}: {response.status}")
        except (AssertionError, OSError, http.client.HTTPException) as e:
            tally.add(kind, f"{e.__class__.__name__}: {e}")
            if connection is not None:
                connection.close()
            connection = None
        else:
            tally.add(kind, None)
    if connection is not None:
        connection.close()


def test_soak_mixed_load_without_errors_or_growth(
    tmp_path: Path,
    start_registry: Callable[..., RegistryProcess],
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    32 keep-alive clients for 15 s: 40% cached blobs, 15% fresh blobs (each
    handed to two clients at once), 25% manifests by tag (every one checked
    at the origin, ``tag_ttl = 0s``), 20% HEADs.  Zero errors or wrong
    bytes; each fresh blob fetched from the upstream once; after a settle
    the mirror's RSS has grown by less than 30 MiB and its descriptors by
    at most 20.
    """
    registry = start_registry(storage=tmp_path / "soak-storage")
    content, _ = _content()
    _push(registry, content)
    mirror = start_mirror(lambda port: mirror_config(port, registry.url, tag_ttl="0s"))
    port = mirror.port

    # Warm up: every hit blob and tag once, so that "before" is steady state.
    warm = http.client.HTTPConnection(LOCALHOST, port, timeout=30)
    try:
        for _ in range(2):
            for digest, data in content.hits.items():
                warm.request("GET", f"/v2/{REPOSITORY}/blobs/{digest}")
                response = warm.getresponse()
                assert (response.status, response.read()) == (200, data)
            for tag, (_, body) in content.tags.items():
                warm.request(
                    "GET",
                    f"/v2/{REPOSITORY}/manifests/{tag}",
                    headers={"Accept": OCI_MANIFEST},
                )
                response = warm.getresponse()
                assert (response.status, response.read()) == (200, body)
    finally:
        warm.close()
    process = mirror._process  # noqa: SLF001 (the harness keeps the Popen private)
    assert process is not None
    pid = process.pid
    rss_before, fds_before = _vm(pid)
    upstream_mark = len(registry.access_log())

    queue = iter([d for d in content.misses for _ in range(2)])
    lock = threading.Lock()

    def next_miss() -> str | None:
        with lock:
            return next(queue, None)

    tally = Tally()
    started = time.monotonic()
    deadline = started + SOAK_SECONDS
    clients = [
        threading.Thread(
            target=_client,
            args=(number, port, content, next_miss, deadline, tally),
            daemon=True,
        )
        for number in range(THREADS)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=SOAK_SECONDS + 60)
    elapsed = time.monotonic() - started
    assert not any(c.is_alive() for c in clients), "a client never finished"

    poll_until(
        lambda: (
            mirror.metric("regmirror_downloads_in_flight") == 0
            and _vm(pid)[1] <= fds_before + FD_GROWTH
        ),
        timeout=15,
        describe=lambda: f"did not settle: fds {_vm(pid)[1]} (before {fds_before})",
    )
    rss_after, fds_after = _vm(pid)
    total = sum(tally.requests.values())
    fetched = Counter(
        line.split("/blobs/")[1].split()[0]
        for line in registry.access_log()[upstream_mark:]
        if '"GET /v2/' in line and "/blobs/" in line
    )
    twice = {d: n for d, n in fetched.items() if n > 1}
    figures = (
        f"soak: {total} requests in {elapsed:.1f}s = {total / elapsed:.0f} req/s "
        f"({dict(tally.requests)}), {len(tally.errors)} errors; mirror VmRSS "
        f"{rss_before} -> {rss_after} KiB "
        f"({(rss_after - rss_before) / 1024:+.1f} MiB), "
        f"fds {fds_before} -> {fds_after}; {len(fetched)} blobs fetched upstream"
    )
    print("\n" + figures)
    assert not tally.errors, f"{figures}\n" + "\n".join(tally.errors)
    assert tally.requests["miss"] > 0, figures
    assert not twice, f"fetched upstream more than once: {twice}; {figures}"
    assert rss_after - rss_before < RSS_GROWTH_KIB, figures
    assert fds_after - fds_before <= FD_GROWTH, figures
    assert not mirror.unhandled_errors(), mirror.log()
