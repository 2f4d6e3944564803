"""
``regmirror healthcheck -c FILE`` (the container image's HEALTHCHECK)
against a real mirror: it finds every listener in the configuration.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import LOCALHOST, MirrorProcess, free_port, mirror_config
from .servers import write_certificate

pytestmark = pytest.mark.e2e

REGMIRROR = Path(sys.executable).with_name("regmirror")


def healthcheck(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REGMIRROR), "healthcheck", "-c", str(config), "--timeout", "5"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_healthcheck_asks_every_listener_where_it_is(tmp_path: Path) -> None:
    """
    A mirror on a plain port that is not 5000, an ``ssl:`` port and a UNIX
    socket: the command asks ``/healthz`` on each, over TLS where it is
    served so, and exits 0; once the mirror is stopped it exits 1 and
    names what did not answer.
    """
    port, secure = free_port(), free_port()
    socket_path = tmp_path / "mirror.sock"
    config = mirror_config(port, "http://127.0.0.1:9").replace(
        f"listen = tcp:{port}:interface={LOCALHOST}",
        f"listen = tcp:{port}:interface={LOCALHOST}\n"
        f"    ssl:{secure}:privateKey=key.pem:certKey=cert.pem"
        f":interface={LOCALHOST}\n"
        f"    unix:{socket_path}",
    )
    write_certificate(tmp_path / "mirror")
    mirror = MirrorProcess(tmp_path / "mirror", config, port)
    mirror.start()
    try:
        result = healthcheck(mirror.config_path)
    finally:
        mirror.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"http://{LOCALHOST}:{mirror.port}/healthz: ok",
        f"https://{LOCALHOST}:{secure}/healthz: ok",
        f"unix:{socket_path}:/healthz: ok",
    ]

    result = healthcheck(mirror.config_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert all(": ok" not in line for line in lines), lines
    assert lines[0].startswith(f"http://{LOCALHOST}:{mirror.port}/healthz: ")


def test_healthcheck_ends_within_its_timeout_when_nothing_answers(
    tmp_path: Path,
) -> None:
    """
    Three listeners that accept connections and never answer (a mirror
    hung): the command asked them one after another, three times
    ``--timeout`` in all, and the container engine killed it at the
    ``HEALTHCHECK``'s own timeout before it printed a line.  It ends within
    about one ``--timeout`` (here 2 s), status 1, a line for each.
    """
    silent = [socket.create_server((LOCALHOST, 0)) for _ in range(3)]
    try:
        ports = [s.getsockname()[1] for s in silent]
        listen = "\n    ".join(f"tcp:{p}:interface={LOCALHOST}" for p in ports)
        config = tmp_path / "mirror.ini"
        config.write_text(
            mirror_config(ports[0], "http://127.0.0.1:9").replace(
                f"listen = tcp:{ports[0]}:interface={LOCALHOST}", f"listen = {listen}"
            )
        )
        started = time.monotonic()
        result = subprocess.run(
            [str(REGMIRROR), "healthcheck", "-c", str(config), "--timeout", "2"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
    finally:
        for s in silent:
            s.close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert took < 4.5, f"took {took:.1f}s"
    lines = result.stdout.splitlines()
    assert [line.split("/healthz: ")[0] for line in lines] == [
        f"http://{LOCALHOST}:{port}" for port in ports
    ]
    assert all(": ok" not in line for line in lines), lines
