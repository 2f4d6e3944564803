"""
Several processes, one mirror (``[server] workers = N``).

The twistd process binds the listeners and serves on them; it then starts
``N - 1`` worker processes (``python -m regmirror.worker``) that are handed
the same listening sockets and accept on them too, each process one
connection at a time (``regmirror.listeners._SharedTCPPort``), so that
connections spread over the processes free to take them.  Each process
runs the same service tree (:func:`regmirror.service.build_tree`) from
the same configuration: a worker reads the text twistd loaded at its start
from its standard input, never the file again (edited since, a restarted
worker would run another mirror, or none), and never from its command line
or environment, which other users may read.  All of them share the cache
folder, where the spool lock gives one upstream download per digest
machine-wide.  The parent restarts a worker that dies, asks them to
reload on SIGHUP (over their channel: a signal would end one still
starting), and stops them when it stops.

Each worker and the parent talk over a :class:`Channel` (a socket pair):
the parent asks every worker for its metric families and adds them up
with its own (:meth:`Workers.gather`), so that ``/metrics`` and the status
page's totals are the machine's whichever process answers; a worker asks
the parent for them (:meth:`Parent.gather`), tells it its last counts when
it stops, and stops when the parent is gone.  What ended workers had
counted stays in the parent's totals, which never go down.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client.core import Metric
from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from regmirror.config import Config
from regmirror.listeners import BoundListener
from regmirror.metrics import combine, export, revive

log = Logger(namespace="regmirror.workers")

#: A worker's log line longer than this is dropped.
MAX_LOG_LINE = 1024 * 1024

#: How long a stopping worker gets before it is killed, and how long to wait
#: before restarting one that died; for one that dies again within
#: SETTLED of its start (a file its configuration names is broken since),
#: twice as long each time, up to MAX_RESTART_DELAY.
STOP_GRACE = 10.0
RESTART_DELAY = 1.0
SETTLED = 30.0
MAX_RESTART_DELAY = 60.0

#: How long the parent waits for a worker's metrics before it counts the
#: worker's last report instead; how long a worker waits for the machine's
#: (beyond that, it answers with its own); how long a stopping worker waits
#: for the parent to take its last counts.
COLLECT_TIMEOUT = 2.0
GATHER_TIMEOUT = COLLECT_TIMEOUT + 1.0
FINAL_TIMEOUT = 2.0


class ChannelError(Exception):
    """The other end could not answer a question."""


class Channel(Int32StringReceiver):
    """
    Questions and answers between the parent and one worker, either way:
    JSON messages ``{"ask": question, "id": n, "with": argument}``, each
    answered by ``{"id": n, "answer": value}`` or ``{"id": n, "error": why}``.

    :ivar lost: fires when the connection ends.
    """

    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self, answer: Callable[[str, Any], Awaitable[Any]]) -> None:
        self._answer = answer
        self._asked: dict[int, Deferred[Any]] = {}
        self._next = 0
        self._open = False
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self._open = True

    def ask(self, question: str, argument: Any = None) -> Deferred[Any]:
        """
        The other end's answer; cancelling stops waiting for it.

        :raises ChannelError: (asynchronously) when it could not answer.
        """
        if not self._open:
            return fail(ChannelError("not connected to the other process"))
        self._next += 1
        number = self._next

        def forget(_: Deferred[Any]) -> None:
            self._asked.pop(number, None)

        d: Deferred[Any] = Deferred(forget)
        self._asked[number] = d
        self._send({"ask": question, "id": number, "with": argument})
        return d

    def _send(self, message: dict[str, Any]) -> None:
        self.sendString(json.dumps(message).encode("utf-8"))

    def stringReceived(self, string: bytes) -> None:
        try:
            message = json.loads(string)
            number = message["id"]
        except (ValueError, KeyError, TypeError):
            log.warn("unreadable message on a worker channel: {data}", data=string[:80])
            return
        if "ask" in message:
            question, argument = message["ask"], message.get("with")
            Deferred.fromCoroutine(self._reply(number, question, argument))
            return
        d = self._asked.pop(number, None)
        if d is None:
            return  # asked, then no longer waited for
        if "error" in message:
            d.errback(ChannelError(message["error"]))
        else:
            d.callback(message.get("answer"))

    async def _reply(self, number: int, question: str, argument: Any) -> None:
        try:
            reply = {"id": number, "answer": await self._answer(question, argument)}
        except Exception as e:
            log.failure("cannot answer {question}", question=question)
            reply = {"id": number, "error": str(e) or type(e).__name__}
        if self._open:
            self._send(reply)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._open = False
        asked, self._asked = self._asked, {}
        for d in asked.values():
            d.errback(reason)
        self.lost.callback(None)


def _serving(channel: Channel) -> protocol.Factory:
    return protocol.Factory.forProtocol(lambda: channel)


class _Worker(protocol.ProcessProtocol):
    """
    One worker process.  It writes its log events as JSON lines on its
    standard output; they are published here, in the parent's log, with a
    ``worker`` field.

    :ivar report: its metric families, as it last reported them.
    """

    def __init__(self, pool: Workers, index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: Deferred[None] = Deferred()
        self.channel = Channel(self._answer)
        self.report: list[Metric] = []
        self._partial = b""

    async def _answer(self, question: str, argument: Any) -> Any:
        if question == "gather":
            return export(await self.pool.gather())
        if question == "final":
            self.report = revive(argument)
            return None
        raise ChannelError(f"no such question: {question}")

    async def collect(self) -> list[Metric]:
        """Its metric families now; its last report if it does not answer."""
        d = self.channel.ask("collect")
        d.addTimeout(COLLECT_TIMEOUT, self.pool.clock)
        try:
            self.report = revive(await d)
        except Exception as e:
            log.warn(
                "worker {index} did not give its metrics ({why}): counted as "
                "it last reported them",
                index=self.index,
                why=str(e) or type(e).__name__,
            )
        return self.report

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
        self.pool.ended(self, reason)
        self.ended.callback(None)


class Workers(Service):
    """
    Starts and keeps ``count`` worker processes, each handed the listening
    sockets of *listeners* and the text of *config*, and adds up their
    metric families with *own*, this process's.
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        count: int,
        listeners: Sequence[BoundListener],
        own: Callable[[], list[Metric]],
    ) -> None:
        self._reactor = reactor
        self.clock = reactor
        self._config = config
        self._count = count
        self._listeners = listeners
        self._own = own
        self._running: dict[int, tuple[_Worker, Any]] = {}
        #: the cumulative families of the workers that ended
        self._retired: list[Metric] = []
        #: per worker: when it was last started, and the last wait before
        #: it was restarted
        self._started: dict[int, float] = {}
        self._delays: dict[int, float] = {}

    def startService(self) -> None:
        super().startService()
        for index in range(self._count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        inherited = []
        for number, listener in enumerate(self._listeners, start=3):
            socket_ = listener.inheritable()
            child_fds[number] = socket_.fd
            inherited.append([number, socket_.family, socket_.description])
        channel_fd = 3 + len(self._listeners)
        ours, theirs = socket.socketpair()
        child_fds[channel_fd] = theirs.fileno()
        worker = _Worker(self, index)
        try:
            transport = self._reactor.spawnProcess(
                worker,
                sys.executable,
                [
                    sys.executable,
                    "-m",
                    "regmirror.worker",
                    "-c",
                    self._config.path,
                    "--listeners",
                    json.dumps(inherited),
                    "--channel",
                    str(channel_fd),
                ],
                env=os.environ.copy(),
                childFDs=child_fds,
            )
            # The reactor's connection holds a socket of its own (a duplicate).
            self._reactor.adoptStreamConnection(
                ours.fileno(), socket.AF_UNIX, _serving(worker.channel)
            )
        finally:
            ours.close()
            theirs.close()
        # The configuration, secrets and all, through a pipe only the
        # worker reads; it starts once it has read to the end.
        transport.write(self._config.text.encode("utf-8"))
        transport.closeStdin()
        self._running[index] = (worker, transport)
        self._started[index] = self._reactor.seconds()
        log.info("started worker {index} (pid {pid})", index=index, pid=transport.pid)

    def gather(self) -> Deferred[list[Metric]]:
        """The machine's metric families: this process's and every worker's."""
        return Deferred.fromCoroutine(self._gather())

    async def _gather(self) -> list[Metric]:
        asked = [
            Deferred.fromCoroutine(worker.collect())
            for worker, _ in self._running.values()
        ]
        reports = [await d for d in asked]
        return combine([self._own(), *reports, self._retired])

    def ended(self, worker: _Worker, reason: Failure) -> None:
        if self._running.get(worker.index, (None,))[0] is not worker:
            return
        del self._running[worker.index]
        # Its counts stay in the totals; what it was doing ended with it.
        self._retired = combine(
            [self._retired, [f for f in worker.report if f.type != "gauge"]]
        )
        if self.running:
            delay = self._restart_delay(worker.index)
            log.warn(
                "worker {index} ended ({why}); restarting it in {delay}s",
                index=worker.index,
                why=reason.getErrorMessage(),
                delay=delay,
            )
            self._reactor.callLater(delay, self._restart, worker.index)
        else:
            log.info(
                "worker {index} ended ({why})",
                index=worker.index,
                why=reason.getErrorMessage(),
            )

    def _restart_delay(self, index: int) -> float:
        """How long to wait before starting worker *index* again: longer
        each time it dies soon after it started, not to spin on a fault
        that a restart does not mend."""
        ran = self._reactor.seconds() - self._started.get(index, 0.0)
        previous = self._delays.get(index)
        if previous is None or ran >= SETTLED:
            delay = RESTART_DELAY
        else:
            delay = min(previous * 2, MAX_RESTART_DELAY)
        self._delays[index] = delay
        return delay

    def _restart(self, index: int) -> None:
        if self.running and index not in self._running:
            self._spawn(index)

    def reload(self) -> None:
        """
        Ask every worker to reload (what SIGHUP does in the parent), over
        its channel rather than by a signal: a worker still starting reads
        the question once it serves, where SIGHUP's default action would
        have ended it before its handler was installed.
        """
        for index, (worker, _) in self._running.items():
            d = worker.channel.ask("reload")
            d.addErrback(_not_reloaded, index)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        waiting = []
        for worker, transport in self._running.values():
            transport.signalProcess("TERM")
            kill = self._reactor.callLater(STOP_GRACE, _kill, transport)
            worker.ended.addBoth(_cancel, kill)
            waiting.append(worker.ended)
        return DeferredList(waiting)


def _not_reloaded(failure: Failure, index: int) -> None:
    log.warn(
        "worker {index} did not reload: {why}",
        index=index,
        why=failure.getErrorMessage() or repr(failure.value),
    )


def _cancel(result: object, call: Any) -> object:
    if call.active():
        call.cancel()
    return result


def _kill(transport: Any) -> None:
    try:
        transport.signalProcess("KILL")
    except Exception:
        pass


class Parent(Service):
    """
    A worker's link to the parent process, over the socket it inherited as
    descriptor *fd*: answers the parent's questions with *own*, this
    process's metric families, and does its *reload* when asked; asks it
    for the machine's families; gives it the last counts when stopping;
    and calls *stop* (the reactor's) if the parent goes away, so that no
    worker outlives it.
    """

    def __init__(
        self,
        reactor: Any,
        fd: int,
        own: Callable[[], list[Metric]],
        stop: Callable[[], None],
        reload: Callable[[], None],
    ) -> None:
        self._reactor = reactor
        self._fd = fd
        self._own = own
        self._stop = stop
        self._reload = reload
        self.channel = Channel(self._answer)

    async def _answer(self, question: str, argument: Any) -> Any:
        if question == "collect":
            return export(self._own())
        if question == "reload":
            self._reload()
            return None
        raise ChannelError(f"no such question: {question}")

    def startService(self) -> None:
        super().startService()
        self._reactor.adoptStreamConnection(
            self._fd, socket.AF_UNIX, _serving(self.channel)
        )
        # The reactor's connection holds a socket of its own (a duplicate).
        os.close(self._fd)
        self.channel.lost.addCallback(self._parent_gone)

    def _parent_gone(self, _: object) -> None:
        if self.running:
            log.error("the parent process is gone: stopping this worker")
            self._stop()

    def gather(self) -> Deferred[list[Metric]]:
        """The machine's metric families, as the parent adds them up; this
        process's alone if the parent does not answer."""
        return Deferred.fromCoroutine(self._gather())

    async def _gather(self) -> list[Metric]:
        d = self.channel.ask("gather")
        d.addTimeout(GATHER_TIMEOUT, self._reactor)
        try:
            return revive(await d)
        except Exception as e:
            log.warn(
                "the parent did not give the machine's metrics ({why}): "
                "this worker's alone",
                why=str(e) or type(e).__name__,
            )
            return self._own()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._leave())

    async def _leave(self) -> None:
        d = self.channel.ask("final", export(self._own()))
        d.addTimeout(FINAL_TIMEOUT, self._reactor)
        try:
            await d
        except Exception as e:
            log.warn(
                "the parent did not take this worker's last counts: {why}",
                why=str(e) or type(e).__name__,
            )
        if self.channel.transport is not None:
            self.channel.transport.loseConnection()
