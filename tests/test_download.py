"""
Tests for :class:`regmirror.download.Download`'s waits: when a reader waiting
for more of a download under way is woken.  Readers ask for a large step
(:data:`~regmirror.download.WAKE_BYTES`) so that a fast download reaches many
clients in few, large sends, but never wait long for bytes that are there.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from regmirror.download import WAKE_DELAY, Download, Followed
from regmirror.reference import parse_digest

DIGEST = parse_digest("sha256:" + "a" * 64)


def download(clock: Clock | None) -> Download:
    """A download whose spool is only a byte count (``spool.written``)."""
    return Download(
        DIGEST, Followed("spool", "final"), None, "app", size=10_000, clock=clock
    )


def append(d: Download, size: int) -> None:
    d.spool.written += size
    d.appended()


def test_a_reader_is_woken_once_its_bytes_are_there() -> None:
    """Appends short of what a reader waits for leave it asleep; the one
    that brings the download there wakes it."""
    clock = Clock()
    d = download(clock)
    woken: list[object] = []
    d.changed(3000).addCallback(woken.append)

    append(d, 1000)
    append(d, 1000)
    assert woken == []
    append(d, 1000)
    assert woken == [None]


def test_bytes_trickling_in_reach_a_reader_within_the_wake_delay() -> None:
    """Behind a slow upstream, a reader is woken ``WAKE_DELAY`` after the
    first append it saw, even if nothing more comes."""
    clock = Clock()
    d = download(clock)
    woken: list[object] = []
    d.changed(5000).addCallback(woken.append)

    append(d, 10)
    clock.advance(WAKE_DELAY / 2)
    append(d, 10)
    assert woken == []
    clock.advance(WAKE_DELAY / 2)
    assert woken == [None]
    assert clock.getDelayedCalls() == []


def test_a_stalled_download_runs_no_timer_for_its_readers() -> None:
    """A reader that has seen no append since it began waiting (the
    upstream stalls) is left alone: no timer fires for nothing."""
    clock = Clock()
    d = download(clock)
    woken: list[object] = []
    d.changed(5000).addCallback(woken.append)

    clock.advance(10 * WAKE_DELAY)
    assert woken == []
    assert clock.getDelayedCalls() == []


def test_every_reader_is_woken_when_the_download_ends() -> None:
    """The end of a download (done or failed), or a look at another
    process's spool, wakes every reader, whatever it waits for, and
    cancels the timer."""
    clock = Clock()
    d = download(clock)
    woken: list[object] = []
    for _ in range(3):
        d.changed(9000).addCallback(woken.append)
    append(d, 10)
    assert clock.getDelayedCalls() != []

    d.state = "failed"
    d.notify()

    assert woken == [None] * 3
    assert clock.getDelayedCalls() == []
    assert d.changed(9000).called


def test_without_a_clock_every_append_wakes_every_reader() -> None:
    """Without a clock to bound a wait, waits end at the next append."""
    d = download(None)
    woken: list[object] = []
    d.changed(9000).addCallback(woken.append)

    append(d, 1)

    assert woken == [None]
