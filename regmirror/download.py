"""
One blob on its way into the cache, and the readers waiting for its bytes.

A :class:`Download` is a spool file that grows (written here by
:mod:`regmirror.blobs`, or by another worker process and only watched
here: :mod:`regmirror.siblings`) and the readers of
:mod:`regmirror.readers` that tail it.  It says how far they may read (one
byte short of the end until the digest is verified), from the file or,
for bytes received by this process and not yet written, from memory (its
:attr:`~Download.window`), and wakes them when more is there: in a few
large steps for a fast download, with little delay for a slow one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from regmirror._attempts import Attempts
from regmirror._spool import Spool
from regmirror._spooling import Window
from regmirror.cluster import Lease
from regmirror.pool import UpstreamPool
from regmirror.reference import Digest
from regmirror.upstream import Upstream

#: A reader waiting for a download under way is woken once this many more
#: bytes are there for it, or WAKE_DELAY seconds after the first append it
#: saw: a fast download reaches its readers in a few large sends instead
#: of one per upstream read (for each reader), a slow one with little delay.
WAKE_BYTES = 1024 * 1024
WAKE_DELAY = 0.02

#: What a reader waits for when only the end of the download (verified, or
#: failed) lets it go on: no number of appended bytes.
UNTIL_END = sys.maxsize

#: How a download's bytes come from another node, for people: this and
#: the node's URL.
PEER_PREFIX = "node "


@define(eq=False)
class Download:
    """
    One blob on its way into the cache: from an upstream, the cluster's
    bucket or another node (see :mod:`regmirror.sources`), or downloaded
    by another worker process.

    :ivar size: the size the source announced, when it did.
    :ivar state: ``"running"``, ``"done"`` or ``"failed"``.
    """

    digest: Digest
    spool: Spool | Followed
    #: the namespace's upstreams (``None`` when following another worker)
    pool: UpstreamPool | None
    repository: str
    size: int | None = None
    #: where the bytes come from now, for people: an upstream's name,
    #: ``shared store``, ``node <URL>`` or ``another worker``
    source: str = ""
    #: the upstream, when the bytes come from one
    upstream: Upstream | None = None
    #: this node's claim on the digest, when it downloads for the cluster
    lease: Lease | None = None
    #: what the bucket did for this download: ``""`` (not asked),
    #: ``"absent"``, ``"absent under the lease"`` (asked again once this
    #: node held the digest's lease), ``"failed"`` or ``"used"``
    bucket: str = ""
    #: another process is downloading; this one only watches its spool
    follower: bool = False
    state: str = "running"
    #: why the cache could not take the bytes, when that is why the
    #: download failed: the disk's fault, not the source's
    cache_error: OSError | None = None
    #: the transfers so far, and where the next one comes from
    attempts: Attempts = field(factory=Attempts)
    #: how many times the transfer was resumed after breaking
    resumed: int = 0
    #: the ranged segments ``(start, end)`` the blob comes in, at once,
    #: when its upstream honours ``Range`` (:mod:`regmirror._segments`)
    segments: list[tuple[int, int]] | None = None
    #: the other namespaces whose upstreams confirmed the digest while it
    #: downloaded, recorded with it once it is cached
    vouchers: set[str] = field(factory=set)
    #: the other namespaces that joined it, vouching for the digest: their
    #: upstreams give the rest if this namespace's cannot
    joined: dict[str, tuple[UpstreamPool, str]] = field(factory=dict)
    #: bounds how long a reader waits for more bytes; without it, every
    #: append wakes every reader
    clock: IReactorTime | None = None
    #: closes the connections of the transfer under way, dropping what
    #: they bring (set by what receives the bytes; ``None`` once every
    #: byte is in): see :meth:`regmirror.blobs.Blobs.cancel`
    stop: Callable[[], None] | None = None
    #: the bytes received by this process and not yet in the spool file,
    #: for its readers (set by what receives them)
    window: Window | None = None
    _waiting: list[_Waiter] = field(factory=list)
    _timer: IDelayedCall | None = None

    @property
    def written(self) -> int:
        return self.spool.written

    @property
    def writer(self) -> Spool:
        """The spool this process writes (never a follower's)."""
        assert isinstance(self.spool, Spool), "a follower does not write"
        return self.spool

    @property
    def from_peer(self) -> bool:
        """Do the bytes come from another node?"""
        return self.source.startswith(PEER_PREFIX)

    @property
    def received(self) -> int:
        """How many bytes this process has, in the file or in its window."""
        window = self.window
        if window is None or self.state != "running":
            return self.written
        return max(self.written, window.end)

    @property
    def readable(self) -> int:
        """How many bytes readers may send: all once verified, else one less."""
        if self.state == "done":
            return self.written
        return max(0, self.received - 1)

    async def sized(self) -> int | None:
        """
        The blob's size: the one announced, else (its source did not say
        it) its length once every byte is in and verified; ``None`` if the
        download failed first.
        """
        while self.size is None and self.state == "running":
            await self.changed(UNTIL_END)
        if self.size is not None:
            return self.size
        return self.written if self.state == "done" else None

    def changed(self, written: int = 0) -> Deferred[None]:
        """
        Fires when the download ends or a follower looks, at the first
        append that brings it to *written* bytes, and at the latest (with a
        clock) :data:`WAKE_DELAY` seconds after an append this wait saw.
        """
        if self.state != "running":
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(_Waiter(written, d))
        return d

    def notify(self) -> None:
        """Something changed (the download ended, a follower's look): wake all."""
        waking, self._waiting = self._waiting, []
        self._stop_timer()
        self._wake(waking)

    def appended(self) -> None:
        """
        Bytes were received or written: wake the waiters whose bytes are
        there (:attr:`received`), and
        make sure the others are woken within :data:`WAKE_DELAY` (all of
        them at once without a clock).
        """
        clock = self.clock
        if clock is None or self.state != "running":
            self.notify()
            return
        waking, staying = [], []
        written = self.received
        late = clock.seconds() + WAKE_DELAY
        for waiter in self._waiting:
            if waiter.written <= written:
                waking.append(waiter)
            else:
                if waiter.deadline is None and waiter.written != UNTIL_END:
                    waiter.deadline = late
                staying.append(waiter)
        self._waiting = staying
        if staying and self._timer is None:
            self._timer = clock.callLater(WAKE_DELAY, self._wake_late)
        self._wake(waking)

    def _wake_late(self) -> None:
        """Wake those who have waited long enough since bytes came for them."""
        self._timer = None
        assert self.clock is not None
        now = self.clock.seconds()
        waking = [
            w for w in self._waiting if w.deadline is not None and w.deadline <= now
        ]
        self._waiting = [w for w in self._waiting if w not in waking]
        deadlines = [w.deadline for w in self._waiting if w.deadline is not None]
        if deadlines:
            self._timer = self.clock.callLater(min(deadlines) - now, self._wake_late)
        self._wake(waking)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    @staticmethod
    def _wake(waking: list[_Waiter]) -> None:
        for waiter in waking:
            if not waiter.fired.called:
                waiter.fired.callback(None)


@define(eq=False)
class _Waiter:
    """Someone waiting for a download to reach *written* bytes."""

    written: int
    fired: Deferred[None]
    #: when it is woken anyway: set at the first append it sees, so that
    #: no timer runs for readers of a stalled download
    deadline: float | None = None


@define(eq=False)
class Followed:
    """What this process knows of another process's spool file."""

    path: str
    final_path: str
    written: int = 0
