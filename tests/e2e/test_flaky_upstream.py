"""
Upstreams that reset every transfer after a few MiB, ranged ones too (a
congested domestic mirror), end to end: ``programs/flaky_relay.py`` in
front of a real ``docker-registry`` holding the catalog, as one or more of
the namespace's upstreams.  The ~40 MiB layer of ``test/big`` must reach
every client whole and verified, the resumes going to the next upstream in
order, flaky ones taking turns; a download fails only when its attempts
stop bringing bytes, and then says what each source gave.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from regmirror._attempts import MAX_FRUITLESS

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    mirror_config_upstreams,
)
from .images import Blob, Catalog, assert_layout_matches
from .servers import FlakyRelay, ProgramProcess, ThrottleRelay

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
#: where each flaky upstream resets each transfer
CUT = 4 * MIB
#: the name of the upstream that is the registry itself, not a relay
HEALTHY = "quay"
#: longest wait for one client
CLIENT_TIMEOUT = 90.0
READ_CHUNK = 256 * 1024


@dataclass
class Got:
    """What a client got for a blob."""

    status: int | None = None
    size: int = 0
    digest: str = ""
    error: str | None = None


def get(port: int, path: str) -> Got:
    """GET *path* from the mirror, hashing the body; bounded."""
    got = Got()
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=CLIENT_TIMEOUT)
    hasher = hashlib.sha256()
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        got.status = response.status
        for _ in range(64 * MIB // READ_CHUNK + 2):
            data = response.read(READ_CHUNK)
            if not data:
                break
            hasher.update(data)
            got.size += len(data)
    except (OSError, http.client.HTTPException) as e:
        got.error = repr(e)
    finally:
        connection.close()
    got.digest = "sha256:" + hasher.hexdigest()
    return got


def whole(blob: Blob) -> Got:
    return Got(200, blob.size, blob.digest, None)


@dataclass
class Setup:
    """A mirror over flaky relays (by name) and the registry behind them."""

    mirror: MirrorProcess
    relays: dict[str, FlakyRelay]
    registry: RegistryProcess
    path: str = ""

    def relayed_gets(self, digest: str) -> list[tuple[str, dict[str, Any]]]:
        """``(relay, record)`` of each GET of *digest* through a relay, by
        the offset it asked for."""
        gets = [
            (name, record)
            for name, relay in self.relays.items()
            for record in relay.blob_gets(digest)
        ]
        return sorted(gets, key=lambda entry: _offset(entry[1]))

    def resumes(self, digest: str) -> list[tuple[int, str]]:
        """``(offset, source)`` of each ``resuming`` line of the log."""
        pattern = re.compile(rf"resuming {digest} at byte (\d+) from (\S+)")
        return [
            (int(m[1]), m[2])
            for line in self.mirror.log_lines()
            if (m := pattern.search(line))
        ]


def _offset(record: dict[str, Any]) -> int:
    wanted = record["range"] or "bytes=0-"
    return int(wanted[len("bytes=") : -1])


def assert_cached(mirror: MirrorProcess, blob: Blob) -> None:
    cached = mirror.cached_blobs()
    assert cached.get(blob.digest) == blob.digest, cached


def broken(mirror: MirrorProcess, upstream: str) -> float:
    return mirror.metric(
        "regmirror_upstream_errors_total", upstream=upstream, kind="broken"
    )


@pytest.fixture
def flaky(
    tmp_path: Path,
    catalog: Catalog,
    upstream: RegistryProcess,
    start_program: Callable[[ProgramProcess], Any],
    start_mirror: Callable[..., MirrorProcess],
) -> Callable[..., Setup]:
    """
    ``flaky(order, cuts={...}, via=PORT)``: a mirror whose docker.io
    upstreams are *order* (the last one the origin): :data:`HEALTHY` is the
    registry itself, any other name a flaky relay to it (or to *via*),
    cutting after ``cuts.get(name, CUT)`` bytes.
    """

    def start(
        order: Sequence[str],
        *,
        cuts: Mapping[str, int] | None = None,
        via: int | None = None,
    ) -> Setup:
        relays: dict[str, FlakyRelay] = {}
        upstreams: dict[str, dict[str, str]] = {}
        for name in order:
            if name == HEALTHY:
                upstreams[name] = {"url": upstream.url}
                continue
            relay = FlakyRelay(
                tmp_path / name,
                upstream.port if via is None else via,
                (cuts or {}).get(name, CUT),
            )
            relays[name] = start_program(relay)
            upstreams[name] = {"url": relay.url}
        mirror = start_mirror(
            lambda port: mirror_config_upstreams(port, upstreams, origin=order[-1])
        )
        layer = catalog.big.layers[0]
        path = f"/v2/{catalog.big.repository}/blobs/{layer.digest}"
        return Setup(mirror, relays, upstream, path)

    return start


def test_a_mirror_resetting_every_transfer_hands_the_rest_to_the_next_upstream(
    catalog: Catalog, flaky: Callable[..., Setup]
) -> None:
    """
    ``upstreams = faulty quay``, ``faulty`` resetting every transfer after
    4 MiB: a HEAD is answered through ``faulty``; the GET gets the whole
    layer in one stream: ``faulty`` is asked once, the rest comes from
    ``quay`` with one ranged GET from where the cut left off; the break is
    counted against ``faulty``; a second GET is served from the cache.
    """
    layer = catalog.big.layers[0]
    setup = flaky(["faulty", HEALTHY])

    head = setup.mirror.request("HEAD", setup.path)
    assert (head.status, head.header("Content-Length")) == (200, str(layer.size))
    assert get(setup.mirror.port, setup.path) == whole(layer)
    gets = setup.relays["faulty"].blob_gets(layer.digest)
    assert [(g["range"], g["cut"]) for g in gets] == [(None, True)], gets
    assert setup.resumes(layer.digest) == [(gets[0]["sent"], HEALTHY)]
    assert setup.registry.count_blob_gets(layer.digest) == 2
    assert broken(setup.mirror, "faulty") == 1
    assert_cached(setup.mirror, layer)

    assert get(setup.mirror.port, setup.path) == whole(layer)
    assert setup.registry.count_blob_gets(layer.digest) == 2


def test_two_flaky_mirrors_then_a_healthy_origin_each_give_their_part(
    catalog: Catalog, flaky: Callable[..., Setup]
) -> None:
    """``upstreams = one two quay``, the first two flaky: each is asked
    once, each resume going to the next upstream from where the previous
    transfer was cut."""
    layer = catalog.big.layers[0]
    setup = flaky(["one", "two", HEALTHY])

    assert get(setup.mirror.port, setup.path) == whole(layer)
    gets = setup.relayed_gets(layer.digest)
    assert [(name, g["cut"]) for name, g in gets] == [("one", True), ("two", True)]
    one, two = gets[0][1]["sent"], gets[1][1]["sent"]
    assert gets[1][1]["range"] == f"bytes={one}-"
    assert setup.resumes(layer.digest) == [(one, "two"), (one + two, HEALTHY)]
    assert setup.registry.count_blob_gets(layer.digest) == 3
    assert_cached(setup.mirror, layer)


def test_with_every_upstream_flaky_the_download_completes_while_it_progresses(
    catalog: Catalog, flaky: Callable[..., Setup]
) -> None:
    """
    ``upstreams = one two``, both resetting every transfer after 4 MiB:
    they take turns, each transfer going on where the last was cut, ten
    of them for the 40 MiB layer (more than any fixed number of resumes),
    and the client gets the whole layer.  Every upstream GET is one of
    them: one download; every break is counted against its upstream.
    """
    layer = catalog.big.layers[0]
    setup = flaky(["one", "two"])

    assert get(setup.mirror.port, setup.path) == whole(layer)
    gets = setup.relayed_gets(layer.digest)
    attempts = -(-layer.size // CUT)
    # Both take part (the turns are not strict: breaks add up in each
    # one's breaker, which then lets the other go first for a while).
    assert len(gets) == attempts
    assert {name for name, _ in gets} == {"one", "two"}
    assert [g["cut"] for _, g in gets] == [True] * (attempts - 1) + [False]
    sent = [g["sent"] for _, g in gets]
    assert [_offset(g) for _, g in gets] == [sum(sent[:n]) for n in range(attempts)]
    assert [source for _, source in setup.resumes(layer.digest)] == [
        name for name, _ in gets[1:]
    ]
    assert setup.registry.count_blob_gets(layer.digest) == attempts
    assert broken(setup.mirror, "one") + broken(setup.mirror, "two") == attempts - 1
    assert_cached(setup.mirror, layer)


def test_clients_joining_a_download_of_flaky_upstreams_mid_way_get_every_byte(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    upstream: RegistryProcess,
    start_program: Callable[[ProgramProcess], Any],
    flaky: Callable[..., Setup],
) -> None:
    """
    ``upstreams = one two``, both flaky, the registry behind them slowed
    to 8 MiB/s: once the first client's download was cut and resumed,
    ``curl``, two more HTTP clients and ``skopeo`` (the whole image) join
    it.  Every one of them gets the layer whole and verified, from the one
    download: the registry sees no GET of the layer but the relays'.
    """
    image = catalog.big
    layer = image.layers[0]
    slow = start_program(ThrottleRelay(tmp_path / "slow", upstream.port, 8 * MIB))
    setup = flaky(["one", "two"], via=slow.port)
    results: list[Got] = []
    lock = threading.Lock()

    def client() -> None:
        got = get(setup.mirror.port, setup.path)
        with lock:
            results.append(got)

    first = threading.Thread(target=client, daemon=True)
    first.start()
    setup.mirror.wait_for_log(rf"resuming {layer.digest} at byte", timeout=30)
    assert not [x for x in setup.mirror.log_lines() if f"cached {layer.digest}" in x]

    pulled: list[BaseException | None] = []

    def pull() -> None:
        try:
            skopeo.pull(setup.mirror.host, image.reference, tmp_path / "out", image.tag)
            pulled.append(None)
        except BaseException as e:  # reported below, with the rest
            pulled.append(e)

    others = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    others.append(threading.Thread(target=pull, daemon=True))
    curl = subprocess.Popen(
        [
            "curl",
            "--silent",
            "--show-error",
            "--fail",
            "--max-time",
            str(int(CLIENT_TIMEOUT)),
            "--output",
            str(tmp_path / "curl.out"),
            f"http://{setup.mirror.host}{setup.path}",
        ],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for thread in others:
            thread.start()
        _, curl_errors = curl.communicate(timeout=CLIENT_TIMEOUT + 10)
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait(timeout=10)
    for thread in [first, *others]:
        thread.join(timeout=CLIENT_TIMEOUT + 10)

    assert curl.returncode == 0, curl_errors
    curled = (tmp_path / "curl.out").read_bytes()
    assert "sha256:" + hashlib.sha256(curled).hexdigest() == layer.digest
    assert results == [whole(layer)] * 3
    assert pulled == [None]
    assert_layout_matches(tmp_path / "out", image, image.tag)
    joined = setup.mirror.metric(
        "regmirror_cache_lookups_total", kind="blob", result="joined"
    )
    assert joined >= 3
    gets = setup.relayed_gets(layer.digest)
    assert len(gets) == len(setup.resumes(layer.digest)) + 1 >= 2
    assert setup.registry.count_blob_gets(layer.digest) == len(gets)
    assert_cached(setup.mirror, layer)


def test_when_no_upstream_brings_a_byte_the_download_fails_naming_each(
    catalog: Catalog, flaky: Callable[..., Setup]
) -> None:
    """
    ``upstreams = one two``, both resetting every transfer right after its
    headers: each is asked ``MAX_FRUITLESS`` times, then the client gets
    an error (never a whole 200), nothing is cached, and the log line of
    the failure names each source with the bytes it gave.
    """
    layer = catalog.big.layers[0]
    setup = flaky(["one", "two"], cuts={"one": 0, "two": 0})

    got = get(setup.mirror.port, setup.path)
    assert got.status in (200, 502), got
    assert got.status == 502 or got.error is not None or got.size < layer.size, got
    lines = setup.mirror.wait_for_log(
        rf"download of {layer.digest} from \w+ failed: .*\(sources: "
        rf"one: 0 bytes in {MAX_FRUITLESS} attempts, "
        rf"two: 0 bytes in {MAX_FRUITLESS} attempts\)"
    )
    assert len(lines) == 1, lines
    for relay in setup.relays.values():
        assert len(relay.blob_gets(layer.digest)) == MAX_FRUITLESS
    assert layer.digest not in setup.mirror.cached_blobs()
