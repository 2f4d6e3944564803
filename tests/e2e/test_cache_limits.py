"""
``[cache] max_size`` with ``workers = 2``: the bound holds for the cache
folder, whichever process stored what (each process once counted only its
own downloads, and the folder grew to about workers × max_size).
"""

from __future__ import annotations

import hashlib
import http.client
import random
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    mirror_config,
    poll_until,
)

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def push_blob(registry: RegistryProcess, repository: str, data: bytes) -> str:
    """A monolithic upload of *data*; its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    connection = http.client.HTTPConnection(LOCALHOST, registry.port, timeout=10)
    try:
        connection.request("POST", f"/v2/{repository}/blobs/uploads/")
        started = connection.getresponse()
        started.read()
        assert started.status == 202
        location = urlsplit(started.headers["Location"])
        joiner = "&" if location.query else ""
        target = f"{location.path}?{location.query}{joiner}digest={quote(digest)}"
        connection.request(
            "PUT", target, data, {"Content-Type": "application/octet-stream"}
        )
        done = connection.getresponse()
        done.read()
        assert done.status == 201, done.status
    finally:
        connection.close()
    return digest


def blobs_on_disk(mirror: MirrorProcess) -> int:
    return sum(
        p.stat().st_size for p in (mirror.cache_dir / "blobs").rglob("*") if p.is_file()
    )


def test_max_size_holds_for_the_folder_with_two_workers(
    tmp_path: Path,
    start_registry: Callable[..., RegistryProcess],
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    Eight 1 MiB blobs pulled through a mirror of two processes with
    ``max_size = 3MiB``: after each download the folder holds at most
    3 MiB, and every process reports the folder's size on the status page.
    """
    registry = start_registry(storage=tmp_path / "empty")
    rng = random.Random(14)
    digests = [push_blob(registry, "test/rand", rng.randbytes(MiB)) for _ in range(8)]
    mirror = start_mirror(
        lambda port: mirror_config(port, registry.url).replace(
            "[cache]", "workers = 2\n\n[cache]\nmax_size = 3MiB"
        )
    )
    for digest in digests:
        # New connections: the two processes take turns accepting them.
        assert mirror.request("GET", f"/v2/test/rand/blobs/{digest}").status == 200
        poll_until(
            lambda: blobs_on_disk(mirror) <= 3 * MiB,
            timeout=10.0,
            describe=lambda: f"{blobs_on_disk(mirror)} bytes of blobs on disk",
        )
    # Eviction goes on for a moment after the bound is met (down to 90%):
    # wait until what every process reports is what the disk holds.

    def reported() -> set[int]:
        return {
            mirror.request("GET", "/_status.json").json()["cache"]["size"]
            for _ in range(4)
        }

    poll_until(
        lambda: reported() == {blobs_on_disk(mirror)},
        timeout=10.0,
        describe=lambda: f"reported {reported()}, on disk {blobs_on_disk(mirror)}",
    )
    assert blobs_on_disk(mirror) <= 3 * MiB
