"""
Stale mirrors, as every process of a machine sees them: the records in
``<cache>/stale/<namespace>/`` (:class:`regmirror.stale.StaleMirrors`),
their bound, and their expiry by housekeeping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from configs import write_config
from memory import image, result
from test_failover import NEW, OLD, failing, two
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import MemoryReactorClock

from regmirror import stale
from regmirror.ini import load
from regmirror.reference import Digest
from regmirror.service import build_mirror
from regmirror.stale import StaleAnswer, StaleMirrors

THEIRS, OURS = Digest.of(b"theirs"), Digest.of(b"ours")


def test_what_one_process_learns_holds_for_every_process(tmp_path: Path) -> None:
    """Two records over one folder (two processes): a mirror one marks stale
    is stale for the other, which lists it; agreement seen by either
    clears it for both."""
    folder = str(tmp_path / "stale" / "docker.io")
    one, other = StaleMirrors(folder), StaleMirrors(folder)
    assert ("mirror", "library/app") not in other
    one[("mirror", "library/app")] = StaleAnswer("v1", THEIRS, OURS, 5.0)
    assert ("mirror", "library/app") in other
    assert ("mirror", "library/other") not in other
    assert other.items() == [
        (("mirror", "library/app"), StaleAnswer("v1", THEIRS, OURS, 5.0))
    ]
    assert other.pop(("mirror", "library/app")) == StaleAnswer("v1", THEIRS, OURS, 5.0)
    assert ("mirror", "library/app") not in one
    assert one.pop(("mirror", "library/app")) is None
    assert one.items() == []


def test_a_pool_in_another_process_distrusts_the_stale_mirror(
    tmp_path: Path,
) -> None:
    """A pool that never asked the origin itself, sharing the folder with
    the one that saw the mirror contradicted, answers a tag from the cache,
    not from the stale mirror, while the origin is down."""
    harness, mirror_up, origin = two(tmp_path)
    folder = str(tmp_path / "cache" / "stale" / "docker.io")
    harness.router_pool("docker.io").stale = StaleMirrors(folder)
    image(mirror_up, created=NEW)  # a release the origin withdrew
    origins = image(origin, created=OLD)
    assert harness.request("GET", "/v2/app/manifests/latest").code == 200
    assert os.listdir(folder)

    other, other_mirror, other_origin = two(tmp_path)  # the same cache folder
    other.router_pool("docker.io").stale = StaleMirrors(folder)
    image(other_mirror, created=NEW)
    other_origin.fault = failing
    other.clock.advance(3600)
    response = other.request("GET", "/v2/app/manifests/latest")
    assert response.code == 200
    assert response.headers.getRawHeaders("Regmirror-Tag-Source") == ["cache"]
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [
        origins["manifest"]
    ]


def test_the_records_are_bounded_oldest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients choose the repositories asked about: at ``MAX_STALE`` records
    the oldest go, down to nine tenths of it, before a new one is written."""
    monkeypatch.setattr(stale, "MAX_STALE", 10)
    records = StaleMirrors(str(tmp_path / "stale"))
    for n in range(25):
        records[("mirror", f"r{n}")] = StaleAnswer("v1", THEIRS, OURS, float(n))
        path = records._path(("mirror", f"r{n}"))
        os.utime(path, (n, n))
        assert len(records) <= 10
    kept = [key[1] for key, _ in records.items()]
    assert kept[-1] == "r24" and "r0" not in kept


def test_housekeeping_expires_records_older_than_max_stale(tmp_path: Path) -> None:
    """``twistd``'s housekeeping removes a stale mirror's record once it is
    older than the namespace's ``max_stale``; the status page, read from
    the records (by any process), then lists it no more."""
    os.chdir(tmp_path)
    reactor = MemoryReactorClock()
    config = load(str(write_config(tmp_path, extra="max_stale = 1h\n")))
    mirror = build_mirror(config, reactor)
    mirror.fetcher.run_in_thread = maybeDeferred
    (pool,) = mirror.pools
    assert pool.stale.folder == str(tmp_path / "cache" / "stale" / "docker.io")
    reactor.advance(1000)
    pool.stale[("one", "library/app")] = StaleAnswer("v1", THEIRS, OURS, 1000.0)
    reader = build_mirror(config, reactor)  # another process's view

    def listed() -> list[Any]:
        document = result(Deferred.fromCoroutine(reader.status()))
        return [s["repository"] for s in document["namespaces"][0]["stale"]]

    assert listed() == ["library/app"]
    reactor.advance(3599)
    mirror.housekeep()
    assert listed() == ["library/app"]
    reactor.advance(2)
    mirror.housekeep()
    assert listed() == []
