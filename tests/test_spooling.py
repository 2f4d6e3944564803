"""
A download's bytes appended to its spool off the reactor thread
(:mod:`regmirror._spooling`, :meth:`regmirror.store.Spool.append`): in
order, hashed whole, counted for readers only once in the file, with the
source paused while the thread is behind; and the last byte of a blob
still waits for the digest check and the flush to disk.

The "thread" here is a queue of jobs the test runs when it chooses.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import treq
from fakeregistry import FakeRegistry
from memory import LAYER, Harness, image, result
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import LogEvent, formatEvent
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from regmirror import _spool as spool_module
from regmirror._receiving import SpoolWriter
from regmirror._sendfile import SocketSender
from regmirror._spool import WRITEBACK_STEP, Spool, SpoolClosed
from regmirror._spooling import (
    BATCH,
    PAUSE_AT,
    RESUME_AT,
    TURN,
    Appender,
    Window,
    _Lane,
    call_here,
)
from regmirror.download import Download
from regmirror.readers import BlobSource
from regmirror.reference import Digest
from regmirror.store import Store

MIB = 1024 * 1024


class Threads:
    """``run_in_thread`` whose jobs wait until the test runs them."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((work, d))
        return d

    def run(self) -> None:
        """Run the oldest job, as a thread would, and report its outcome."""
        work, d = self.jobs.pop(0)
        maybeDeferred(work).chainDeferred(d)

    def run_all(self) -> None:
        while self.jobs:
            self.run()


class Producer:
    """A source that counts how often it was paused and resumed."""

    def __init__(self) -> None:
        self.paused = self.resumed = self.stopped = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        self.stopped += 1


def spool_for(tmp_path: Path, data: bytes) -> tuple[Store, Spool]:
    store = Store(str(tmp_path / "cache"))
    store.open()
    return store, store.spool(Digest.of(data))


def appender(spool: Any, threads: Threads, events: list[str] | None = None) -> Appender:
    log = events if events is not None else []
    return Appender(
        spool,
        threads,
        call_here,
        lambda: log.append(f"appended {spool.written}"),
        lambda failure: log.append(f"failed {failure.value!r}"),
    )


def file_bytes(spool: Spool) -> bytes:
    with open(spool.path, "rb") as f:
        return f.read()


def test_bytes_count_for_readers_once_written_and_the_end_waits_for_the_hash(
    tmp_path: Path,
) -> None:
    """What the source delivers waits for two threads, one writing, one
    hashing: it is neither in the file nor in ``written`` (how far the file
    goes) before the writing thread ran; then all of it, in order; the
    end (drained) waits for the hashing thread too, whose hash covers
    every byte."""
    data = os.urandom(3 * MIB + 123)
    _, spool = spool_for(tmp_path, data)
    threads = Threads()
    events: list[str] = []
    a = appender(spool, threads, events)
    pieces = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    for piece in pieces:
        a.add(piece)
    assert len(threads.jobs) == 2, "two threads, however many pieces"
    assert spool.written == 0 and file_bytes(spool) == b""
    assert a.pending == len(data)
    drained = a.drained()
    threads.run()  # writing
    assert file_bytes(spool) == data
    assert spool.written == len(data) and a.pending == 0
    assert events == [f"appended {BATCH}", f"appended {len(data)}"]
    assert not drained.called
    threads.run()  # hashing
    assert drained.called
    spool.verify()  # raises if the hash missed or reordered a byte


def test_the_window_holds_what_came_and_is_not_yet_written(tmp_path: Path) -> None:
    """The appender's window: every byte received and not yet in the file,
    at its place in the blob, across pieces, and none once written."""
    data = os.urandom(3 * MIB + 123)
    _, spool = spool_for(tmp_path, data)
    threads = Threads()
    a = appender(spool, threads)
    pieces = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    for piece in pieces:
        a.add(piece)
    window = a.window
    assert (window.start, window.end) == (0, len(data))
    assert bytes(window.peek(0, 10)) == data[:10]
    assert bytes(window.peek(65530, 100)) == data[65530:65536], "one piece a peek"
    assert bytes(window.peek(len(data) - 1, 10)) == data[-1:]
    assert window.peek(len(data), 1) is None
    threads.run()  # writing: all of it
    assert (window.start, window.end) == (len(data), len(data))
    assert window.peek(0, 10) is None


