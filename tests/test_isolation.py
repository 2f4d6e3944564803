"""
Content and failures stay in their namespace, in memory (issue 16, items
3 and 4): bytes are stored once, but a namespace serves a digest only when
it vouches for it, and one namespace's answer (a 404, a failure) never
answers another's request.

The harness's docker.io asks every upstream, ghcr.io the last one only
(``origin``).  The fakes serve any blob under any repository; a ``fault``
makes ``origin`` deny a blob to one repository, as a registry does for a
blob that is not linked into it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import treq
from configs import write_config
from fakeregistry import FakeRegistry, digest_of
from memory import LAYER, Harness, error_code, image, result
from test_fetch_cluster import Cluster
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.web.server import NOT_DONE_YET, Request

from regmirror.access.tokens import Tokens, shared_key
from regmirror.download import Download, Followed
from regmirror.ini import load
from regmirror.pool import StaleAnswer
from regmirror.reference import Digest, parse_digest
from regmirror.service import build_mirror
from regmirror.siblings import FOLLOW_INTERVAL
from regmirror.vouches import MAX_REMEMBERED, UNUSED_RECORD_AGE, Vouches

MISSING = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"not in this repository"}]}'


def deny(prefix: str) -> Any:
    """A ``fault`` answering 404 to every request under ``/v2/<prefix>``."""

    def fault(request: Request) -> tuple[int, bytes] | None:
        if request.path.startswith(f"/v2/{prefix}".encode()):
            return 404, MISSING
        return None

    return fault


@pytest.fixture
def two(tmp_path: Path) -> tuple[Harness, FakeRegistry, FakeRegistry]:
    """A mirror over ``hub`` (docker.io only) and ``origin`` (both)."""
    hub, origin = FakeRegistry(), FakeRegistry()
    return Harness(str(tmp_path / "cache"), {"hub": hub, "origin": origin}), hub, origin


def get(harness: Harness, path: str, **kwargs: Any) -> Any:
    """A request sent without waiting for it (see ``Harness.settle``)."""
    return harness.client.request(
        kwargs.pop("method", "GET"), f"http://mirror.test{path}", **kwargs
    )


# -- item 4: one namespace's failure answers no other's request ---------------------


class Paused(FakeRegistry):
    """A fake registry that answers only once told to (a slow upstream)."""

    def __init__(self) -> None:
        super().__init__()
        self.paused: list[Request] | None = []

    def render(self, request: Request) -> Any:
        if self.paused is not None:
            self.paused.append(request)
            return NOT_DONE_YET
        return super().render(request)

    def go(self) -> None:
        """Answer what waited, and from now on at once."""
        paused, self.paused = self.paused or [], None
        for request in paused:
            body = super().render(request)
            if body is not NOT_DONE_YET:
                request.write(body)
                request.finish()


def race(
    tmp_path: Path, first: str, second: str, **kwargs: Any
) -> tuple[Harness, Any, Any]:
    """
    *first* is sent; while its start waits for the paused upstream that
    its namespace asks first, *second* is sent; then the upstream answers.
    The upstreams: ``hub`` (docker.io's first) and ``origin`` (the last of
    docker.io's, ghcr.io's only), the paused one named by ``paused``.
    """
    paused = kwargs.pop("paused")
    hub = Paused() if paused == "hub" else FakeRegistry()
    origin = Paused() if paused == "origin" else FakeRegistry()
    harness = Harness(str(tmp_path / "cache"), {"hub": hub, "origin": origin})
    harness.hub, harness.origin = hub, origin  # type: ignore[attr-defined]
    layer = kwargs.pop("layer")
    hub.blobs[layer] = origin.blobs[layer] = LAYER
    hub.fault = origin.fault = kwargs.pop("fault")
    one = get(harness, first.format(layer=layer))
    harness.settle()
    two = get(harness, second.format(layer=layer), **kwargs)
    harness.settle()
    held = hub if paused == "hub" else origin
    assert isinstance(held, Paused) and held.paused, "the first start is not waiting"
    held.go()
    harness.settle()
    return harness, one, two


def stream_in_turn(
    harness: Harness, *paths: str
) -> tuple[list[list[bytes]], list[object]]:
    """GET each of *paths* in turn, streamed, letting each start before the
    next: what each client received so far, and how each ended."""
    received: list[list[bytes]] = [[] for _ in paths]
    finished: list[object] = []
    for path, sink in zip(paths, received, strict=True):
        d = harness.client.get(f"http://mirror.test{path}", unbuffered=True)
        d.addCallback(treq.collect, sink.append).addBoth(finished.append)
        harness.settle()
    return received, finished


def test_a_404_for_one_namespace_does_not_answer_another_starting_meanwhile(
    tmp_path: Path,
) -> None:
    """
    A docker.io request for a blob its upstreams deny it (404 from both)
    is starting when a ghcr.io request for the same digest arrives, whose
    upstream has it: docker.io gets 404 BLOB_UNKNOWN, ghcr.io the blob,
    downloaded from its upstream once and stored once.
    """
    layer = digest_of(LAYER)
    harness, docker, ghcr = race(
        tmp_path,
        "/v2/app/blobs/{layer}",
        "/v2/ghcr.io/org/app/blobs/{layer}",
        paused="hub",
        layer=layer,
        fault=deny("library/"),
    )
    refused = result(docker)
    assert refused.code == 404
    assert error_code(harness, refused) == "BLOB_UNKNOWN"
    served = result(ghcr)
    assert served.code == 200
    assert harness.body(served) == LAYER
    origin: FakeRegistry = harness.origin  # type: ignore[attr-defined]
    assert origin.count("GET", f"/v2/org/app/blobs/{layer}") == 1
    assert os.path.exists(harness.store.blob_path(parse_digest(layer)))


def test_a_second_request_of_the_same_namespace_joins_its_start_asking_nobody(
    tmp_path: Path,
) -> None:
    """
    Two docker.io requests for one blob, the second arriving while the
    first's start waits on the upstream: the second joins that start (no
    ``HEAD`` to confirm what its own namespace is fetching, no second
    request to the upstream), and counts as joined, not as a miss.  (Seen
    end to end: behind a dead first upstream, a second connection attempt
    doubled its back-off.)
    """
    layer = digest_of(LAYER)
    harness, one, two = race(
        tmp_path,
        "/v2/app/blobs/{layer}",
        "/v2/app/blobs/{layer}",
        paused="hub",
        layer=layer,
        fault=None,
    )
    assert harness.body(result(one)) == harness.body(result(two)) == LAYER
    hub: FakeRegistry = harness.hub  # type: ignore[attr-defined]
    assert [m for m, p in hub.requests if layer in p] == ["GET"]
    for looked_up, count in (("miss", 1), ("joined", 1)):
        assert (
            harness.metrics.registry.get_sample_value(
                "regmirror_cache_lookups_total", {"kind": "blob", "result": looked_up}
            )
            == count
        )


@pytest.mark.parametrize(
    "second",
    [
        "/v2/ghcr.io/org/app/blobs/{layer}",
        "/v2/org/app/blobs/{layer}?ns=ghcr.io",
        "/v2/ghcr.alias.test/org/app/blobs/{layer}",
    ],
)
def test_each_routing_form_gets_its_own_start_of_a_download(
    tmp_path: Path, second: str
) -> None:
    """The same race through each routing form of ghcr.io (prefix, ``ns``,
    alias), with a ``Range``: its upstream's answer, not docker.io's."""
    harness, docker, ghcr = race(
        tmp_path,
        "/v2/app/blobs/{layer}",
        second,
        paused="hub",
        layer=digest_of(LAYER),
        fault=deny("library/"),
        headers={"Range": "bytes=10-19"},
    )
    assert result(docker).code == 404
    served = result(ghcr)
    assert served.code == 206
    assert harness.body(served) == LAYER[10:20]


@pytest.mark.parametrize("first", ["host", "prefix"])
def test_a_namespace_that_fails_first_does_not_answer_the_default_one(
    tmp_path: Path, first: str
) -> None:
    """
    The race the other way round: ghcr.io (by ``Host``, or by prefix)
    starts a blob its upstream denies it (``org/``: 404), and the default
    namespace's request, arriving meanwhile, is served by its own first
    upstream.
    """
    path = "/v2/org/app/blobs/{layer}"
    if first == "prefix":
        path = "/v2/ghcr.io/org/app/blobs/{layer}"
    paused = Paused()
    harness = Harness(
        str(tmp_path / "cache"), {"hub": FakeRegistry(), "origin": paused}
    )
    layer = digest_of(LAYER)
    harness.fakes["hub"].blobs[layer] = LAYER
    paused.blobs[layer] = LAYER
    paused.fault = deny("org/")
    headers = {"Host": "ghcr.mirror.test"} if first == "host" else {}
    ghcr = get(harness, path.format(layer=layer), headers=headers)
    harness.settle()
    docker = get(harness, f"/v2/app/blobs/{layer}")
    harness.settle()
    paused.go()
    harness.settle()
    assert result(ghcr).code == 404
    served = result(docker)
    assert served.code == 200
    assert harness.body(served) == LAYER


def test_another_process_starting_for_another_namespace_does_not_answer_either(
    tmp_path: Path,
) -> None:
    """
    With two worker processes on one cache folder: the first starts
    docker.io's download of a blob its upstreams deny it (the spool
    locked while the first upstream is slow); the second, asked for the
    blob through ghcr.io, whose upstream has it, does not take the first's
    404 for its answer when that spool ends unfinished: it downloads the
    blob itself and serves it.
    """
    hub, origin = Paused(), FakeRegistry()
    layer = origin.add_blob(LAYER)
    origin.fault = deny("library/")
    clock = Clock()
    first = Harness(
        str(tmp_path / "cache"), {"hub": hub, "origin": origin}, clock=clock
    )
    second = Harness(
        str(tmp_path / "cache"), {"hub": hub, "origin": origin}, clock=clock
    )
    docker = get(first, f"/v2/app/blobs/{layer}")
    first.settle()
    assert hub.paused
    ghcr = get(second, f"/v2/ghcr.io/org/app/blobs/{layer}")
    second.settle()
    hub.go()
    for _ in range(10):
        first.settle()
        second.settle()
        clock.advance(FOLLOW_INTERVAL)
    assert result(docker).code == 404
    served = result(ghcr)
    assert served.code == 200
    assert second.body(served) == LAYER


def test_a_second_namespace_joins_a_download_its_upstream_confirms(
    two: tuple[Harness, FakeRegistry, FakeRegistry],
) -> None:
    """
    A ghcr.io request for a blob docker.io is downloading (the body held
    halfway) joins that download once ghcr.io's upstream confirms it has
    the blob (one HEAD): one GET upstream, both clients get every byte.
    """
    harness, _, origin = two
    layer = origin.add_blob(LAYER)
    origin.hold[layer] = 4096
    received, finished = stream_in_turn(
        harness, f"/v2/app/blobs/{layer}", f"/v2/ghcr.io/org/app/blobs/{layer}"
    )
    assert origin.count("HEAD", f"/v2/org/app/blobs/{layer}") == 1
    origin.release()
    harness.settle()
    assert finished == [None, None]
    assert all(b"".join(sink) == LAYER for sink in received)
    assert origin.count("GET", "/blobs/") == 1


def test_a_download_another_namespace_joined_goes_on_from_its_upstreams(
    two: tuple[Harness, FakeRegistry, FakeRegistry],
) -> None:
    """
    ghcr.io downloads a blob from its only upstream, and docker.io's
    request, its upstream having confirmed the blob, joins it; when that
    upstream breaks off and fails from then on, the download goes on from
    docker.io's upstream (a Range from where it stopped), so neither
    client's stream ends while an upstream can give the rest.
    """
    harness, hub, origin = two
    layer = origin.add_blob(LAYER)
    hub.add_blob(LAYER)
    origin.hold[layer] = 4096
    received, finished = stream_in_turn(
        harness, f"/v2/ghcr.io/org/app/blobs/{layer}", f"/v2/app/blobs/{layer}"
    )
    assert hub.count("HEAD", f"/v2/library/app/blobs/{layer}") == 1
    origin.fault = lambda request: (500, b"down")
    origin.cut()
    harness.settle()
    assert finished == [None, None]
    assert all(b"".join(sink) == LAYER for sink in received)
    assert hub.ranges == ["bytes=4096-"]


# -- item 3: content is served only through a namespace that vouches for it ---------


def test_a_download_under_way_is_not_joined_through_a_namespace_without_it(
    two: tuple[Harness, FakeRegistry, FakeRegistry],
) -> None:
    """While docker.io downloads a blob, a ghcr.io request for it whose
    upstream denies it (404 to the HEAD) gets 404, not the bytes."""
    harness, _, origin = two
    layer = origin.add_blob(LAYER)
    origin.hold[layer] = 4096
    origin.fault = deny("org/")
    downloading = harness.client.get(
        f"http://mirror.test/v2/app/blobs/{layer}", unbuffered=True
    )
    harness.settle()
    for method in ("GET", "HEAD"):
        refused = harness.request(method, f"/v2/ghcr.io/org/app/blobs/{layer}")
        assert refused.code == 404, method
    origin.release()
    harness.settle()
    assert result(downloading).code == 200


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_cached_blob_is_served_through_another_namespace_only_when_it_vouches(
    two: tuple[Harness, FakeRegistry, FakeRegistry], method: str
) -> None:
    """
    A blob cached through docker.io: ghcr.io, whose upstream denies it, gets
    404 after asking that upstream; once its upstream has it, one HEAD
    confirms it and the cached bytes are served, again without asking.
    """
    harness, _, origin = two
    layer = origin.add_blob(LAYER)
    assert harness.body(harness.request("GET", f"/v2/app/blobs/{layer}")) == LAYER
    origin.fault = deny("org/")
    path = f"/v2/ghcr.io/org/app/blobs/{layer}"
    refused = harness.request(method, path)
    assert refused.code == 404
    assert origin.count("HEAD", f"/v2/org/app/blobs/{layer}") == 1

    origin.fault = None
    for _ in range(2):
        served = harness.request(method, path)
        assert served.code == 200
        if method == "GET":
            assert harness.body(served) == LAYER
        else:
            length = served.headers.getRawHeaders("Content-Length")
            assert length == [str(len(LAYER))]
    assert origin.count("HEAD", f"/v2/org/app/blobs/{layer}") == 2
    assert origin.count("GET", "/blobs/") == 1


def test_a_manifest_vouches_for_what_it_references(
    two: tuple[Harness, FakeRegistry, FakeRegistry],
) -> None:
    """
    An image pulled through docker.io (by tag): ghcr.io gets its manifest
    by digest only after its upstream confirms it (HEAD), and then its
    config and layer with no further question, the manifest vouching for
    them; a blob no manifest of ghcr.io names is still asked about.
    """
    harness, _, origin = two
    content = image(origin, "library/app", "v1")
    harness.request("GET", "/v2/app/manifests/v1")
    for blob in (content["config"], content["layer"]):
        harness.body(harness.request("GET", f"/v2/app/blobs/{blob}"))
    origin.requests.clear()

    manifest = harness.request(
        "GET", f"/v2/ghcr.io/org/app/manifests/{content['manifest']}"
    )
    assert manifest.code == 200
    assert harness.body(manifest).decode() == content["body"]
    assert origin.requests == [("HEAD", f"/v2/org/app/manifests/{content['manifest']}")]
    for blob in (content["config"], content["layer"]):
        served = harness.request("GET", f"/v2/ghcr.io/org/app/blobs/{blob}")
        assert served.code == 200
        harness.body(served)
    assert len(origin.requests) == 1


def test_a_cached_manifest_is_refused_through_a_namespace_whose_upstream_lacks_it(
    two: tuple[Harness, FakeRegistry, FakeRegistry],
) -> None:
    """A manifest cached through docker.io, asked by digest through ghcr.io
    whose upstream denies it: 404 MANIFEST_UNKNOWN, GET and HEAD alike."""
    harness, _, origin = two
    content = image(origin, "library/app", "v1")
    assert harness.request("GET", "/v2/app/manifests/v1").code == 200
    origin.fault = deny("org/")
    for method in ("GET", "HEAD"):
        refused = harness.request(
            method, f"/v2/ghcr.io/org/app/manifests/{content['manifest']}"
        )
        assert refused.code == 404, method
    refused = harness.request(
        "GET", f"/v2/ghcr.io/org/app/manifests/{content['manifest']}"
    )
    assert error_code(harness, refused) == "MANIFEST_UNKNOWN"


def test_what_a_namespace_vouches_for_is_shared_by_processes_and_restarts(
    two: tuple[Harness, FakeRegistry, FakeRegistry], tmp_path: Path
) -> None:
    """
    A second mirror on the same cache folder (another worker, or this one
    restarted) serves through ghcr.io what ghcr.io vouched for in the
    first, without asking; and what only docker.io fetched, only after
    asking ghcr.io's upstream.
    """
    harness, hub, origin = two
    layer = origin.add_blob(LAYER)
    other = origin.add_blob(LAYER[::-1])
    harness.body(harness.request("GET", f"/v2/ghcr.io/org/app/blobs/{layer}"))
    harness.body(harness.request("GET", f"/v2/app/blobs/{other}"))
    again = Harness(str(tmp_path / "cache"), {"hub": hub, "origin": origin})
    origin.requests.clear()

    served = again.request("GET", f"/v2/ghcr.io/org/app/blobs/{layer}")
    assert again.body(served) == LAYER
    assert origin.requests == []
    served = again.request("GET", f"/v2/ghcr.io/org/app/blobs/{other}")
    assert again.body(served) == LAYER[::-1]
    assert origin.requests == [("HEAD", f"/v2/org/app/blobs/{other}")]


def test_vouches_go_with_the_content_and_memory_is_bounded(tmp_path: Path) -> None:
    """A removed blob takes its record along; the remembered answers stay
    within ``MAX_REMEMBERED`` however many digests are vouched for."""
    harness = Harness(str(tmp_path / "cache"), {"origin": FakeRegistry()})
    store = harness.store
    vouches = Vouches(store)
    digest = parse_digest("sha256:" + "1" * 64)
    os.makedirs(os.path.dirname(store.blob_path(digest)), exist_ok=True)
    with open(store.blob_path(digest), "wb") as f:
        f.write(b"x")
    vouches.add("ghcr.io", [digest])
    assert Vouches(store).has("ghcr.io", digest)
    assert not Vouches(store).has("docker.io", digest)
    store.remove(digest)
    assert not Vouches(store).has("ghcr.io", digest)

    for number in range(MAX_REMEMBERED + 10):
        vouches.remember("ghcr.io", parse_digest(f"sha256:{number:064x}"))
    assert len(vouches) == MAX_REMEMBERED


def test_records_of_content_that_never_came_are_swept_after_a_day(
    tmp_path: Path,
) -> None:
    """
    A manifest vouches for layers nobody may ever pull: their records go
    when the periodic housekeeping finds them older than a day with no
    content, while those of cached content, and young ones, stay.
    """
    harness = Harness(str(tmp_path / "cache"), {"origin": FakeRegistry()})
    store, clock = harness.store, harness.clock
    cached, absent = Digest.of(b"cached"), Digest.of(b"absent")
    os.makedirs(os.path.dirname(store.blob_path(cached)), exist_ok=True)
    with open(store.blob_path(cached), "wb") as f:
        f.write(b"cached")
    harness.fetcher.vouches.add("docker.io", [cached, absent])
    for digest in (cached, absent):
        os.utime(store._path("vouches", digest), (0, 0))
    young = Digest.of(b"young")
    clock.advance(UNUSED_RECORD_AGE + 10)
    harness.fetcher.vouches.add("docker.io", [young])
    os.utime(store._path("vouches", young), (clock.seconds(),) * 2)

    harness.fetcher.housekeep()

    assert store.vouchers(cached) == {"docker.io"}
    assert store.vouchers(absent) == frozenset()
    assert store.vouchers(young) == {"docker.io"}


# -- the status document names only what the client may pull ------------------------

STATUS_ACCESS = """
[upstream:two]
url = http://127.0.0.1:9

