"""The status page, as a person sees it: loaded in headless Chromium."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .harness import MirrorProcess, RegistryProcess, chromium, http_request
from .images import Catalog

pytestmark = pytest.mark.e2e


def test_status_page_shows_upstreams_hits_and_cache(
    tmp_path: Path,
    catalog: Catalog,
    upstream: RegistryProcess,
    mirror: MirrorProcess,
) -> None:
    """After a miss and a hit, the page shows the namespace's origin as up,
    a 50 % hit ratio, the bytes served from cache and the cache's size."""
    image = catalog.small
    layer = image.layers[0]
    for _ in range(2):
        path = f"/v2/{image.repository}/blobs/{layer.digest}"
        assert http_request(mirror.port, "GET", path).status == 200
    dom = chromium(tmp_path, f"http://{mirror.host}/", "--dump-dom")
    rows = re.findall(r"<tr>(.*?)</tr>", dom)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    assert ["docker.io", "origin", "origin", "up", "–"] in cells
    assert re.search(r'id="ratio">50 %<', dom)
    assert re.search(rf'id="saved">{layer.size} B<', dom)
    assert 'id="updated">updated' in dom
    assert "none detected" in dom  # no stale mirror


def test_status_page_screenshot(
    tmp_path: Path, upstream: RegistryProcess, mirror: MirrorProcess
) -> None:
    """The page renders to a picture (docs/status.png is made this way)."""
    shot = tmp_path / "status.png"
    chromium(
        tmp_path,
        f"http://{mirror.host}/",
        f"--screenshot={shot}",
        "--window-size=1100,900",
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
