"""
A large blob fetched as several ranged GETs at once (``[upstream:NAME]
segments``), in memory: the bytes assembled in order, each segment
resumed on its own, an upstream that ignores Range, and ``segments = 1``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import treq
from fakeregistry import FakeRegistry
from memory import LAYER, Harness, image

from regmirror import _spool as spool_module
from regmirror._segments import BATCH, PARTS_SUFFIX
from regmirror._spool import Spool
from regmirror.reference import parse_digest

#: LAYER (10 KiB) in four segments
STEP = len(LAYER) // 4
RANGES = [f"bytes={i * STEP}-{(i + 1) * STEP - 1}" for i in range(4)]


def segmented(
    tmp_path: Path, segments: int = 4, min_size: int = 4096
) -> tuple[Harness, FakeRegistry, str]:
    """A mirror over one upstream that takes *segments*, and its layer."""
    origin = FakeRegistry()
    harness = Harness(
        str(tmp_path / "cache"),
        {"origin": origin},
        {"origin": {"segments": segments, "segment_min_size": min_size}},
    )
    return harness, origin, image(origin)["layer"]


def cached(harness: Harness, layer: str) -> bytes | None:
    path = harness.store.blob_path(parse_digest(layer))
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def spooled(harness: Harness) -> list[str]:
    return [f for f in harness.cached_files() if "/spool/" in f]


def stream(harness: Harness, layer: str) -> tuple[list[bytes], Any]:
    """A client's GET of *layer*: what it received so far, and its end."""
    response = harness.request("GET", f"/v2/app/blobs/{layer}")
    assert response.code == 200
    received: list[bytes] = []
    done = treq.collect(response, received.append)
    ended: list[Any] = []
    done.addBoth(ended.append)
    harness.settle()
    return received, ended


def test_a_large_blob_comes_in_ranged_segments_assembled_byte_exact(
    tmp_path: Path,
) -> None:
    """With ``segments = 4``, a blob of at least ``segment_min_size`` whose
    size a HEAD gave is fetched as four ranged GETs, one per quarter, no
    byte asked twice; the client and the cache get it byte-exact, and no
    side file is left."""
    harness, origin, layer = segmented(tmp_path)
    received, ended = stream(harness, layer)
    assert ended == [None]
    assert b"".join(received) == LAYER
    assert origin.count("GET", "/blobs/") == 4
    assert origin.count("HEAD", "/blobs/") == 1
    assert sorted(origin.ranges) == sorted(RANGES)
    assert origin.ranges[0] == RANGES[0]
    assert cached(harness, layer) == LAYER
    assert spooled(harness) == []


def test_a_broken_segment_resumes_on_its_own_from_where_it_stopped(
    tmp_path: Path,
) -> None:
    """A segment whose body breaks off is asked for again from the byte it
    stopped at to its own end; the other segments are not asked again."""
    harness, origin, layer = segmented(tmp_path)
    origin.break_range[(layer, STEP)] = 1000
    received, ended = stream(harness, layer)
    assert ended == [None]
    assert b"".join(received) == LAYER
    assert sorted(origin.ranges) == sorted(
        [*RANGES, f"bytes={STEP + 1000}-{2 * STEP - 1}"]
    )
    assert cached(harness, layer) == LAYER


def test_an_upstream_that_ignores_range_gets_one_get(tmp_path: Path) -> None:
    """An upstream that answers the first segment's ranged GET with the
    whole blob (200) is read as one transfer: one GET, no other segment
    asked for."""
    harness, origin, layer = segmented(tmp_path)
    origin.ignore_range = True
    received, ended = stream(harness, layer)
    assert ended == [None]
    assert b"".join(received) == LAYER
    assert origin.count("GET", "/blobs/") == 1
    assert cached(harness, layer) == LAYER