[namespace:ghcr.io]
upstreams = two
anonymous = none

[access]
anonymous = 10.0.0.0/8
trusted_proxies = 127.0.0.1
"""


def status_as(mirror: Any, headers: dict[str, str]) -> dict[str, Any]:
    """``/_status.json`` as a client with *headers* gets it."""
    agent = RequestTraversalAgent(mirror.site.resource)
    d = HTTPClient(agent).get("http://mirror.test/_status.json", headers=headers)
    agent.flush()
    response = result(d)
    assert response.code == 200
    body = treq.content(response)
    agent.flush()
    document: dict[str, Any] = json.loads(result(body))
    return document


def test_the_status_document_names_only_repositories_the_client_may_pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    With ``[access]``, ``/_status.json`` lists a stale tag or a download
    only to a client who may pull its repository: docker.io's to an
    address in its anonymous network, ghcr.io's (``anonymous = none``) to
    the holder of a token for it, nothing to anyone else (who learns how
    many downloads are hidden); a download of another worker process, whose
    repository is unknown here, to nobody.
    """
    monkeypatch.chdir(tmp_path)
    reactor = MemoryReactorClock()
    mirror = build_mirror(
        load(str(write_config(tmp_path, extra=STATUS_ACCESS))), reactor
    )
    theirs, ours = Digest.of(b"theirs"), Digest.of(b"ours")
    running = mirror.fetcher.blobs._running
    for pool in mirror.pools:
        repository = "library/app" if pool.namespace == "docker.io" else "org/app"
        pool.stale[("one", repository)] = StaleAnswer("v1", theirs, ours)
        digest = Digest.of(pool.namespace.encode())
        running[digest] = Download(digest, Followed("s", "f"), pool, repository)
    other = Digest.of(b"another worker's")
    running[other] = Download(other, Followed("s", "f"), None, "", follower=True)

    def seen(document: dict[str, Any]) -> tuple[set[str], set[str], int]:
        stale = {
            f"{n['name']}/{s['repository']}"
            for n in document["namespaces"]
            for s in n["stale"]
        }
        downloads = {d["digest"] for d in document["downloads"]}
        return stale, downloads, document["downloads_hidden"]

    docker, ghcr = (str(Digest.of(n.encode())) for n in ("docker.io", "ghcr.io"))
    inside = status_as(mirror, {"X-Forwarded-For": "10.1.2.3"})
    assert seen(inside) == ({"docker.io/library/app"}, {docker}, 2)
    outside = status_as(mirror, {"X-Forwarded-For": "192.0.2.1"})
    assert seen(outside) == (set(), set(), 3)
    assert [n["name"] for n in outside["namespaces"]] == ["docker.io", "ghcr.io"]
    key = shared_key(str(tmp_path / "cache" / "token.key"))
    token, _ = Tokens(reactor, 300.0, key).issue("alice", [("ghcr.io", "org/app")])
    holder = status_as(
        mirror,
        {"X-Forwarded-For": "192.0.2.1", "Authorization": f"Bearer {token}"},
    )
    assert seen(holder) == ({"ghcr.io/org/app"}, {ghcr}, 2)


