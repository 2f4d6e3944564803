"""
Where a process's listeners come from.

The ``twistd`` process binds each endpoint description of ``[server]
listen`` and ``metrics_listen`` (:class:`Bind`); a worker process adopts
the listening sockets it inherited from it (:class:`Adopt`), and every
process sharing a socket accepts one connection at a time on it
(:class:`_SharedTCPPort`).  Either way a listener is a service, started
and stopped with the rest of the tree, and an ``ssl:`` listener comes
with the certificate that SIGHUP reloads.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence
from typing import Any, Protocol

from attrs import frozen
from twisted.application.service import Service
from twisted.internet import tcp, unix
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.python.failure import Failure

from regmirror.tls_listener import (
    ListenerTLSFactory,
    ReloadableTLS,
    parse_tls_listener,
    tls_listener,
)


class Listeners(Protocol):
    """Makes the listener of an endpoint description, served by a factory."""

    def listener(
        self, description: str, factory: IProtocolFactory
    ) -> tuple[Service, ReloadableTLS | None]:
        """The listener's service, and the certificate of an ``ssl:`` one."""


@frozen
class Inherited:
    """A listening socket a worker inherited: its descriptor, its address
    family, and the description the parent bound it from."""

    fd: int
    family: int
    description: str


#: The wildcard addresses: every IPv4 address, every address.
_ANY_IPV4 = ipaddress.ip_address("0.0.0.0")
_ANY = ipaddress.ip_address("::")


@frozen
class Address:
    """
    What a listener binds: a TCP *port* on *interface* (an address, or a
    name as written), or the UNIX socket at *path*.
    """

    port: int | None = None
    interface: str = ""
    path: str | None = None

    def _ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(self.interface)
        except ValueError:
            return None

    def where(self) -> str:
        ip = self._ip()
        if ip == _ANY_IPV4:
            return "every IPv4 address"
        if ip == _ANY:
            return "every address"
        return self.interface

    def clashes(self, other: Address) -> bool:
        """Can the two not be bound at once? Only when that is certain."""
        if self.path is not None or other.path is not None:
            return self.path == other.path
        if self.port != other.port or not self.port:
            return False  # port 0: the kernel picks a free one each time
        mine, theirs = self._ip(), other._ip()
        if mine is None or theirs is None:
            return self.interface == other.interface
        if _ANY in (mine, theirs):
            # An IPv6 socket on :: takes IPv4 too (Linux's default).
            return True
        if _ANY_IPV4 in (mine, theirs):
            return mine.version == theirs.version
        return mine == theirs


def _endpoint_arguments(description: str) -> tuple[list[str], dict[str, str]]:
    """
    The arguments of a Twisted endpoint string after its type, positional
    and by keyword, as Twisted reads them (``\\`` escapes the next
    character, ``:`` separates, the first ``=`` names).
    """
    positional: list[str] = []
    named: dict[str, str] = {}
    pieces: list[tuple[str | None, str]] = []
    key: str | None = None
    text = ""
    characters = iter(description)
    for character in characters:
        if character == "\\":
            text += next(characters, "")
        elif character == ":":
            pieces.append((key, text))
            key, text = None, ""
        elif character == "=" and key is None:
            key, text = text, ""
        else:
            text += character
    pieces.append((key, text))
    for key, text in pieces[1:]:
        if key is None:
            positional.append(text)
        else:
            named[key] = text
    return positional, named


#: Per type of endpoint: the order of its positional arguments, and the
#: interface it binds by default.
_TCP_ARGUMENTS = {
    "tcp": (("port", "interface", "backlog"), "0.0.0.0"),
    "tcp6": (("port", "backlog", "interface"), "::"),
    "ssl": (("port",), "0.0.0.0"),
}


def listen_address(description: str) -> Address | None:
    """
    What the listener of *description* binds, for ``tcp:``, ``tcp6:``,
    ``ssl:`` and ``unix:`` endpoints; ``None`` for other kinds.

    :raises ValueError: for a port number above 65535, or not in ASCII
        digits.
    """
    kind = description.partition(":")[0].lower()
    positional, named = _endpoint_arguments(description)
    if kind == "unix":
        _check_backlog(
            named.get("backlog", positional[2] if len(positional) > 2 else None)
        )
        path = named.get("address", positional[0] if positional else "")
        return Address(path=os.path.abspath(path)) if path else None
    if kind not in _TCP_ARGUMENTS:
        return None
    order, default = _TCP_ARGUMENTS[kind]
    arguments = {**dict(zip(order, positional, strict=False)), **named}
    _check_backlog(arguments.get("backlog"))
    port = arguments.get("port", "")
    if not port.isdigit():
        return None  # Twisted's parser says what is wrong
    if not port.isascii():
        # int() (Twisted's too) takes the digits of every script.
        raise ValueError(f"port {port} is not in ASCII digits")
    if int(port) > 65535:
        raise ValueError(f"port {port} is not between 0 and 65535")
    return Address(int(port), arguments.get("interface") or default)


