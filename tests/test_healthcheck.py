"""``regmirror healthcheck``: where it asks each listener of the config."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from regmirror._cli import Failed
from regmirror.cli import main
from regmirror.healthcheck import Probe, probe_of


@pytest.mark.parametrize(
    ("description", "probe"),
    [
        ("tcp:5000", Probe("tcp:5000", host="127.0.0.1", port=5000)),
        (
            "tcp:5001:interface=0.0.0.0",
            Probe("tcp:5001:interface=0.0.0.0", host="127.0.0.1", port=5001),
        ),
        (
            "tcp:5002:interface=10.1.2.3",
            Probe("tcp:5002:interface=10.1.2.3", host="10.1.2.3", port=5002),
        ),
        ("tcp6:5003", Probe("tcp6:5003", host="::1", port=5003)),
        (
            "tcp6:5004:interface=\\:\\:1",
            Probe("tcp6:5004:interface=\\:\\:1", host="::1", port=5004),
        ),
        (
            "ssl:5443:privateKey=key.pem:certKey=cert.pem",
            Probe(
                "ssl:5443:privateKey=key.pem:certKey=cert.pem",
                tls=True,
                host="127.0.0.1",
                port=5443,
            ),
        ),
        (
            "unix:/run/regmirror.sock",
            Probe("unix:/run/regmirror.sock", path="/run/regmirror.sock"),
        ),
    ],
)
def test_each_listener_is_asked_where_it_listens(
    description: str, probe: Probe
) -> None:
    """A wildcard address is asked on loopback (IPv4's for ``0.0.0.0``,
    IPv6's for ``::``), a named one on itself, ``ssl:`` over TLS, a UNIX
    socket at its path."""
    assert probe_of(description) == probe


def test_urls_name_what_was_asked() -> None:
    assert probe_of("tcp6:5003").url() == "http://[::1]:5003/healthz"
    assert (
        probe_of("ssl:5443:privateKey=k.pem").url() == "https://127.0.0.1:5443/healthz"
    )
    assert probe_of("unix:/run/r.sock").url() == "unix:/run/r.sock:/healthz"


@pytest.mark.parametrize("description", ["tcp:0", "systemd:domain=INET:index=0"])
def test_a_listener_that_cannot_be_asked_is_an_error(description: str) -> None:
    """Port 0 (a new port each start) and other kinds of endpoint have no
    address to ask: a one-line error, not a guess."""
    with pytest.raises(Failed, match="listen"):
        probe_of(description)


def test_nothing_listening_is_unhealthy(tmp_path: Path) -> None:
    """With no mirror running, the command fails (status 1) and says which
    listener did not answer."""
    config = tmp_path / "mirror.ini"
    config.write_text(
        "[server]\nlisten = unix:" + str(tmp_path / "none.sock") + "\n\n"
        "[cache]\ndirectory = cache\n\n"
        "[upstream:one]\nurl = http://127.0.0.1:9\n\n"
        "[namespace:docker.io]\nupstreams = one\ndefault = true\n"
    )
    out = io.StringIO()
    assert main(["healthcheck", "-c", str(config), "--json"], out) == 1
    answer = json.loads(out.getvalue())
    assert answer["ok"] is False
    [listener] = answer["listeners"]
    assert listener["url"] == f"unix:{tmp_path / 'none.sock'}:/healthz"
    assert listener["ok"] is False and listener["error"]
