"""
Upstream pull limits: a mirror that answers ``429 Too Many Requests`` is
set aside until its ``Retry-After`` while the next upstream serves, and
``RateLimit-*`` quota headers are logged per upstream.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import (
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    mirror_config_upstreams,
)
from .images import Catalog, assert_layout_matches
from .servers import FakeUpstream

pytestmark = pytest.mark.e2e

StartMirror = Callable[..., MirrorProcess]
StartProgram = Callable[[FakeUpstream], FakeUpstream]


def test_rate_limited_mirror_skipped_until_retry_after(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    upstream: RegistryProcess,
    start_program: StartProgram,
    start_mirror: StartMirror,
) -> None:
    """
    The first upstream answers every request ``429`` with ``Retry-After:
    30``: pulls of three images still succeed from the second (the origin),
    the throttled one is asked at most twice in all, and the log names it.
    """
    throttled = start_program(
        FakeUpstream(tmp_path / "throttled", status=429, retry_after="30")
    )
    mirror = start_mirror(
        lambda port: mirror_config_upstreams(
            port,
            {
                "throttled-mirror": {"url": throttled.url},
                "origin-registry": {"url": upstream.url},
            },
            origin="origin-registry",
        )
    )
    for image in (catalog.small, catalog.shared_one, catalog.busybox):
        destination = tmp_path / image.repository.replace("/", "_")
        skopeo.pull(mirror.host, image.reference, destination, image.tag)
        assert_layout_matches(destination, image, image.tag)
    asked = throttled.records()
    assert 1 <= len(asked) <= 2, asked
    assert any("throttled-mirror" in line for line in mirror.log_lines()), mirror.log()


def test_rate_limit_headers_logged_per_upstream(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    small_layout: Path,
    start_program: StartProgram,
    start_mirror: StartMirror,
) -> None:
    """``RateLimit-Limit`` and ``RateLimit-Remaining`` answered by an
    upstream show up in a log line naming that upstream."""
    image = catalog.small
    quota = start_program(
        FakeUpstream(
            tmp_path / "quota",
            images=[(image.repository, small_layout)],
            headers=["RateLimit-Limit: 187;w=21600", "RateLimit-Remaining: 93;w=21600"],
        )
    )
    mirror = start_mirror(
        lambda port: mirror_config_upstreams(
            port, {"quota-hub": {"url": quota.url}}, origin="quota-hub"
        )
    )
    skopeo.pull(mirror.host, image.reference, tmp_path / "out", image.tag)
    assert_layout_matches(tmp_path / "out", image, image.tag)
    lines = [x for x in mirror.log_lines() if "quota-hub" in x]
    assert any(re.search(r"\b93\b", x) for x in lines), mirror.log()
    assert any(re.search(r"\b187\b", x) for x in lines), mirror.log()
