"""
Running it for months: the operator's ``regmirror`` command against a real
mirror, and a ``kill -9`` in the middle of a download.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    poll_until,
)
from .images import Catalog, assert_layout_matches

pytestmark = pytest.mark.e2e

REGMIRROR = [sys.executable, "-m", "regmirror.cli"]


def regmirror(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*REGMIRROR, *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def cached_files(cache: Path) -> dict[str, Path]:
    """Digest → file, for every blob and manifest in the cache."""
    return {
        f"sha256:{path.name}": path
        for path in (cache / "blobs" / "sha256").glob("*/*")
        if not path.name.startswith(".")
    }


def assert_cache_sound(cache: Path) -> None:
    """Every cached file hashes to its name; nothing is left in the spool."""
    for digest, path in cached_files(cache).items():
        assert f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}" == digest
    assert list((cache / "spool").iterdir()) == []


def test_prefetch_then_pull_with_the_upstream_stopped(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    upstream: RegistryProcess,
    mirror: MirrorProcess,
) -> None:
    """``regmirror prefetch`` of a multi-arch image warms every platform, so
    that with the upstream stopped skopeo still pulls all of it (by digest)
    and every digest is right; ``cache stats`` and ``cache verify`` agree."""
    image = catalog.multi
    done = regmirror(
        "prefetch", "--mirror", f"http://{mirror.host}", image.reference, "--json"
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["images"] == [
        {"image": image.reference, "digest": image.root.digest}
    ]
    assert summary["blobs"] == len(image.blobs)

    upstream.stop()
    pinned = f"{image.repository}@{image.root.digest}"
    skopeo.pull(mirror.host, pinned, tmp_path / "out", "pinned", all_platforms=True)
    assert_layout_matches(tmp_path / "out", image, "pinned")

    stats = regmirror("cache", "stats", "-c", str(mirror.config_path), "--json")
    assert stats.returncode == 0, stats.stderr
    counts = json.loads(stats.stdout)
    assert counts["manifests"] == len(image.manifests) + 1
    assert counts["blobs"] == len(image.blobs)
    verify = regmirror("cache", "verify", "-c", str(mirror.config_path), "--json")
    assert json.loads(verify.stdout)["corrupt"] == []


def test_kill_9_mid_download_then_restart(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    upstream: RegistryProcess,
    mirror: MirrorProcess,
) -> None:
    """``kill -9`` while a big blob is downloading: after a restart the spool
    is empty, no partial file is in the cache, and a pull verifies every
    digest."""
    image = catalog.big
    layer = image.layers[0].digest
    connection = http.client.HTTPConnection(LOCALHOST, mirror.port, timeout=30)
    connection.request("GET", f"/v2/{image.repository}/blobs/{layer}")
    response = connection.getresponse()
    assert response.status == 200
    response.read(64 * 1024)
    spool = mirror.cache_dir / "spool"
    in_progress = any(spool.iterdir()) and layer not in cached_files(mirror.cache_dir)
    assert mirror._process is not None
    mirror._process.send_signal(signal.SIGKILL)
    mirror._process.wait(timeout=10)
    connection.close()

    mirror.start()
    poll_until(lambda: not any(spool.iterdir()), timeout=10, describe=lambda: "spool")
    assert_cache_sound(mirror.cache_dir)
    skopeo.pull(mirror.host, image.reference, tmp_path / "out", "latest")
    assert_layout_matches(tmp_path / "out", image, "latest")
    assert_cache_sound(mirror.cache_dir)
    # The download really was cut short (the point of this test) whenever
    # the kill landed before it finished, which is the usual case.
    assert in_progress or layer in cached_files(mirror.cache_dir)