def test_the_clusters_bucket_serves_a_namespace_only_what_it_vouches_for(
    tmp_path: Path,
) -> None:
    """
    The bucket holds every namespace's content: what node ``a`` put there
    through docker.io, node ``b`` serves through ghcr.io only once ghcr.io's
    upstream confirms it (``HEAD``): 404 while it denies it, then the
    bucket's copy, no GET upstream, GET and HEAD alike.
    """
    c = Cluster(tmp_path)
    content = image(c.origin)
    assert c.request("a", "GET", "/v2/app/manifests/latest").code == 200
    for blob in ("config", "layer"):
        assert c.body(c.request("a", "GET", f"/v2/app/blobs/{content[blob]}"))
    c.origin.fault = deny("org/")
    manifest = f"/v2/ghcr.io/org/app/manifests/{content['manifest']}"
    layer = f"/v2/ghcr.io/org/app/blobs/{content['layer']}"
    for method in ("GET", "HEAD"):
        for path in (manifest, layer):
            assert c.request("b", method, path).code == 404, (method, path)
    assert c["b"].cached_files() == []

    c.origin.fault = None
    gets = c.origin.count("GET", "/")
    served = c.request("b", "GET", manifest)
    assert c.body(served) == content["body"].encode()
    served = c.request("b", "GET", layer)
    assert c.body(served) == LAYER
    assert c.origin.count("GET", "/") == gets