def test_a_reader_gets_bytes_in_order_while_segments_come_out_of_order(
    tmp_path: Path,
) -> None:
    """While the first segment is held after 100 bytes and the others are
    in, a client has only the first 99 bytes (never a later segment's
    before the bytes ahead of them, the last byte held back); once the
    first segment ends, it gets the whole blob, in order."""
    harness, origin, layer = segmented(tmp_path)
    origin.hold_range[(layer, 0)] = 100
    received, ended = stream(harness, layer)
    assert ended == []
    assert b"".join(received) == LAYER[:99]
    origin.release()
    harness.settle()
    assert ended == [None]
    assert b"".join(received) == LAYER
    assert cached(harness, layer) == LAYER


def test_the_last_byte_waits_for_the_whole_blob_to_be_verified(
    tmp_path: Path,
) -> None:
    """With every segment in but the last one's final byte, a client has all
    but the last two bytes: the last byte comes only with the verified
    blob."""
    harness, origin, layer = segmented(tmp_path)
    origin.hold_range[(layer, 3 * STEP)] = STEP - 1
    received, ended = stream(harness, layer)
    assert b"".join(received) == LAYER[:-2]
    assert cached(harness, layer) is None
    origin.release()
    harness.settle()
    assert b"".join(received) == LAYER
    assert cached(harness, layer) == LAYER


def test_segments_with_wrong_bytes_cache_nothing(tmp_path: Path) -> None:
    """Segments whose bytes do not match the digest: the client's stream
    breaks before the last byte, nothing is cached, no spool is left."""
    harness, origin, layer = segmented(tmp_path)
    origin.corrupt.add(layer)
    origin.hold_range[(layer, 3 * STEP)] = 100
    received, ended = stream(harness, layer)
    assert ended == []
    origin.release()
    harness.settle()
    assert len(ended) == 1 and ended[0] is not None
    assert len(b"".join(received)) < len(LAYER)
    assert cached(harness, layer) is None
    assert spooled(harness) == []


def test_one_segment_is_one_plain_get(tmp_path: Path) -> None:
    """``segments = 1`` (the default): one GET without Range, no HEAD."""
    harness, origin, layer = segmented(tmp_path, segments=1)
    received, ended = stream(harness, layer)
    assert ended == [None]
    assert b"".join(received) == LAYER
    assert origin.count("GET", "/blobs/") == 1
    assert origin.count("HEAD", "/blobs/") == 0
    assert origin.ranges == []


def test_a_blob_below_segment_min_size_is_one_get(tmp_path: Path) -> None:
    """A blob smaller than ``segment_min_size`` comes in one GET without
    Range."""
    harness, origin, layer = segmented(tmp_path, min_size=len(LAYER) + 1)
    received, ended = stream(harness, layer)
    assert b"".join(received) == LAYER
    assert origin.count("GET", "/blobs/") == 1
    assert origin.ranges == []


def test_a_segment_answered_whole_is_dropped_and_asked_elsewhere(
    tmp_path: Path,
) -> None:
    """A resumed segment's ranged GET answered whole (200) by an upstream
    that ignores Range is dropped, and the segment asked for again from the
    same byte of the next upstream."""
    first, second = FakeRegistry(), FakeRegistry()
    harness = Harness(
        str(tmp_path / "cache"),
        {"first": first, "second": second},
        {"first": {"segments": 4, "segment_min_size": 4096}},
    )
    layer = image(first)["layer"]
    image(second)
    second.ignore_range = True
    first.hold_range[(layer, STEP)] = 10
    received, ended = stream(harness, layer)
    assert ended == []
    del first.hold_range[(layer, STEP)]
    first.cut()
    harness.settle()
    assert ended == [None]
    assert b"".join(received) == LAYER
    rest = f"bytes={STEP + 10}-{2 * STEP - 1}"
    assert second.ranges == [rest]
    assert sorted(first.ranges) == sorted([*RANGES, rest])
    assert cached(harness, layer) == LAYER


