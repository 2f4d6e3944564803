"""
A cache folder on a file system too small for a layer (a 2 MiB tmpfs,
a 3 MB layer): the spool write that fails (ENOSPC) is the cache's fault.
The log names the error, ``/readyz`` says why the node is not ready, the
upstream is not marked down nor charged, and the pull after the failed
one is relayed whole from the upstream without caching.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import MirrorProcess, RegistryProcess, mirror_config
from .test_cache_limits import push_blob

pytestmark = pytest.mark.e2e

LAYER_SIZE = 3_001_130


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted at teardown."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        done = subprocess.run(["umount", str(folder)], capture_output=True, timeout=10)
        if done.returncode != 0:
            # Still busy (a process that has not let go): detach it.
            subprocess.run(["umount", "-l", str(folder)], timeout=10, check=True)


def test_a_full_cache_disk_relays_and_says_why(
    tmp_path: Path,
    small_disk: Path,
    start_registry: Callable[..., RegistryProcess],
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    The first pull of a 3 MB layer into a 2 MiB cache folder may break
    (the bytes already sent came from the spool the disk refused to
    grow); the log then names ENOSPC once, ``/readyz`` answers 503 saying
    the cache cannot be written, the upstream is not marked down, and the
    next pulls get the whole layer, relayed without caching.
    """
    registry = start_registry(storage=tmp_path / "empty")
    data = random.Random(33).randbytes(LAYER_SIZE)
    digest = push_blob(registry, "test/big", data)
    mirror = start_mirror(
        lambda port: mirror_config(port, registry.url, prefetch=0).replace(
            "directory = cache", f"directory = {small_disk}"
        )
    )
    path = f"/v2/test/big/blobs/{digest}"
    try:
        first = mirror.request("GET", path)
    except OSError:
        pass  # the connection broken: never a short body taken for whole
    else:
        assert first.status == 200 and first.body != data
    mirror.wait_for_log(r"cannot be written \(No space left on device\)")
    ready = mirror.request("GET", "/readyz")
    assert ready.status == 503
    assert b"No space left on device" in ready.body
    assert mirror.metric("regmirror_ready") == 0
    for _ in range(3):
        again = mirror.request("GET", path)
        assert again.status == 200
        assert again.body == data
    log = mirror.log()
    assert log.count("No space left on device") == 1, log
    assert "bytes (sources:" not in log
    assert mirror.metric("regmirror_upstream_down", upstream="origin") == 0
    assert mirror.metric("regmirror_upstream_errors_total") == 0
    assert not list((small_disk / "spool").iterdir())
    assert not mirror.cached_blobs()