def test_a_window_gives_up_part_of_a_piece() -> None:
    window = Window(100)
    window.add(b"abcdef")
    window.add(b"ghij")
    window.written(4)
    assert (window.start, window.end) == (104, 110)
    assert bytes(window.peek(104, 10)) == b"ef"
    assert bytes(window.peek(106, 10)) == b"ghij"
    assert window.peek(103, 1) is None
    window.clear()
    assert window.end == window.start == 104


def test_a_source_faster_than_the_threads_is_paused_until_they_catch_up(
    tmp_path: Path,
) -> None:
    """Once PAUSE_AT bytes are held (not yet both written and hashed), the
    source is paused (once), and resumed (once) when the slower thread has
    brought them under RESUME_AT: memory does not grow with a slow disk."""
    data = os.urandom(PAUSE_AT + 2 * MIB)
    _, spool = spool_for(tmp_path, data)
    threads = Threads()
    a = appender(spool, threads)
    producer = Producer()
    a.producer = producer
    offset = 0
    while not producer.paused:
        a.add(data[offset : offset + MIB])
        offset += MIB
    assert offset == PAUSE_AT and a.held == PAUSE_AT
    # A source delivers what it had read before it stopped reading.
    a.add(data[offset : offset + MIB])
    offset += MIB
    assert producer.paused == 1 and producer.resumed == 0
    threads.run()  # writing: readers get the bytes, memory still holds them
    assert spool.written == offset and producer.resumed == 0
    threads.run()  # hashing
    assert producer.resumed == 1 and a.held == 0
    a.add(data[offset:])
    threads.run_all()
    assert producer.paused == 1 and producer.resumed == 1
    assert file_bytes(spool) == data
    spool.verify()
    assert RESUME_AT < PAUSE_AT


def test_a_thread_takes_its_turn_in_the_pool_and_goes_on_in_order(
    tmp_path: Path,
) -> None:
    """After TURN bytes a thread gives the pool's thread back and carries on
    in a new job, behind the pool's other work; the bytes stay in order."""
    data = os.urandom(TURN + 3 * MIB)
    _, spool = spool_for(tmp_path, data)
    threads = Threads()
    a = appender(spool, threads)
    for offset in range(0, len(data), MIB):
        a.add(data[offset : offset + MIB])
    threads.jobs.append((lambda: None, Deferred()))  # another's work
    threads.run()  # writing: TURN bytes, then back in the queue
    assert spool.written == TURN
    assert len(threads.jobs) == 3  # hashing, the other work, writing again
    threads.run_all()
    assert spool.written == len(data)
    assert file_bytes(spool) == data
    spool.verify()


def test_a_failed_write_drops_the_rest_and_is_reported_once(
    tmp_path: Path,
) -> None:
    """A write error in the thread (a full disk): reported once on the
    reactor thread; what was queued and whatever comes later is dropped,
    and whoever waits for the end is let go."""

    class FullDisk:
        written = 0

        def put(self, buffers: list[bytes]) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def hash(self, buffers: list[bytes]) -> None:
            pass

    threads = Threads()
    events: list[str] = []
    a = appender(FullDisk(), threads, events)
    a.add(b"x" * 1000)
    drained = a.drained()
    threads.run_all()
    full = OSError(errno.ENOSPC, "No space left on device")
    assert events == [f"failed {full!r}"]
    assert drained.called
    a.add(b"y" * 1000)
    assert threads.jobs == [] and a.drained().called


def test_a_spool_discarded_while_a_thread_writes_is_closed_by_that_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download failing (its spool discarded, on the reactor thread) while
    a thread writes to it: the file is not closed under the thread's write,
    but once it ends; nothing more can be written."""
    data = b"z" * 5000
    _, spool = spool_for(tmp_path, data)
    original = spool_module._write_all
    closed_during: list[bool] = []

    def write_all(fd: int, buffers: Any) -> int:
        spool.discard()
        written = original(fd, buffers)  # the fd is still ours
        closed_during.append(spool._file.closed)
        return written

    monkeypatch.setattr(spool_module, "_write_all", write_all)
    assert spool.put([data]) == len(data)
    assert closed_during == [False]
    assert spool._file.closed
    assert not os.path.exists(spool.path)
    with pytest.raises(SpoolClosed):
        spool.put([data])


def test_a_spools_bytes_are_handed_to_the_disk_as_they_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each append starts the writeback of what it wrote
    (``sync_file_range``), so that the flush at the end is short."""
    calls: list[tuple[int, int, int]] = []

    def sync_file_range(fd: int, offset: int, count: int, flags: int) -> int:
        calls.append((offset, count, flags))
        return 0

    monkeypatch.setattr(spool_module, "_SYNC_FILE_RANGE", sync_file_range)
    data = os.urandom(100_000)
    _, spool = spool_for(tmp_path, data)
    spool.append([data[:60_000]])
    spool.append([data[60_000:]])
    assert calls == [(0, 60_000, 2), (60_000, 40_000, 2)]  # SYNC_FILE_RANGE_WRITE


