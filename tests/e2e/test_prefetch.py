"""
``regmirror prefetch`` for an operator warming a cache before a slow-link
window: namespaces that need credentials (a user's login with
``--mirror``; the configuration's owner with ``-c``), several images of
which one fails, and a cache too small to keep what was fetched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest

from .harness import MirrorProcess, RegistryProcess, mirror_config
from .images import Catalog

pytestmark = pytest.mark.e2e

PASSWORD = "wonderland"


def regmirror(
    *arguments: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "regmirror.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def closed_mirror(
    upstream: RegistryProcess, start_mirror: Callable[..., MirrorProcess]
) -> MirrorProcess:
    """A mirror whose only namespace wants alice's password."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    return start_mirror(
        lambda port: (
            mirror_config(port, upstream.url)
            + "\n[access]\nanonymous = none\nhtpasswd = users\n"
        ),
        files={"users": f"alice:{hashed}\n"},
    )


def test_prefetch_through_a_mirror_as_a_user(
    catalog: Catalog, closed_mirror: MirrorProcess, tmp_path: Path
) -> None:
    """``--user`` logs in with the password from REGMIRROR_PASSWORD or a
    file (never the command line); without it the mirror's 401 is named."""
    image = catalog.small.reference
    url = f"http://{closed_mirror.host}"
    refused = regmirror("prefetch", "--mirror", url, image)
    assert refused.returncode == 1
    assert "401" in refused.stderr
    done = regmirror(
        "prefetch",
        "--mirror",
        url,
        "--user",
        "alice",
        image,
        "--json",
        env={"REGMIRROR_PASSWORD": PASSWORD},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["blobs"] == len(catalog.small.blobs)
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    again = regmirror(
        "prefetch",
        "--mirror",
        url,
        "--user",
        "alice",
        "--password-file",
        str(secret),
        image,
    )
    assert again.returncode == 0, again.stderr


def test_prefetch_with_the_config_ignores_the_access_rules(
    catalog: Catalog, closed_mirror: MirrorProcess
) -> None:
    """``-c`` fills the cache as the configuration's owner: a namespace
    closed to anonymous clients is prefetched all the same."""
    done = regmirror(
        "prefetch",
        "-c",
        str(closed_mirror.config_path),
        catalog.multi.reference,
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["blobs"] == len(catalog.multi.blobs)


def test_one_failing_image_does_not_stop_the_others(
    catalog: Catalog, closed_mirror: MirrorProcess
) -> None:
    """Every image is tried; the exit status and the last line say which
    ones failed."""
    done = regmirror(
        "prefetch",
        "-c",
        str(closed_mirror.config_path),
        "test/missing:latest",
        catalog.small.reference,
    )
    assert done.returncode == 1
    assert "1 of 2 images failed: test/missing:latest (GET " in done.stderr
    stats = regmirror("cache", "stats", "-c", str(closed_mirror.config_path), "--json")
    assert json.loads(stats.stdout)["blobs"] == len(catalog.small.blobs)


def test_a_cache_too_small_for_the_images_is_reported(
    catalog: Catalog,
    upstream: RegistryProcess,
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """With a ``max_size`` smaller than the image, what was fetched is
    evicted again: prefetch says so and fails instead of reporting success."""
    mirror = start_mirror(
        lambda port: mirror_config(port, upstream.url).replace(
            "[cache]", "[cache]\nmax_size = 8MiB"
        )
    )
    done = regmirror("prefetch", "-c", str(mirror.config_path), catalog.big.reference)
    assert done.returncode == 1
    assert "evicted again" in done.stderr and "max_size (8.0 MiB)" in done.stderr
