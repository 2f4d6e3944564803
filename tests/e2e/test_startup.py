"""
Starting ``twistd regmirror`` with a bad configuration file.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import free_port, mirror_config, port_is_free, run_mirror_to_exit

pytestmark = pytest.mark.e2e

_UPSTREAM = "http://127.0.0.1:9"  # never contacted: the config is refused first


def _ftp_upstream(port: int) -> str:
    return mirror_config(port, _UPSTREAM).replace(
        "[upstream:origin]", "[upstream:x]\nurl = ftp://x\n\n[upstream:origin]"
    )


def _missing_upstream(port: int) -> str:
    return mirror_config(port, _UPSTREAM).replace(
        "upstreams = origin", "upstreams = origin missing"
    )


def _listen_not_a_port(port: int) -> str:
    return mirror_config(port, _UPSTREAM).replace(
        f"listen = tcp:{port}:interface=127.0.0.1", "listen = tcp:notaport"
    )


def _missing_certificate(port: int) -> str:
    return mirror_config(port, _UPSTREAM).replace(
        f"listen = tcp:{port}:interface=127.0.0.1",
        f"listen = tcp:{port}:interface=127.0.0.1 "
        "ssl:0:privateKey=absent.pem:certKey=absent.pem",
    )


def _cache_under_a_file(port: int) -> str:
    return mirror_config(port, _UPSTREAM).replace(
        "directory = cache", "directory = mirror.ini/cache"
    )


@pytest.mark.parametrize(
    ("make_config", "where"),
    [
        (_ftp_upstream, "[upstream:x] url"),
        (_missing_upstream, "[namespace:docker.io] upstreams"),
        (_listen_not_a_port, "[server] listen"),
        (_missing_certificate, "[server] listen"),
        (_cache_under_a_file, "[cache] directory"),
    ],
    ids=[
        "ftp-upstream-url",
        "missing-upstream",
        "listen-not-a-port",
        "missing-certificate",
        "cache-not-creatable",
    ],
)
def test_bad_config_exits_with_one_line_naming_file_section_key(
    tmp_path: Path, make_config: Callable[[int], str], where: str
) -> None:
    """
    A bad config makes ``twistd regmirror`` exit non-zero, printing one line
    on stderr that names the file, the section and the key, without ever
    listening.
    """
    port = free_port()
    config_text = make_config(port)
    assert config_text != mirror_config(port, _UPSTREAM)
    result = run_mirror_to_exit(tmp_path, config_text)
    config_path = str(tmp_path / "mirror.ini")
    output = (
        f"exit {result.returncode}\nstderr:\n{result.stderr}\nstdout:\n{result.stdout}"
    )
    assert result.returncode != 0, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert config_path in lines[0], output
    assert where in lines[0], output
    assert port_is_free(port)


def test_a_port_in_use_ends_start_up(tmp_path: Path) -> None:
    """A listener that cannot bind ends start-up with a non-zero exit and a
    line naming it, instead of a mirror that listens nowhere."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_mirror_to_exit(tmp_path, mirror_config(port, _UPSTREAM))
    assert result.returncode != 0
    log = (tmp_path / "twistd.log").read_text()
    assert f"regmirror: cannot listen on tcp:{port}:interface=127.0.0.1" in log
