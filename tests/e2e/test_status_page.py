"""The status page, as a person sees it: loaded in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .harness import MirrorProcess, RegistryProcess, http_request
from .images import Catalog

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium(tmp_path: Path, url: str, *extra: str) -> str:
    """Load *url* headless, let its scripts run, and return the DOM."""
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run scripts/dev test")
    result = subprocess.run(
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
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=5000",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


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