def test_a_segment_answered_whole_by_the_last_upstream_is_taken_from_it(
    tmp_path: Path,
) -> None:
    """A segment breaks and its only upstream now ignores Range: the
    resume's whole blob (200) gives the segment's bytes after those before
    them, and the blob is cached, instead of every attempt being dropped
    until the download fails (a fresh-eyes review, behind a CDN that
    honours Range on some requests only)."""
    harness, origin, layer = segmented(tmp_path)
    origin.hold_range[(layer, STEP)] = 10
    received, ended = stream(harness, layer)
    assert ended == []
    del origin.hold_range[(layer, STEP)]
    origin.ignore_range = True
    origin.cut()
    harness.settle()
    assert ended == [None]
    assert b"".join(received) == LAYER
    assert cached(harness, layer) == LAYER
    assert origin.count("GET", layer) == len(RANGES) + 1


@pytest.mark.parametrize("error", [1000, -1000])
def test_a_head_that_misstates_the_size_gets_one_get(
    tmp_path: Path, error: int
) -> None:
    """An upstream whose HEAD gives another size than the blob's: the first
    segment's answer (``Content-Range: bytes 0-B/<size>``) shows it, and
    the blob is fetched in one GET instead of in segments of a size it
    does not have (a fresh-eyes review: every download of it failed)."""
    harness, origin, layer = segmented(tmp_path)
    origin.head_size[layer] = len(LAYER) + error
    received, ended = stream(harness, layer)
    assert ended == [None]
    assert b"".join(received) == LAYER
    assert cached(harness, layer) == LAYER
    assert origin.count("GET", layer) == 2
    assert len(origin.ranges) == 1


def test_a_silent_segment_is_resumed_after_idle_timeout(tmp_path: Path) -> None:
    """A segment whose upstream stops sending without closing is given up
    after ``idle_timeout`` seconds of silence, not before, and asked for
    again from the byte it stopped at; the others are not asked again."""
    origin = FakeRegistry()
    harness = Harness(
        str(tmp_path / "cache"),
        {"origin": origin},
        {"origin": {"segments": 4, "segment_min_size": 4096, "idle_timeout": 20.0}},
    )
    layer = image(origin)["layer"]
    origin.hold_range[(layer, 2 * STEP)] = 300
    received, ended = stream(harness, layer)
    del origin.hold_range[(layer, 2 * STEP)]
    harness.clock.advance(19.9)
    harness.settle()
    assert sorted(origin.ranges) == sorted(RANGES)
    harness.clock.advance(0.1)
    harness.settle()
    assert ended == [None]
    assert b"".join(received) == LAYER
    assert sorted(origin.ranges) == sorted(
        [*RANGES, f"bytes={2 * STEP + 300}-{3 * STEP - 1}"]
    )
    assert cached(harness, layer) == LAYER


def test_segments_skip_an_upstream_whose_breaker_is_open(tmp_path: Path) -> None:
    """With the first upstream marked down, the HEAD and every segment go to
    the next one in the namespace's order; the one marked down sees none."""
    first, second = FakeRegistry(), FakeRegistry()
    settings = {"segments": 4, "segment_min_size": 4096}
    harness = Harness(
        str(tmp_path / "cache"),
        {"first": first, "second": second},
        {"first": settings, "second": settings},
    )
    layer = image(first)["layer"]
    image(second)
    breaker = harness.upstreams["first"].breaker
    while breaker.allow():
        breaker.failed(transport=True)
    received, ended = stream(harness, layer)
    assert ended == [None]
    assert b"".join(received) == LAYER
    assert first.count("GET", "/blobs/") + first.count("HEAD", "/blobs/") == 0
    assert sorted(second.ranges) == sorted(RANGES)
    assert cached(harness, layer) == LAYER


