"""Logs as an operator reads them: the access log, JSON lines, no secrets."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import (
    LOCALHOST,
    RegistryProcess,
    free_port,
    http_request,
    json_lines,
    mirror_config,
    poll_until,
    responds_ok,
    stop_process,
)
from .images import Catalog

pytestmark = pytest.mark.e2e

SECRET = "hunter2-never-logged"
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"


@pytest.fixture
def json_mirror(
    tmp_path: Path, upstream: RegistryProcess
) -> Iterator[tuple[int, Path]]:
    """A mirror logging JSON lines to its standard output, with an upstream
    password in its configuration (the registry ignores it)."""
    port = free_port()
    config = mirror_config(port, upstream.url).replace(
        "idle_timeout = 10s",
        f"idle_timeout = 10s\nusername = alice\npassword = {SECRET}",
    )
    (tmp_path / "mirror.ini").write_text(config)
    output = tmp_path / "out.jsonl"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                TWISTD,
                "--nodaemon",
                "--pidfile=",
                "--logger=regmirror.logs.json_lines",
                "regmirror",
                "-c",
                str(tmp_path / "mirror.ini"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        try:
            poll_until(
                lambda: responds_ok(port),
                timeout=15,
                describe=lambda: output.read_text(errors="replace"),
            )
            yield port, output
        finally:
            stop_process(process)


def test_json_access_log_lines_without_secrets(
    json_mirror: tuple[int, Path], catalog: Catalog
) -> None:
    """With ``--logger regmirror.logs.json_lines`` every line is JSON; each
    request has an access event with namespace, cache status, upstream,
    bytes, duration and client; the configured password appears nowhere."""
    port, output = json_mirror
    image = catalog.small
    layer = image.layers[0].digest
    path = f"/v2/{image.repository}/blobs/{layer}"
    assert http_request(port, "GET", path).status == 200
    assert http_request(port, "GET", path).status == 200

    def logged() -> list[dict[str, object]]:
        return [
            e
            for e in json_lines(output)
            if e.get("log_namespace") == "regmirror.access" and e.get("uri") == path
        ]

    poll_until(
        lambda: len(logged()) == 2, timeout=10, describe=lambda: output.read_text()
    )
    first, second = logged()
    assert (first["cache"], first["upstream"]) == ("miss", "origin")
    assert (second["cache"], second["upstream"]) == ("hit", "-")
    assert first["namespace"] == "docker.io" and first["status"] == 200
    assert first["bytes"] == image.layers[0].size
    assert first["client"] == LOCALHOST
    assert isinstance(first["duration"], float)
    assert SECRET not in output.read_text()
