"""
``regmirror healthcheck -c FILE``: asks ``/healthz`` on every listener of
``[server] listen``, found in the configuration (a container's
``HEALTHCHECK``, a monitoring script), so that a mirror listening on
another port, on one address, over TLS or on a UNIX socket is asked
where it listens.

Every listener is asked at once, in a thread each, and ``--timeout`` bounds
the whole command: a ``HEALTHCHECK --timeout`` above it always sees the
command end and print its lines.

A listener on a wildcard address is asked on loopback (``0.0.0.0`` on
``127.0.0.1``, ``::`` on ``::1``); an ``ssl:`` one over TLS without
checking its certificate, whose name is the one clients use, not
loopback's: this is the process itself answering, not a client's trust.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any, TextIO

from attrs import frozen

from regmirror._cli import Failed
from regmirror.ini import load
from regmirror.listeners import listen_address

#: Seconds the listeners have to answer, by default.
DEFAULT_TIMEOUT = 5.0

_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


@frozen
class Probe:
    """Where one listener is asked: a TCP host and port, or a UNIX path."""

    description: str
    tls: bool = False
    host: str = ""
    port: int = 0
    path: str | None = None

    def url(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}:/healthz"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/healthz"


def probe_of(description: str) -> Probe:
    """
    Where to ask the listener of the endpoint *description*.

    :raises Failed: for a listener that cannot be asked (another kind of
        endpoint, or port 0, which the kernel picks anew each start).
    """
    address = listen_address(description)
    if address is None:
        raise Failed(f"[server] listen: cannot probe {description!r}")
    if address.path is not None:
        return Probe(description, path=address.path)
    if not address.port:
        raise Failed(f"[server] listen: {description!r} has no fixed port to probe")
    kind = description.partition(":")[0].lower()
    host = _LOOPBACK.get(address.interface, address.interface)
    return Probe(description, tls=kind == "ssl", host=host, port=address.port)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _connection(probe: Probe, timeout: float) -> http.client.HTTPConnection:
    if probe.path is not None:
        return _UnixConnection(probe.path, timeout)
    if probe.tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(
            probe.host, probe.port, timeout=timeout, context=context
        )
    return http.client.HTTPConnection(probe.host, probe.port, timeout=timeout)


def ask(probe: Probe, timeout: float) -> str | None:
    """``None`` when the listener answers ``/healthz`` with 200, else why not."""
    connection = _connection(probe, timeout)
    try:
        connection.request("GET", "/healthz", headers={"User-Agent": "regmirror"})
        response = connection.getresponse()
        body = response.read(512).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as error:
        return f"{type(error).__name__}: {error}".rstrip(": ")
    finally:
        connection.close()
    if response.status != 200:
        return f"{response.status} {body}".strip()
    return None


def ask_all(probes: Sequence[Probe], timeout: float) -> list[str | None]:
    """
    What each of *probes* answered (as :func:`ask`), all asked at once and
    given *timeout* seconds in all: one still being asked then did not
    answer in time.  Its thread is left behind, a daemon that does not
    keep the command from ending.
    """
    answers: dict[int, str | None] = {}
    answered = threading.Condition()

    def asking(index: int, probe: Probe) -> None:
        try:
            answer = ask(probe, timeout)
        except Exception as error:
            answer = f"{type(error).__name__}: {error}"
        with answered:
            answers[index] = answer
            answered.notify()

    for index, probe in enumerate(probes):
        name = f"healthcheck {probe.url()}"
        threading.Thread(
            target=asking, args=(index, probe), name=name, daemon=True
        ).start()
    with answered:
        answered.wait_for(lambda: len(answers) == len(probes), timeout)
        late = f"no answer within {timeout:g}s"
        return [answers.get(index, late) for index in range(len(probes))]


def healthcheck(arguments: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    """The ``healthcheck`` command: every listener answers, or status 1."""
    config = load(arguments.config)
    probes = [probe_of(description) for description in config.server.listen]
    listeners = []
    for probe, problem in zip(probes, ask_all(probes, arguments.timeout), strict=True):
        listeners.append({"url": probe.url(), "ok": problem is None, "error": problem})
        if not arguments.json:
            print(f"{probe.url()}: {problem or 'ok'}", file=out)
    return {"ok": all(item["ok"] for item in listeners), "listeners": listeners}


def add_command(commands: Any) -> None:
    """The ``healthcheck`` sub-command, on the parser's *commands*."""
    command = commands.add_parser(
        "healthcheck",
        help="ask /healthz on every listener the configuration names",
    )
    command.add_argument("--json", action="store_true", help="print JSON")
    command.add_argument(
        "-c", "--config", required=True, help="the INI file (e.g. etc/mirror.ini)"
    )
    command.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds the listeners, asked at once, have to answer: the"
        f" command ends within about that (default {DEFAULT_TIMEOUT:g})",
    )
    command.set_defaults(run=healthcheck)