#: The longest listen queue a description may name (the kernel caps it at
#: ``net.core.somaxconn`` anyway).
MAX_BACKLOG = 65535


def _check_backlog(backlog: str | None) -> None:
    """
    :raises ValueError: for a ``backlog`` that is not a whole number from 1
        to :data:`MAX_BACKLOG` in ASCII digits (Twisted's ``int()`` took
        other scripts' digits, ``-1`` for a queue of none, and a number too
        large only failed when binding).
    """
    if not backlog:
        return
    if not (backlog.isascii() and backlog.isdigit()) or not (
        1 <= int(backlog) <= MAX_BACKLOG
    ):
        raise ValueError(
            f"backlog {backlog[:20]} is not a whole number from 1 to {MAX_BACKLOG}"
        )


class _Listening(Service):
    """A service holding a listening port from its start to its stop."""

    port: Any = None

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class BoundListener(_Listening):
    """
    Listens on an endpoint, failing start-up at once if it cannot, and
    keeps the port so that worker processes can be handed its socket.

    Twisted's ``StreamServerEndpointService`` does the first only through
    its private ``_raiseSynchronously`` and keeps the port in its private
    ``_waitingForPort``; these few lines say both in public terms.
    """

    def __init__(self, endpoint: Any, factory: IProtocolFactory, description: str):
        self._endpoint = endpoint
        self._factory = factory
        self.description = description
        self.port: Any = None

    def privilegedStartService(self) -> None:
        # Bound here, as twistd's own listeners are: before privileges are
        # dropped and before the reactor runs, so that a port that cannot
        # be had ends start-up with an error instead of a mirror that
        # listens nowhere.
        super().privilegedStartService()
        outcome: list[Any] = []
        self._endpoint.listen(self._factory).addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            raise SystemExit(
                f"regmirror: cannot listen on {self.description}: "
                f"{outcome[0].getErrorMessage()}"
            )
        self.port = outcome[0] if outcome else None

    def inheritable(self) -> Inherited:
        """The socket, for a worker process to adopt."""
        host = self.port.getHost()
        if not hasattr(host, "host"):
            family = socket.AF_UNIX
        elif ":" in host.host:
            family = socket.AF_INET6
        else:
            family = socket.AF_INET
        return Inherited(int(self.port.fileno()), int(family), self.description)


class AdoptedListener(_Listening):
    """
    Accepts on a listening socket this process inherited, from
    :meth:`startService` to :meth:`stopService`.
    """

    def __init__(
        self, reactor: Any, inherited: Inherited, factory: IProtocolFactory
    ) -> None:
        self._reactor = reactor
        self._inherited = inherited
        self._factory = factory
        self.description = inherited.description
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        fd = self._inherited.fd
        # What the reactor's adoptStreamPort does, with a port that shares
        # the socket (and, for UNIX, leaves its file to the process that
        # bound it).
        if self._inherited.family == socket.AF_UNIX:
            self.port = _AdoptedUNIXPort._fromListeningDescriptor(
                self._reactor, fd, self._factory
            )
        else:
            self.port = _SharedTCPPort._fromListeningDescriptor(
                self._reactor, fd, self._inherited.family, self._factory
            )
        self.port.startListening()
        # The port holds a socket of its own (a duplicate).
        os.close(fd)


class _SharedTCPPort(tcp.Port):
    """
    A listening socket that other processes accept on too (``workers``):
    one connection accepted each time it is readable.  Every process
    waiting on the socket is woken for a new connection; Twisted's port
    accepts all those pending at once (up to ``numberAccepts``, 100 at
    first, 20 more after each time it took that many), so that one process
    took a whole burst, and its TLS handshakes, while another sat idle.
    Taking one at a time, a process busy with those it has leaves the next
    to one that is waiting (a process woken for a connection another took
    finds none, which Twisted ignores).
    """

    def doRead(self) -> None:
        # Twisted's doRead raises it again after a full batch.
        self.numberAccepts = 1
        super().doRead()


class _SharedUNIXPort(_SharedTCPPort, unix.Port):
    """A UNIX socket that other processes accept on too
    (:class:`_SharedTCPPort`), bound by this one."""


class _AdoptedUNIXPort(_SharedUNIXPort):
    """
    A UNIX socket another process bound (``twistd``) and this one accepts
    on: Twisted's port removes the socket's file when it stops listening,
    which is the binder's to do (a worker stopping alone took the path
    away from the processes still serving it, and every stop after the
    first failed with FileNotFoundError).
    """

    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)


