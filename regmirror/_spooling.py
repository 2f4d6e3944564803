"""
A body's bytes on their way into a download's spool, off the reactor
thread.

The reactor thread only queues what the source delivers, for two threads
that each take their queue a batch at a time, in order, for as long as
there is more: one writes the bytes to the spool and starts their
writeback to the disk (:meth:`regmirror._spool.Spool.put`), the other
hashes them (:meth:`~regmirror._spool.Spool.hash`).  Hashing, writing and the
network each get a core when there is one, with no round trip through
the reactor between batches.  After each batch written, the reactor
thread counts the bytes in the file (``Spool.written``).  Until then the
bytes received are in a :class:`Window`, which readers of this process
send from: a client gets the bytes as they arrive, not once the disk took
them (they are the same bytes objects the threads work on, so this costs
no memory).  While more than :data:`PAUSE_AT` bytes are held (not yet
both written and hashed), the source is paused: a disk or a thread pool
slower than the network slows the download, it does not fill memory.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from regmirror._spool import Spool

#: The most bytes a thread takes from its queue at once.
BATCH = 2 * 1024 * 1024
#: After this many bytes a thread goes on in a new job of the pool, behind
#: whatever else waits for one (another download's, a commit, a bcrypt
#: check): a fast download does not keep a thread of the pool to itself.
TURN = 16 * 1024 * 1024
#: Bytes held (received, not yet both written and hashed) at which the
#: source is paused, and resumed (the socket's own buffer holds what comes
#: meanwhile).
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
class _Lane:
    """
    One thread's share of the work on a body's bytes: a queue it takes in
    batches, in order, while there is more; what each batch came to is
    handed back to the reactor thread.
    """

    #: in the thread: a batch's work; the number of bytes it did
    work: Callable[[list[bytes]], int]
    #: on the reactor thread: that number
    did: Callable[[int], object]
    #: on the reactor thread: the work failed (what was queued is dropped)
    failed: Callable[[Failure], object]
    run_in_thread: RunInThread
    call_from_thread: CallFromThread
    _lock: threading.Lock = field(factory=threading.Lock)
    _queue: collections.deque[bytes] = field(factory=collections.deque)
    _taking: bool = False
    #: the work failed: nothing more is taken (a write after a failed one
    #: would put its bytes where the lost ones belong)
    _broken: bool = False

    def add(self, data: bytes) -> None:
        """Queue *data*, starting a thread's work if none is under way."""
        with self._lock:
            if self._broken:
                return
            self._queue.append(data)
            start, self._taking = not self._taking, True
        if start:
            self._start()

    def waiting(self) -> int:
        """How many buffers wait."""
        return len(self._queue)

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()

    def _start(self) -> None:
        self.run_in_thread(self._take).addErrback(self.failed)

    def _take(self) -> None:
        taken = 0
        while True:
            if taken >= TURN:
                # The pool's other work gets its turn: carry on in a new job.
                self.call_from_thread(self._start)
                return
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
                done = self.work(batch)
            except BaseException:
                with self._lock:
                    self._queue.clear()
                    self._broken = True
                raise
            taken += done
            self.call_from_thread(self.did, done)


@define(eq=False)
class Window:
    """
    The bytes received for a spool and not yet in its file, in order: the
    blob's bytes ``[start, end)``.  Used on the reactor thread only.
    """

    #: where the window starts in the blob: the file's end
    start: int
    _buffers: collections.deque[bytes] = field(factory=collections.deque)
    _held: int = 0

    @property
    def end(self) -> int:
        """Where the bytes received so far end in the blob."""
        return self.start + self._held

    def add(self, data: bytes) -> None:
        self._buffers.append(data)
        self._held += len(data)

    def written(self, count: int) -> None:
        """*count* more bytes are in the file: they leave the window."""
        self.start += count
        self._held -= count
        while count:
            first = self._buffers[0]
            if len(first) > count:
                self._buffers[0] = first[count:]
                return
            self._buffers.popleft()
            count -= len(first)

    def clear(self) -> None:
        """Nothing more is to be read from here (the download ended)."""
        self._buffers.clear()
        self._held = 0

    def peek(self, position: int, count: int) -> memoryview | None:
        """
        Up to *count* bytes from *position* of the blob (at least one),
        or ``None`` if the window does not hold that byte.
        """
        offset = position - self.start
        if offset < 0 or offset >= self._held:
            return None
        for data in self._buffers:
            if offset < len(data):
                return memoryview(data)[offset : offset + count]
            offset -= len(data)
        return None  # pragma: no cover - _held counts the buffers


