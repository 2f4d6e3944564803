"""
A body's bytes on their way into a download's spool, off the reactor
thread.

The reactor thread only queues what the source delivers.  A thread takes
the queue a batch at a time and appends it to the spool
(:meth:`regmirror.store.Spool.append`: written, hashed, handed to the
disk), in order, for as long as there is more: hashing and writing run on
another core, beside the network, with no round trip through the reactor
between batches.  After each batch the reactor thread counts the bytes for
readers (``Spool.written``): never before they are in the file.  While more
than :data:`PAUSE_AT` bytes wait, the source is paused: a disk or a thread
pool slower than the network slows the download, it does not fill memory.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from regmirror.store import Spool

#: The most bytes one append takes from the queue.
BATCH = 2 * 1024 * 1024
#: Bytes received and not yet in the spool at which the source is paused,
#: and resumed (the socket's own buffer holds what comes meanwhile).
PAUSE_AT = 8 * 1024 * 1024
RESUME_AT = 4 * 1024 * 1024
#: As many buffers waiting pause the source too: a source that delivers
#: tiny pieces must not queue millions of them.
PAUSE_AT_BUFFERS = 4096

RunInThread = Callable[[Callable[[], Any]], "Deferred[Any]"]
CallFromThread = Callable[..., object]


def call_here(f: Callable[..., object], *args: object) -> None:
    """A ``callFromThread`` for work that runs on the caller's thread
    (:func:`twisted.internet.defer.maybeDeferred` as ``run_in_thread``)."""
    f(*args)


@define(eq=False)
class Appender:
    """
    Appends one source's body to a spool in a thread, in order, pausing
    the source (``pauseProducing``) while too much waits.

    :ivar appended: called on the reactor thread after bytes reached the
        file and were counted in ``spool.written``.
    :ivar failed: called once, on the reactor thread, when an append
        fails; what is queued is dropped, and so is whatever comes after.
    """

    spool: Spool
    run_in_thread: RunInThread
    #: how the thread hands its progress to the reactor thread
    call_from_thread: CallFromThread
    appended: Callable[[], object]
    failed: Callable[[Failure], object]
    #: the source (its ``pauseProducing``/``resumeProducing``), once known
    producer: Any = None
    #: bytes received and not yet counted in ``spool.written``
    pending: int = 0
    _paused: bool = False
    _stopped: bool = False
    _drained: list[Deferred[None]] = field(factory=list)
    # Shared with the thread, under the lock: the queue, and whether a
    # thread is taking it.
    _lock: threading.Lock = field(factory=threading.Lock)
    _queue: collections.deque[bytes] = field(factory=collections.deque)
    _taking: bool = False

    def add(self, data: bytes) -> None:
        """Queue *data* (after everything added before)."""
        if self._stopped or not data:
            return
        self.pending += len(data)
        with self._lock:
            self._queue.append(data)
            start, self._taking = not self._taking, True
            waiting = len(self._queue)
        if start:
            self.run_in_thread(self._take).addErrback(self._failed)
        if not self._paused and (
            self.pending >= PAUSE_AT or waiting >= PAUSE_AT_BUFFERS
        ):
            self._paused = True
            if self.producer is not None:
                self.producer.pauseProducing()

    def drained(self) -> Deferred[None]:
        """Fires once every byte added is in the spool (or dropped)."""
        if self.pending == 0 or self._stopped:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def stop(self) -> None:
        """Drop what is queued, and whatever comes: the download ended."""
        self._stopped = True
        with self._lock:
            self._queue.clear()
        self._stop_waiting()

    def _take(self) -> None:
        """In a thread: append what is queued, batch after batch, until
        nothing is left."""
        while True:
            batch: list[bytes] = []
            size = 0
            with self._lock:
                while self._queue and size < BATCH:
                    data = self._queue.popleft()
                    batch.append(data)
                    size += len(data)
                if not batch:
                    self._taking = False
                    return
            try:
                appended = self.spool.append(batch)
            except BaseException:
                with self._lock:
                    self._queue.clear()
                    self._taking = False
                raise
            self.call_from_thread(self._progress, appended)

    def _progress(self, appended: int) -> None:
        """On the reactor thread: *appended* more bytes are in the spool."""
        if self._stopped:
            return
        self.spool.written += appended
        self.pending -= appended
        if self._paused and self.pending <= RESUME_AT:
            self._paused = False
            if self.producer is not None:
                self.producer.resumeProducing()
        self.appended()
        if self.pending == 0:
            self._stop_waiting()

    def _failed(self, failure: Failure) -> None:
        stopped = self._stopped
        self.stop()
        if not stopped:
            self.failed(failure)

    def _stop_waiting(self) -> None:
        waiting, self._drained = self._drained, []
        for d in waiting:
            d.callback(None)