class _SharedListening:
    """
    *reactor*, whose ``listenTCP`` and ``listenUNIX`` make ports that other
    processes can share (:class:`_SharedTCPPort`), as the reactor's own
    methods make Twisted's: for the endpoints of the parent's listeners
    when worker processes accept on them too.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(
        self,
        port: int,
        factory: IProtocolFactory,
        backlog: int = 50,
        interface: str = "",
    ) -> _SharedTCPPort:
        listening = _SharedTCPPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening

    def listenUNIX(
        self,
        address: Any,  # str from the endpoint, bytes in Twisted's hint
        factory: IProtocolFactory,
        backlog: int = 50,
        mode: int = 0o666,
        wantPID: int = 0,
    ) -> _SharedUNIXPort:
        listening = _SharedUNIXPort(
            address, factory, backlog, mode, self._reactor, wantPID
        )
        listening.startListening()
        return listening


#: The listen queue of a listener whose description names none: Twisted's
#: 50 drops the connections of a burst beyond it (a CI farm's pulls),
#: whose clients then wait a second for their SYN to be sent again.  The
#: kernel caps it at ``net.core.somaxconn``.
DEFAULT_BACKLOG = 1024

#: Where each kind of listener takes ``backlog`` as a positional argument.
_BACKLOG_POSITION = {"tcp": 2, "tcp6": 1, "unix": 2}


def with_backlog(description: str) -> str:
    """*description*, with ``backlog=`` :data:`DEFAULT_BACKLOG` unless it
    names one (``tcp:``, ``tcp6:``, ``unix:``, ``ssl:``; others as given)."""
    kind = description.partition(":")[0].lower()
    if kind not in (*_BACKLOG_POSITION, "ssl"):
        return description
    positional, named = _endpoint_arguments(description)
    if "backlog" in named or len(positional) > _BACKLOG_POSITION.get(kind, 99):
        return description
    return f"{description}:backlog={DEFAULT_BACKLOG}"


def _forget_own_stale_lock(description: str) -> None:
    """
    Remove the lock of a UNIX listener's socket (Twisted's ``PATH.lock``,
    a link naming the binder's pid) when it names this very process,
    which has not bound it yet: it was left by an earlier run that had the
    same pid, as ``twistd`` always has in a container (pid 1), and Twisted,
    which finds that pid alive, would refuse to listen at every restart.
    """
    address = listen_address(description)
    if address is None or address.path is None:
        return
    lock = address.path + ".lock"
    try:
        if os.readlink(lock) == str(os.getpid()):
            os.unlink(lock)
    except OSError:
        pass  # none, or not a link: Twisted decides


class Bind:
    """The parent's listeners: bound from their endpoint descriptions,
    with a listen queue of :data:`DEFAULT_BACKLOG` unless they name one;
    *shared* when worker processes accept on them too, so that each
    process takes one connection at a time (:class:`_SharedTCPPort`)."""

    def __init__(self, reactor: Any, shared: bool = False) -> None:
        self._reactor = _SharedListening(reactor) if shared else reactor

    def listener(
        self, description: str, factory: IProtocolFactory
    ) -> tuple[BoundListener, ReloadableTLS | None]:
        certificate = None
        if description.partition(":")[0].lower() == "unix":
            _forget_own_stale_lock(description)
        queued = with_backlog(description)
        if description.startswith("ssl:"):
            endpoint, certificate = tls_listener(self._reactor, queued)
        else:
            endpoint = serverFromString(self._reactor, queued)
        return BoundListener(endpoint, factory, description), certificate


class Adopt:
    """
    A worker's listeners: the sockets the parent bound, inherited in the
    order the parent asked for them (two listeners may share a description,
    ``tcp:0`` say).
    """

    def __init__(self, reactor: Any, inherited: Sequence[Inherited]) -> None:
        self._reactor = reactor
        self._inherited = list(inherited)

    def listener(
        self, description: str, factory: IProtocolFactory
    ) -> tuple[AdoptedListener, ReloadableTLS | None]:
        """
        :raises ValueError: when the parent handed no socket for
            *description* (its configuration was changed meanwhile).
        """
        if not self._inherited or self._inherited[0].description != description:
            raise ValueError(f"no socket inherited for {description}")
        inherited = self._inherited.pop(0)
        factory, certificate = serving_factory(factory, description, self._reactor)
        return AdoptedListener(self._reactor, inherited, factory), certificate


def serving_factory(
    factory: IProtocolFactory, description: str, clock: Any
) -> tuple[IProtocolFactory, ReloadableTLS | None]:
    """
    What serves an adopted socket described by *description* as its
    endpoint would: *factory* itself, or behind TLS for ``ssl:`` (an
    adopted socket has no endpoint to add it); the certificate to reload
    on SIGHUP.
    """
    if not description.startswith("ssl:"):
        return factory, None
    certificate = ReloadableTLS(parse_tls_listener(description))
    return ListenerTLSFactory(certificate, False, factory, clock=clock), certificate