@pytest.mark.parametrize("sync_file_range", ["missing", "unsupported"])
def test_without_sync_file_range_a_spool_is_flushed_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync_file_range: str
) -> None:
    """Where ``sync_file_range`` is missing, or the file system refuses it,
    an ``fdatasync`` every WRITEBACK_STEP bytes does the same job."""

    def refuse(fd: int, offset: int, count: int, flags: int) -> int:
        spool_module.ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(
        spool_module,
        "_SYNC_FILE_RANGE",
        None if sync_file_range == "missing" else refuse,
    )
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    data = b"s" * (WRITEBACK_STEP // 2)
    _, spool = spool_for(tmp_path, data * 3)
    spool.append([data])
    assert synced == []
    spool.append([data])
    assert len(synced) == 1
    spool.append([data])
    assert len(synced) == 1


# -- through the mirror -------------------------------------------------------


@pytest.fixture
def threads(mirror: Harness) -> Threads:
    """The harness's downloads append and commit in "threads"."""
    jobs = Threads()
    mirror.fetcher.blobs.run_in_thread = jobs
    return jobs


def test_the_last_byte_waits_for_the_check_and_the_flush_in_a_thread(
    mirror: Harness,
    origin: FakeRegistry,
    threads: Threads,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    A client of a download gets the bytes all but the last; the last only
    after the digest was checked, the spool flushed to disk (``fsync``) and
    moved into the cache.
    """
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    layer = image(origin)["layer"]
    answer = mirror.client.get(f"http://mirror.test/v2/app/blobs/{layer}")
    mirror.settle()
    assert len(threads.jobs) == 2  # writing, hashing: nothing to send before
    threads.run()  # writing
    mirror.settle()
    response = result(answer)
    assert response.code == 200
    received: list[bytes] = []
    done = treq.collect(response, received.append)
    mirror.settle()
    assert b"".join(received) == LAYER[:-1]
    threads.run()  # hashing
    assert len(threads.jobs) == 1  # the commit
    assert synced == [] and mirror.cached_files() != []
    assert not mirror.store.has_blob(Digest.of(LAYER))
    threads.run()
    assert len(synced) == 1
    mirror.settle()
    result(done)
    assert b"".join(received) == LAYER
    assert mirror.store.has_blob(Digest.of(LAYER))


def test_a_client_gets_the_bytes_as_they_come_before_the_disk_took_them(
    mirror: Harness, origin: FakeRegistry, threads: Threads
) -> None:
    """
    The threads have neither written nor hashed anything yet: a client of
    the download already has every byte but the last, sent from the
    download's window in memory (they are not in the spool file); the last
    comes once written, checked, flushed and moved into the cache.
    """
    layer = image(origin)["layer"]
    answer = mirror.client.get(f"http://mirror.test/v2/app/blobs/{layer}")
    mirror.settle()
    response = result(answer)
    received: list[bytes] = []
    done = treq.collect(response, received.append)
    mirror.settle()
    (download,) = mirror.fetcher.blobs.downloads
    assert download.written == 0 and len(threads.jobs) == 2
    assert b"".join(received) == LAYER[:-1]
    threads.run_all()  # writing, hashing, the commit
    mirror.settle()
    result(done)
    assert b"".join(received) == LAYER
    assert mirror.store.has_blob(Digest.of(LAYER))


def test_wrong_bytes_appended_in_a_thread_fail_and_leave_nothing(
    mirror: Harness, origin: FakeRegistry, threads: Threads
) -> None:
    """Bytes that do not match the digest, appended in a thread: the client's
    stream breaks short of the end, and neither blob nor spool remains."""
    layer = image(origin)["layer"]
    origin.corrupt.add(layer)
    answer = mirror.client.get(f"http://mirror.test/v2/app/blobs/{layer}")
    mirror.settle()
    threads.run()  # writing
    mirror.settle()
    received: list[bytes] = []
    done = treq.collect(result(answer), received.append)
    mirror.settle()
    threads.run_all()  # the commit, which fails
    mirror.settle()
    with pytest.raises(Exception):  # noqa: B017 (a broken connection, whatever its class)
        result(done)
    assert len(b"".join(received)) < len(LAYER)
    assert mirror.cached_files() == []


def receiving(mirror: Harness, data: bytes) -> tuple[Download, SpoolWriter]:
    """A download of *data* under way in *mirror*, and what receives its
    body (not yet connected to a source)."""
    digest = Digest.of(data)
    blobs = mirror.fetcher.blobs
    download = Download(
        digest,
        mirror.store.spool(digest),
        mirror.router_pool("docker.io"),
        "app",
        size=len(data),
        clock=mirror.clock,
    )
    blobs._running[digest] = download
    return download, SpoolWriter(blobs, download, mirror.clock, 60.0)


def test_an_upstream_faster_than_the_spool_is_paused(
    mirror: Harness, threads: Threads
) -> None:
    """The body's source (the upstream connection) is paused while the
    threads are behind, resumed when they caught up, and the blob is cached
    whole once the body ended."""
    data = os.urandom(PAUSE_AT + 3 * MIB)
    digest = Digest.of(data)
    download, writer = receiving(mirror, data)
    transport = Producer()
    writer.makeConnection(transport)
    for offset in range(0, len(data), MIB):
        writer.dataReceived(data[offset : offset + MIB])
        if offset + MIB == PAUSE_AT:
            assert transport.paused == 1
    assert transport.paused == 1 and transport.resumed == 0
    assert download.written == 0
    threads.run()  # writing
    assert transport.resumed == 0 and download.written == len(data)
    threads.run()  # hashing
    assert transport.resumed == 1
    writer.connectionLost(Failure(ResponseDone()))
    threads.run_all()  # the commit
    assert download.state == "done"
    assert mirror.store.has_blob(digest)
    with open(mirror.store.blob_path(digest), "rb") as f:
        assert f.read() == data
    assert transport.stopped == 0


def test_a_thread_whose_write_failed_takes_nothing_more(tmp_path: Path) -> None:
    """After a failed write the lane is done: bytes queued before the
    failure reaches the reactor thread start no other job, which would
    write them where the lost bytes belong."""
    threads = Threads()
    calls: list[int] = []

    def work(batch: list[bytes]) -> int:
        calls.append(len(batch))
        raise OSError(errno.ENOSPC, "No space left on device")

    failures: list[Failure] = []
    lane = _Lane(work, lambda count: None, failures.append, threads, call_here)
    lane.add(b"x" * 10)
    work_job, _ = threads.jobs.pop(0)
    with pytest.raises(OSError):
        work_job()  # in the "thread": its outcome reaches the reactor later
    lane.add(b"y" * 10)
    assert threads.jobs == [] and calls == [1]


def test_a_failed_write_is_reported_before_the_end_is_let_go(
    tmp_path: Path,
) -> None:
    """The body ended while its bytes waited for the writing thread, whose
    write then failed: whoever waits for the end hears of the failure
    first (else the end, taken alone, looks like a short body)."""

    class FullDisk:
        written = 0

        def put(self, buffers: list[bytes]) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def hash(self, buffers: list[bytes]) -> None:
            pass

    threads = Threads()
    events: list[str] = []
    a = appender(FullDisk(), threads, events)
    a.add(b"x" * 1000)
    a.drained().addCallback(lambda _: events.append("drained"))
    threads.run_all()
    assert [e.split(" ")[0] for e in events] == ["failed", "drained"]


def no_space(self: Spool, buffers: Any) -> int:
    raise OSError(errno.ENOSPC, "No space left on device")


def logged_text(logged: list[LogEvent]) -> str:
    return "\n".join(formatEvent(e) for e in logged)


@pytest.mark.parametrize("when", ["after the body ended", "while it comes"])
def test_a_full_disk_is_the_caches_fault_and_the_next_pull_is_relayed(
    mirror: Harness,
    origin: FakeRegistry,
    threads: Threads,
    monkeypatch: pytest.MonkeyPatch,
    logged: list[LogEvent],
    when: str,
) -> None:
    """
    A spool write fails (no space left on the device), after the upstream's
    body ended or while it still comes: the log names the disk's error and
    blames no source, the upstream is not charged (no error, its breaker
    untouched), the store serves without caching for a while and says why,
    nothing stays in the spool, and the next pull is relayed whole.
    """
    layer = image(origin)["layer"]
    monkeypatch.setattr(Spool, "put", no_space)
    if when == "while it comes":
        origin.hold[layer] = 3000
    answer = mirror.client.get(f"http://mirror.test/v2/app/blobs/{layer}")
    mirror.settle()
    threads.run_all()
    mirror.settle()
    if when == "while it comes":
        # The mirror hung up: its transfer, not the upstream, had to end.
        assert origin.held[0][0]._disconnected
        del origin.held[0]
        del origin.hold[layer]
    text = logged_text(logged)
    assert "No space left on device" in text
    assert "bytes (sources:" not in text and "failed: got" not in text
    upstream = mirror.upstreams["origin"]
    assert upstream.breaker.health().failures == 0
    assert upstream.breaker.health().opened == 0
    errors = mirror.metrics.registry.get_sample_value(
        "regmirror_upstream_errors_total", {"upstream": "origin", "reason": "broken"}
    )
    assert not errors
    degraded = mirror.store.degraded()
    assert degraded is not None and "No space left on device" in degraded
    assert os.listdir(os.path.join(mirror.store.root, "spool")) == []
    # The first client's stream is broken short of the end, never whole:
    # going on from the upstream would send bytes its digest never covered
    # (a fresh-eyes review: a corrupt first transfer, completed so, gave a
    # complete wrong blob).
    received: list[bytes] = []
    if answer.called:
        outcome: list[Any] = []
        answer.addBoth(outcome.append)
        if not isinstance(outcome[0], Failure):
            done = treq.collect(outcome[0], received.append)
            mirror.settle()
            assert done.called
    assert b"".join(received) != LAYER
    assert origin.count("GET", layer) == 1
    again = mirror.request("GET", f"/v2/app/blobs/{layer}")
    assert again.code == 200
    assert mirror.body(again) == LAYER
    assert not mirror.store.has_blob(Digest.of(LAYER))


class _PlainTCP:
    """What :class:`SocketSender` uses of a plain TCP transport, over one
    end of a real socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.producer: Any = None
        self.streamingProducer = True
        self.connected, self.disconnecting = True, False

    def getHandle(self) -> socket.socket:
        return self.sock

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streamingProducer = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    def startWriting(self) -> None:
        pass


def test_bytes_sent_from_memory_are_not_counted_as_sendfiles(
    mirror: Harness, threads: Threads
) -> None:
    """
    A plain-TCP client of a download whose bytes are not yet written gets
    them from the window, with ``send``: counted as sent, not as sent by
    ``sendfile`` (a fresh-eyes review: they were); the last byte, once the
    blob is cached, goes with ``sendfile``.
    """
    data = os.urandom(3 * MIB)
    download, writer = receiving(mirror, data)
    writer.makeConnection(Producer())
    writer.dataReceived(data)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    received = bytearray()
    sent: list[int] = []
    kernel: list[int] = []
    try:
        source = BlobSource(len(data), download.writer.path, download)
        sender = SocketSender(
            source, _PlainTCP(ours), 0, len(data), sent.append, kernel.append
        )
        sender.begin()

        def drain() -> None:
            theirs.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while chunk := theirs.recv(MIB):
                    received.extend(chunk)

        for _ in range(64):  # bounded: the socket pair's buffers are small
            sender.resumeProducing()
            drain()
            if len(received) == len(data) - 1:
                break
        assert bytes(received) == data[:-1]
        assert sum(sent) == len(data) - 1 and kernel == []
        writer.connectionLost(Failure(ResponseDone()))
        threads.run_all()  # written, hashed, committed
        mirror.settle()
        sender.resumeProducing()
        drain()
        result(sender.done)
        assert bytes(received) == data
        assert sum(kernel) == 1
    finally:
        ours.close()
        theirs.close()
