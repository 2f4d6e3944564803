"""
Several processes, one mirror (``[server] workers = N``).

The twistd process binds the listeners and serves on them; it then starts
``N - 1`` worker processes (``python -m regmirror.workers``) that are handed
the same listening sockets and accept on them too, so the kernel spreads
connections over every process.  All of them share the cache folder, where
the spool lock gives one upstream download per digest machine-wide.  The
parent restarts a worker that dies and passes SIGHUP on to them.

Each process keeps its own metrics, breaker states and tag answers: a
scrape of ``/metrics`` sees the process that took the connection.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.server import Site

from regmirror.channel import listener_factory
from regmirror.transport import ReloadableTLS, parse_tls_listener

log = Logger(namespace="regmirror.workers")

#: A worker's log line longer than this is dropped.
MAX_LOG_LINE = 1024 * 1024

#: How long a stopping worker gets before it is killed, and how long to wait
#: before restarting one that died.
STOP_GRACE = 10.0
RESTART_DELAY = 1.0


class Listening(Protocol):
    """A bound listener whose socket can be handed to a worker."""

    def fileno(self) -> int: ...

    def getHost(self) -> Any: ...


class _Worker(protocol.ProcessProtocol):
    """
    One worker process.  It writes its log events as JSON lines on its
    standard output; they are published here, in the parent's log, with a
    ``worker`` field.
    """

    def __init__(self, pool: Workers, index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: Deferred[None] = Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LOG_LINE:
            self._partial = b""
        for line in lines:
            if not line.strip():
                continue
            try:
                event = eventFromJSON(line.decode("utf-8"))
            except ValueError:
                log.warn("worker {index}: {line}", index=self.index, line=line[:500])
                continue
            event["worker"] = self.index
            globalLogPublisher(event)

    def errReceived(self, data: bytes) -> None:
        log.warn(
            "worker {index} says: {text}",
            index=self.index,
            text=data.decode("utf-8", "replace")[:2000],
        )

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.pool.ended(self, reason)


class Workers(Service):
    """
    Starts and keeps ``count`` worker processes, each handed the listening
    sockets of *ports* (``(port, endpoint description)`` pairs).
    """

    def __init__(
        self,
        reactor: Any,
        config_path: str,
        count: int,
        ports: Sequence[tuple[Listening, str]],
    ) -> None:
        self._reactor = reactor
        self._config = config_path
        self._count = count
        self._ports = ports
        self._running: dict[int, tuple[_Worker, Any]] = {}

    def startService(self) -> None:
        super().startService()
        for index in range(self._count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        listeners = []
        for number, (port, description) in enumerate(self._ports, start=3):
            child_fds[number] = port.fileno()
            family = socket.AF_INET6 if ":" in port.getHost().host else socket.AF_INET
            listeners.append([number, int(family), description])
        worker = _Worker(self, index)
        transport = self._reactor.spawnProcess(
            worker,
            sys.executable,
            [
                sys.executable,
                "-m",
                "regmirror.workers",
                "-c",
                self._config,
                "--listeners",
                json.dumps(listeners),
            ],
            env=os.environ.copy(),
            childFDs=child_fds,
        )
        self._running[index] = (worker, transport)
        log.info("started worker {index} (pid {pid})", index=index, pid=transport.pid)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        if self._running.get(worker.index, (None,))[0] is not worker:
            return
        del self._running[worker.index]
        if self.running:
            log.warn(
                "worker {index} ended ({why}); restarting it",
                index=worker.index,
                why=reason.getErrorMessage(),
            )
            self._reactor.callLater(RESTART_DELAY, self._restart, worker.index)

    def _restart(self, index: int) -> None:
        if self.running and index not in self._running:
            self._spawn(index)

    def signal(self, name: str) -> None:
        """Pass a signal (``"HUP"``) on to every worker."""
        for _, transport in self._running.values():
            transport.signalProcess(name)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        waiting = []
        for worker, transport in self._running.values():
            transport.signalProcess("TERM")
            kill = self._reactor.callLater(STOP_GRACE, _kill, transport)
            worker.ended.addBoth(_cancel, kill)
            waiting.append(worker.ended)
        return DeferredList(waiting)


def _cancel(result: object, call: Any) -> object:
    if call.active():
        call.cancel()
    return result


def _kill(transport: Any) -> None:
    try:
        transport.signalProcess("KILL")
    except Exception:
        pass


def serving_factory(
    site: Site, description: str, clock: IReactorTime
) -> tuple[IProtocolFactory, ReloadableTLS | None]:
    """
    What serves an adopted listening socket described by *description*,
    as the parent serves its own (:func:`regmirror.channel.listener_factory`),
    with TLS added here for ``ssl:`` (an adopted socket has no endpoint to
    add it): the factory, and the certificate to reload on SIGHUP.
    """
    factory = listener_factory(site, description)
    if not description.startswith("ssl:"):
        return factory, None
    certificate = ReloadableTLS(parse_tls_listener(description))
    return TLSMemoryBIOFactory(certificate, False, factory, clock=clock), certificate


def main(argv: Sequence[str] | None = None) -> None:
    """A worker process: serve the inherited listening sockets."""
    parser = argparse.ArgumentParser(prog="python -m regmirror.workers")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--listeners", required=True)
    arguments = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    from regmirror.service import build_mirror, validate

    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(sys.stdout, recordSeparator="")]
    )
    config = validate(arguments.config)
    mirror = build_mirror(config, reactor)
    mirror.start(clean=False)
    certificates = []
    for number, family, description in json.loads(arguments.listeners):
        factory, certificate = serving_factory(mirror.site, description, reactor)
        if certificate is not None:
            certificates.append(certificate)
        reactor.adoptStreamPort(number, family, factory)  # type: ignore[attr-defined]
        os.close(number)

    def reload() -> None:
        for certificate in certificates:
            try:
                certificate.reload()
            except ValueError as e:
                log.error("certificate not reloaded: {why}", why=e)

    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reload))  # type: ignore[attr-defined]
    log.info("worker {pid} serving", pid=os.getpid())
    reactor.run()


if __name__ == "__main__":
    main()