def test_the_disk_holds_a_segmented_blob_about_once_while_it_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch moved from the side file into the spool is punched out of
    the side file: with the first segment held until the other three are
    in, the side file's allocated bytes drop as the spool grows, and their
    sum peaks at the blob and one batch (a batch is in both files until
    it is punched), not at twice the blob."""
    size = 8 * 1024 * 1024
    blob = bytes(range(256)) * (size // 256)
    origin = FakeRegistry()
    harness = Harness(
        str(tmp_path / "cache"),
        {"origin": origin},
        {"origin": {"segments": 4, "segment_min_size": 4096}},
    )
    digest = origin.add_blob(blob)
    origin.hold_range[(digest, 0)] = 100
    side: list[int] = []
    totals: list[int] = []
    append = Spool.append

    def measure(spool: Spool) -> None:
        allocated = os.stat(spool.path + PARTS_SUFFIX).st_blocks * 512
        side.append(allocated)
        totals.append(allocated + os.stat(spool.path).st_size)

    def measured(spool: Spool, buffers: Sequence[bytes]) -> int:
        measure(spool)
        count = append(spool, buffers)
        measure(spool)
        return count

    monkeypatch.setattr(Spool, "append", measured)
    received, ended = stream(harness, digest)
    origin.release()
    harness.settle()
    assert ended == [None]
    assert b"".join(received) == blob
    assert cached(harness, digest) == blob
    assert max(side) >= size - BATCH
    assert side[-1] <= BATCH
    assert max(totals) <= size + BATCH + 64 * 1024


@pytest.mark.parametrize("fallocate", ["missing", "unsupported"])
def test_where_holes_cannot_be_punched_the_side_file_keeps_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallocate: str
) -> None:
    """Where the C library has no ``fallocate``, or the file system refuses
    to punch holes (``EOPNOTSUPP``), a segmented download goes on as
    before, the side file keeping every byte until the end; a refusal is
    not asked again within the download."""
    asked: list[tuple[int, int, int]] = []

    def refuse(fd: int, mode: int, offset: int, length: int) -> int:
        asked.append((mode, offset, length))
        spool_module.ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(
        spool_module, "_FALLOCATE", None if fallocate == "missing" else refuse
    )
    harness, origin, layer = segmented(tmp_path)
    kept: list[int] = []
    append = Spool.append

    def measured(spool: Spool, buffers: Sequence[bytes]) -> int:
        count = append(spool, buffers)
        kept.append(os.stat(spool.path + PARTS_SUFFIX).st_blocks * 512)
        return count

    monkeypatch.setattr(Spool, "append", measured)
    received, ended = stream(harness, layer)
    assert ended == [None]
    assert b"".join(received) == LAYER
    assert cached(harness, layer) == LAYER
    assert spooled(harness) == []
    assert kept[-1] >= len(LAYER)
    # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE from the start, then no more
    assert [a[:2] for a in asked] == ([] if fallocate == "missing" else [(3, 0)])


def test_a_full_disk_fails_a_segmented_download_as_the_caches_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool refuses the segments' bytes (no space left): the download
    fails as the cache's fault (the store serves without caching, its
    upstream is not charged), the client gets a 502 or a response broken
    short of the end, no spool or side file is left, and the next GET is
    relayed whole."""

    def no_space(self: Spool, buffers: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    harness, origin, layer = segmented(tmp_path)
    monkeypatch.setattr(Spool, "append", no_space)
    response = harness.request("GET", f"/v2/app/blobs/{layer}")
    if response.code == 200:
        received: list[bytes] = []
        ended: list[Any] = []
        treq.collect(response, received.append).addBoth(ended.append)
        harness.settle()
        assert len(ended) == 1 and ended[0] is not None
        assert b"".join(received) != LAYER
    else:
        assert response.code == 502
    degraded = harness.store.degraded()
    assert degraded is not None and "No space left on device" in degraded
    assert harness.upstreams["origin"].breaker.health().failures == 0
    assert os.listdir(os.path.join(harness.store.root, "spool")) == []
    monkeypatch.undo()
    again = harness.request("GET", f"/v2/app/blobs/{layer}")
    assert harness.body(again) == LAYER
    assert cached(harness, layer) is None
