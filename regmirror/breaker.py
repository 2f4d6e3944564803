"""
The health of one upstream, as the pools see it: :class:`Breaker`.

With a record (``<cache>/health/<upstream>``), every process using the
cache folder (``workers``, the ``prefetch`` command) shares one breaker per
upstream: one process opening it keeps all of them away from the upstream,
one probe or recovery look closing it lets all of them back, and a 429's
back-off holds for all.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable
from typing import TypeVar

from attrs import define, evolve, field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

T = TypeVar("T")

#: A back-off doubles each time the breaker opens again, up to this many
#: times the first.
MAX_BACKOFF_FACTOR = 10


@frozen
class Health:
    """
    One upstream's health: what a :class:`Breaker` keeps, in memory or in
    its record.  Times are wall-clock seconds (the reactor's), which every
    process of a machine reads alike.
    """

    #: failed answers in a row
    failures: int = 0
    #: blob transfers in a row that broke off (an answer's headers do not
    #: end the run: a mirror that cuts every body answers every request)
    broken: int = 0
    #: how many times in a row it opened; 0 means closed
    opened: int = 0
    open_until: float = 0.0
    #: a probe is under way (somewhere) until then: the prober answers,
    #: or after one back-off another may probe (the prober may have died)
    probe_until: float = 0.0
    #: when :meth:`Upstream.recover` last looked, while open (the failure
    #: that opened it counts as a look: the first is one interval later)
    looked_at: float = 0.0
    #: when a 429 lets the upstream be asked again
    backoff_until: float = 0.0
    #: when an answer last cleared failures (closed it, or ended a run of
    #: failed answers): what failed before is worth asking again
    closed_at: float = 0.0


def _open_now(health: Health, now: float) -> bool:
    """Is the breaker open, its back-off not over?"""
    return health.opened > 0 and now < health.open_until


#: :class:`Health` in a record: the fields in order, little-endian.
_RECORD = struct.Struct("<3q5d")


def _pack(health: Health) -> bytes:
    return _RECORD.pack(
        health.failures,
        health.broken,
        health.opened,
        health.open_until,
        health.probe_until,
        health.looked_at,
        health.backoff_until,
        health.closed_at,
    )


def _unpack(data: bytes) -> Health:
    if len(data) != _RECORD.size:
        return Health()  # new (empty), or not ours: start afresh
    return Health(*_RECORD.unpack(data))


@define(eq=False)
class Breaker:
    """
    The health of one upstream: a circuit breaker.

    Closed, requests flow.  A transport failure (no connection, a timeout)
    opens it at once; ``threshold`` failed answers in a row (5xx, garbage)
    open it too, and so do ``threshold`` blob transfers in a row that break
    off mid-body.  Open, the upstream is skipped for ``backoff`` seconds,
    doubling each time it opens again (up to ten times), so a dead upstream
    costs at most one failed attempt per period.  Then one request probes
    it (half open): success closes the breaker, failure opens it again.

    With a *record* (a file path) the breaker's :class:`Health` lives
    there, for every process that uses the same path: a fixed-size record
    read under a shared ``flock`` and changed under an exclusive one (the
    file descriptor stays open: a read costs what a ``stat`` would).
    Without one, or when the file cannot be used, it lives in memory.
    """

    clock: IReactorTime
    threshold: int = 3
    backoff: float = 30.0
    record: str | None = None
    _health: Health = field(factory=Health, init=False)
    _fd: int | None = field(default=None, init=False)
    #: this breaker let the probe through (and no answer came yet)
    _probing: bool = field(default=False, init=False)
    log = Logger()

    def health(self) -> Health:
        """The upstream's health now (as every process sharing it sees it)."""
        if self.record is not None:
            try:
                return self._read_record()
            except OSError as e:
                self._give_up_record(e)
        return self._health

    @property
    def opened(self) -> int:
        """How many times in a row it opened; 0 means closed."""
        return self.health().opened

    @property
    def open_until(self) -> float:
        return self.health().open_until

    def allow(self) -> bool:
        """May a request go to the upstream now?  Once an open breaker's
        back-off has passed, one request (of all the processes sharing it)
        may: the probe."""
        now = self.clock.seconds()
        health = self.health()
        if health.opened == 0:
            return True
        if self._waiting(health, now):
            return False

        def claim(health: Health) -> tuple[Health, tuple[bool, bool]]:
            if health.opened == 0:
                return health, (True, False)  # closed meanwhile
            if self._waiting(health, now):
                return health, (False, False)
            return evolve(health, probe_until=now + self.backoff), (True, True)

        allowed, self._probing = self._change(claim)
        return allowed

    @staticmethod
    def _waiting(health: Health, now: float) -> bool:
        """Open, and not due for a probe (or another request probes)?"""
        return now < health.open_until or now < health.probe_until

    def succeeded(self) -> bool:
        """Record an answer; ``True`` if this closed an open breaker."""
        self._probing = False
        current = self.health()
        if current.failures == current.opened == 0 and not current.probe_until:
            return False  # the common case: nothing to change

        now = self.clock.seconds()

        def close(health: Health) -> tuple[Health, bool]:
            closed = evolve(
                health, failures=0, opened=0, probe_until=0.0, closed_at=now
            )
            return closed, health.opened > 0

        return self._change(close)

    def abandoned(self) -> None:
        """A request ended with neither answer nor fault (cancelled)."""
        if self._probing:
            self._probing = False
            self._change(lambda h: (evolve(h, probe_until=0.0), None))

    def failed(self, transport: bool) -> float | None:
        """Record a failure; the seconds it is now open for, if it opened."""
        probing, self._probing = self._probing, False
        now = self.clock.seconds()

        def fail(health: Health) -> tuple[Health, float | None]:
            if not probing and _open_now(health, now):
                # Sent before it opened (requests at once, one marked it
                # down): the back-off is not doubled for them, no probe
                # having failed.
                return health, None
            health = evolve(health, failures=health.failures + 1)
            if not (transport or probing or health.failures >= self.threshold):
                return health, None
            return self._open(health, now)

        return self._change(fail)

    def broke(self) -> float | None:
        """
        Record a blob transfer that broke off; ``threshold`` in a row, with
        no whole transfer between, open the breaker (the seconds it is now
        open for, if it opened).
        """
        now = self.clock.seconds()

        def broke(health: Health) -> tuple[Health, float | None]:
            if _open_now(health, now):
                return health, None  # a transfer begun before it opened
            if health.broken + 1 < self.threshold:
                return evolve(health, broken=health.broken + 1), None
            return self._open(evolve(health, broken=0), now)

        return self._change(broke)

    def transferred(self) -> None:
        """A blob transfer arrived whole."""
        if self.health().broken:
            self._change(lambda h: (evolve(h, broken=0), None))

    def look(self, interval: float) -> bool:
        """
        May :meth:`Upstream.recover` look at the upstream now (open, and
        not looked at, by any process, within *interval* seconds)?  A
        ``True`` counts as the look.
        """
        now = self.clock.seconds()

        def due(health: Health) -> bool:
            return health.opened > 0 and now >= health.looked_at + interval

        if not due(self.health()):
            return False
        return self._change(
            lambda h: (evolve(h, looked_at=now), True) if due(h) else (h, False)
        )

    def rate_limited(self, until: float) -> None:
        """A 429: the upstream is not to be asked before *until*."""
        self._change(lambda h: (evolve(h, backoff_until=until), None))

    def backing_off(self) -> float | None:
        """Seconds left of a 429's back-off, or ``None``."""
        left = self.health().backoff_until - self.clock.seconds()
        return left if left > 0 else None

    def reset(self) -> None:
        """Forget everything: a mirror starting learns its upstreams afresh
        (the record may be from a run with another configuration); what
        failed before is worth asking again (``closed_at``: an earlier
        run's failed tag checks, :mod:`regmirror.failures`, end here)."""
        self._probing = False
        now = self.clock.seconds()
        self._change(lambda h: (Health(closed_at=now), None))

    def close(self) -> None:
        """Close the record's file (it is opened again when next used)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self, health: Health, now: float) -> tuple[Health, float]:
        factor = min(2 ** min(health.opened, 16), MAX_BACKOFF_FACTOR)
        delay = float(self.backoff * factor)
        opened = evolve(
            health,
            opened=health.opened + 1,
            open_until=now + delay,
            probe_until=0.0,
            looked_at=now,
        )
        return opened, delay

    def _change(self, change: Callable[[Health], tuple[Health, T]]) -> T:
        """Apply *change* (old health → new health, outcome); its outcome."""
        if self.record is not None:
            try:
                return self._change_record(change)
            except OSError as e:
                self._give_up_record(e)
        self._health, outcome = change(self._health)
        return outcome

    def _descriptor(self) -> int:
        if self._fd is None:
            assert self.record is not None
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            try:
                self._fd = os.open(self.record, flags, 0o644)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(self.record), exist_ok=True)
                self._fd = os.open(self.record, flags, 0o644)
        return self._fd

    def _read_record(self) -> Health:
        fd = self._descriptor()
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            return _unpack(os.pread(fd, _RECORD.size, 0))
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _change_record(self, change: Callable[[Health], tuple[Health, T]]) -> T:
        fd = self._descriptor()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            before = os.pread(fd, _RECORD.size, 0)
            after, outcome = change(_unpack(before))
            packed = _pack(after)
            if packed != before:
                os.pwrite(fd, packed, 0)
            return outcome
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _give_up_record(self, error: OSError) -> None:
        self.log.error(
            "cannot use {path} ({why}): this process keeps the upstream's health alone",
            path=self.record,
            why=error.strerror,
        )
        self.close()
        self.record = None
