"""``regmirror healthcheck``: where it asks each listener of the config."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
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


def _config(folder: Path, listen: list[str]) -> Path:
    config = folder / "mirror.ini"
    config.write_text(
        "[server]\nlisten = " + "\n    ".join(listen) + "\n\n"
        "[cache]\ndirectory = cache\n\n"
        "[upstream:one]\nurl = http://127.0.0.1:9\n\n"
        "[namespace:docker.io]\nupstreams = one\ndefault = true\n"
    )
    return config


@pytest.fixture
def silent() -> Iterator[list[int]]:
    """The ports of three listeners that take connections (the kernel's
    backlog does) and never answer."""
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    try:
        yield [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_listeners_that_never_answer_are_asked_at_once(
    tmp_path: Path, silent: list[int]
) -> None:
    """
    Listeners were asked one after another: three that accept and never
    answer took three times ``--timeout`` (16.3 s with the default 5 s,
    beyond the image's ``HEALTHCHECK --timeout=10s``, which killed the
    command before it printed).  They are asked at once: the command ends
    within about one ``--timeout``, a line for each.
    """
    config = _config(tmp_path, [f"tcp:{port}:interface=127.0.0.1" for port in silent])
    out = io.StringIO()
    started = time.monotonic()
    status = main(["healthcheck", "-c", str(config), "--timeout", "1"], out)
    took = time.monotonic() - started
    assert status == 1
    assert took < 2, f"took {took:.1f}s"
    lines = out.getvalue().splitlines()
    assert [line.split("/healthz: ")[0] for line in lines] == [
        f"http://127.0.0.1:{port}" for port in silent
    ]
    assert all(": ok" not in line for line in lines), lines


def test_the_command_ends_within_its_timeout_whatever_a_listener_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    ``--timeout`` bounds the whole command, not each socket operation (a
    listener dripping its answer a byte at a time would take one timeout
    per byte): a listener still being asked at its end is reported as not
    answering within it, the others' lines as they answered.
    """
    release = threading.Event()

    def ask(probe: Probe, timeout: float) -> str | None:
        if probe.port == 2:
            release.wait(10)  # no answer before the test ends
        return None

    monkeypatch.setattr("regmirror.healthcheck.ask", ask)
    config = _config(
        tmp_path, [f"tcp:{port}:interface=127.0.0.1" for port in (1, 2, 3)]
    )
    out = io.StringIO()
    started = time.monotonic()
    try:
        status = main(["healthcheck", "-c", str(config), "--timeout", "0.2"], out)
        took = time.monotonic() - started
    finally:
        release.set()
    assert status == 1
    assert took < 2, f"took {took:.1f}s"
    assert out.getvalue().splitlines() == [
        "http://127.0.0.1:1/healthz: ok",
        "http://127.0.0.1:2/healthz: no answer within 0.2s",
        "http://127.0.0.1:3/healthz: ok",
    ]
