"""
Starting ``twistd regmirror`` with a bad configuration file.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import free_port, mirror_config, port_is_free, run_mirror_to_exit
from .servers import write_certificate

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


def _namespace_closed_without_access(port: int) -> str:
    return mirror_config(port, _UPSTREAM).replace(
        "default = true", "default = true\nanonymous = none"
    )


def _every_peer_trusted(port: int) -> str:
    return mirror_config(port, _UPSTREAM) + "\n[access]\ntrusted_proxies = any\n"


@pytest.mark.parametrize(
    ("make_config", "where"),
    [
        (_ftp_upstream, "[upstream:x] url"),
        (_missing_upstream, "[namespace:docker.io] upstreams"),
        (_listen_not_a_port, "[server] listen"),
        (_missing_certificate, "[server] listen"),
        (_cache_under_a_file, "[cache] directory"),
        (_namespace_closed_without_access, "[namespace:docker.io] anonymous"),
        (_every_peer_trusted, "[access] trusted_proxies"),
    ],
    ids=[
        "ftp-upstream-url",
        "missing-upstream",
        "listen-not-a-port",
        "missing-certificate",
        "cache-not-creatable",
        "namespace-anonymous-without-access",
        "every-peer-trusted",
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


# -- what check-config and twistd both refuse, each in one line ----------------

_LISTEN = "listen = tcp:{port}:interface=127.0.0.1"
_ORIGIN = "[upstream:origin]\nurl = http://127.0.0.1:9\n"
#: Not PEM, as /etc/hostname is not.
_GARBAGE = b"mirror-host\n"


def _change(old: str, new: str) -> Callable[[int], str]:
    """A valid config with *old* made *new* (``{port}`` is the port)."""

    def make(port: int) -> str:
        text = mirror_config(port, _UPSTREAM)
        changed = text.replace(old.format(port=port), new.format(port=port))
        assert changed != text
        return changed

    return make


def _in_origin(lines: str) -> Callable[[int], str]:
    return _change(_ORIGIN, _ORIGIN + lines)


_REFUSED = [
    pytest.param(
        _in_origin("client_cert = cert.pem\n"),
        "[upstream:origin] client_cert: no PEM private key in ",
        id="client-cert-without-key",
    ),
    pytest.param(
        _in_origin("client_cert = garbage.pem\n"),
        "[upstream:origin] client_cert: no PEM certificate in ",
        id="client-cert-not-pem",
    ),
    pytest.param(
        _in_origin("client_cert = cert.pem\nclient_key = garbage.pem\n"),
        "[upstream:origin] client_key: no PEM private key in ",
        id="client-key-not-pem",
    ),
    pytest.param(
        _in_origin("client_cert = cert.pem\nclient_key = other-key.pem\n"),
        "[upstream:origin] client_key: the private key in ",
        id="client-key-not-the-certificates",
    ),
    pytest.param(
        _in_origin("ca_file = garbage.pem\n"),
        "[upstream:origin] ca_file: no PEM certificate in ",
        id="ca-file-not-pem",
    ),
    # A folder start-up cannot make, though its parent is a folder that
    # access() calls writable (for root): check-config said ok, twistd
    # died with a traceback from the store.
    pytest.param(
        _change("directory = cache", "directory = /proc/nope"),
        "[cache] directory: cannot create /proc/nope: no folder can be made in /proc (",
        id="cache-in-proc",
    ),
    pytest.param(
        _change("directory = cache", "directory = /sys/nope/deeper"),
        "[cache] directory: cannot create /sys/nope/deeper: no folder can be "
        "made in /sys (",
        id="cache-in-sys",
    ),
    pytest.param(
        _change("directory = cache", "directory = /proc"),
        "[cache] directory: /proc cannot hold the cache's folders (",
        id="cache-is-proc",
    ),
    # An empty listen was the default: every interface's port 5000.
    pytest.param(
        _change(_LISTEN, "listen ="),
        "[server] listen: is empty",
        id="listen-empty",
    ),
    pytest.param(
        _change("[cache]\n", "[cache\n"),
        "line 4 is not a [section], a key = value, an indented continuation "
        "or a comment",
        id="syntax-error",
    ),
    pytest.param(
        _change(_LISTEN, "listen = tcp:99999:interface=127.0.0.1"),
        "[server] listen: bad listener 'tcp:99999:interface=127.0.0.1': port "
        "99999 is not between 0 and 65535",
        id="port-out-of-range",
    ),
    pytest.param(
        _change(_LISTEN, _LISTEN + " tcp:{port}"),
        "[server] listen: bad listener 'tcp:{port}': port {port} on every IPv4 "
        "address clashes with 'tcp:{port}:interface=127.0.0.1'",
        id="listener-given-twice",
    ),
    pytest.param(
        _change(_LISTEN, _LISTEN + "\nmetrics_listen = tcp:{port}:interface=127.0.0.1"),
        "[server] metrics_listen: bad listener 'tcp:{port}:interface=127.0.0.1': "
        "port {port} on 127.0.0.1 clashes with 'tcp:{port}:interface=127.0.0.1'",
        id="metrics-on-the-listen-port",
    ),
    pytest.param(
        _change(_LISTEN, _LISTEN + " ssl:0:privateKey=garbage.pem:certKey=cert.pem"),
        "[server] listen: bad listener 'ssl:0:privateKey={folder}/garbage.pem:"
        "certKey={folder}/cert.pem': no PEM private key in {folder}/garbage.pem",
        id="tls-listener-key-not-pem",
    ),
]


def _certificates(folder: Path) -> None:
    """``cert.pem`` and ``key.pem``, ``other-key.pem`` (another certificate's
    key) and ``garbage.pem`` (no PEM at all) in *folder*."""
    write_certificate(folder / "other")
    write_certificate(folder)
    (folder / "other" / "key.pem").rename(folder / "other-key.pem")
    (folder / "garbage.pem").write_bytes(_GARBAGE)


@pytest.mark.parametrize(("make_config", "expected"), _REFUSED)
def test_check_config_and_twistd_refuse_in_one_line(
    tmp_path: Path, make_config: Callable[[int], str], expected: str
) -> None:
    """
    Unusable certificate files (a certificate without its key, files that
    are not PEM, a key of another certificate), a cache folder that cannot
    be made (under ``/proc``), an empty ``listen``, a syntax error, a port
    out of range, one port listened on twice, an ``ssl:`` listener whose
    key is not one: ``regmirror check-config`` and ``twistd regmirror`` both exit
    non-zero with one line on stderr naming the file, the section, the key
    and what is wrong (the file that is not usable), no traceback, and
    nothing ever listens.
    """
    port = free_port()
    _certificates(tmp_path)
    config = tmp_path / "mirror.ini"
    config.write_text(make_config(port))
    expected = f"regmirror: {config}: " + expected.format(port=port, folder=tmp_path)
    checked = subprocess.run(
        [str(Path(sys.executable).parent / "regmirror"), "check-config", "-c", config],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    started = run_mirror_to_exit(tmp_path, config.read_text())
    for result in (checked, started):
        output = f"exit {result.returncode}\nstderr:\n{result.stderr}\n{result.stdout}"
        assert result.returncode != 0, output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, output
        assert lines[0].startswith(expected), output
    log = (
        (tmp_path / "twistd.log").read_text()
        if (tmp_path / "twistd.log").exists()
        else ""
    )
    assert "serving" not in log, log
    assert port_is_free(port)