@define(eq=False)
class Appender:
    """
    Appends one source's body to a spool in threads, in order, pausing
    the source (``pauseProducing``) while too much is held.

    :ivar appended: called on the reactor thread after bytes reached the
        file and were counted in ``spool.written``.
    :ivar failed: called once, on the reactor thread, when writing or
        hashing fails; what is queued is dropped, and so is whatever comes
        after.
    :ivar window: the bytes received and not yet in the file.
    """

    spool: Spool
    run_in_thread: RunInThread
    #: how the threads hand their progress to the reactor thread
    call_from_thread: CallFromThread
    appended: Callable[[], object]
    failed: Callable[[Failure], object]
    #: the source (its ``pauseProducing``/``resumeProducing``), once known
    producer: Any = None
    _received: int = 0
    _written: int = 0
    _hashed: int = 0
    _paused: bool = False
    _stopped: bool = False
    _drained: list[Deferred[None]] = field(factory=list)
    _writing: _Lane = field(init=False)
    _hashing: _Lane = field(init=False)
    window: Window = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.window = Window(self.spool.written)
        self._writing = _Lane(
            self.spool.put,
            self._wrote,
            self._failed,
            self.run_in_thread,
            self.call_from_thread,
        )
        self._hashing = _Lane(
            self._hash,
            self._hashed_some,
            self._failed,
            self.run_in_thread,
            self.call_from_thread,
        )

    @property
    def pending(self) -> int:
        """Bytes received and not yet counted in ``spool.written``."""
        return self._received - self._written

    @property
    def held(self) -> int:
        """Bytes received and not yet both written and hashed (in memory)."""
        return self._received - min(self._written, self._hashed)

    def add(self, data: bytes) -> None:
        """Queue *data* (after everything added before)."""
        if self._stopped or not data:
            return
        self._received += len(data)
        self.window.add(data)
        self._writing.add(data)
        self._hashing.add(data)
        if not self._paused and (
            self.held >= PAUSE_AT
            or max(self._writing.waiting(), self._hashing.waiting()) >= PAUSE_AT_BUFFERS
        ):
            self._paused = True
            if self.producer is not None:
                self.producer.pauseProducing()

    def drained(self) -> Deferred[None]:
        """Fires once every byte added is written and hashed (or dropped)."""
        if self.held == 0 or self._stopped:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def stop(self) -> None:
        """Drop what is queued, and whatever comes: the download ended."""
        self._stopped = True
        self._writing.clear()
        self._hashing.clear()
        self.window.clear()
        self._stop_waiting()

    def _hash(self, batch: list[bytes]) -> int:
        """In a thread: hash *batch*."""
        self.spool.hash(batch)
        return sum(len(data) for data in batch)

    def _wrote(self, count: int) -> None:
        """On the reactor thread: *count* more bytes are in the file."""
        if self._stopped:
            return
        self._written += count
        self.window.written(count)
        self.spool.written += count
        self._moved()
        self.appended()

    def _hashed_some(self, count: int) -> None:
        if self._stopped:
            return
        self._hashed += count
        self._moved()

    def _moved(self) -> None:
        if self._paused and self.held <= RESUME_AT:
            self._paused = False
            if self.producer is not None:
                self.producer.resumeProducing()
        if self.held == 0:
            self._stop_waiting()

    def _failed(self, failure: Failure) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._writing.clear()
        self._hashing.clear()
        self.window.clear()
        # Reported before whoever waits for the end is let go: the body
        # may have ended meanwhile, and its end, taken first, would blame
        # the source for the bytes the disk did not take.
        self.failed(failure)
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        waiting, self._drained = self._drained, []
        for d in waiting:
            d.callback(None)
