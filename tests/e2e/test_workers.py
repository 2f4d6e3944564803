"""Several worker processes sharing the listeners and one cache."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    mirror_config,
    poll_until,
)
from .images import Catalog

pytestmark = pytest.mark.e2e


def workers_of(mirror: MirrorProcess) -> list[int]:
    """The pids of the mirror's worker processes."""
    assert mirror._process is not None
    found = subprocess.run(
        ["pgrep", "-P", str(mirror._process.pid), "-f", "regmirror.worker"],
        capture_output=True,
        text=True,
    )
    return [int(pid) for pid in found.stdout.split()]


def pull(port: int, path: str, digests: list[str]) -> None:
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    hasher = hashlib.sha256()
    while chunk := response.read(1024 * 1024):
        hasher.update(chunk)
    digests.append(f"sha256:{hasher.hexdigest()}")


def test_two_workers_share_one_download_and_one_log(
    catalog: Catalog,
    upstream: RegistryProcess,
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """With ``workers = 2`` a second process accepts on the same port; twenty
    concurrent clients of a cold blob get the right bytes from both
    processes while the upstream sees one GET; the worker's log lines reach
    the parent's log; a killed worker is restarted."""
    mirror = start_mirror(
        lambda port: mirror_config(port, upstream.url).replace(
            "[cache]", "workers = 2\n\n[cache]"
        )
    )
    poll_until(
        lambda: len(workers_of(mirror)) == 1,
        timeout=15,
        describe=lambda: "no worker process",
    )
    poll_until(
        lambda: re.search(r"worker \d+ serving", mirror.log()) is not None,
        timeout=15,
        describe=mirror.log,
    )
    layer = catalog.big.layers[0]
    path = f"/v2/{catalog.big.repository}/blobs/{layer.digest}"
    digests: list[str] = []
    clients = [
        threading.Thread(target=pull, args=(mirror.port, path, digests))
        for _ in range(20)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=120)
    assert digests == [layer.digest] * 20
    assert upstream.count_blob_gets(layer.digest) == 1
    log = mirror.log()
    # Both processes took connections: one downloaded, the other followed.
    assert "following another worker's download" in log
    assert f"downloading {layer.digest}" in log

    (worker,) = workers_of(mirror)
    os.kill(worker, signal.SIGKILL)
    poll_until(
        lambda: workers_of(mirror) not in ([], [worker]),
        timeout=15,
        describe=lambda: "the worker was not restarted",
    )
    assert "restarting it" in mirror.log()
