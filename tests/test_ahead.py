"""
Pulling ahead (issue 17, target 3): an image manifest served to a client
starts the downloads of its config and layers that are not cached, at most
``prefetch`` at once per namespace, as downloads a client's later request
joins (one upstream GET either way); never for an index or a HEAD, never
past the cache's size limit, never from upstreams all marked down; a
prefetch that fails fails nothing a client asked, and each one is counted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import treq
from fakeregistry import FakeRegistry, digest_of
from hypothesis import given
from hypothesis import strategies as st
from memory import CONFIG, Harness, image_manifest, index_manifest, result
from test_fetch_cluster import Cluster, cached

from regmirror import ahead
from regmirror.ahead import contents
from regmirror.reference import OCI_INDEX, OCI_MANIFEST, parse_digest
from regmirror.siblings import FOLLOW_INTERVAL

LAYER_SIZE = 10 * 1024
FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


def layer(number: int) -> bytes:
    """Distinct layer bytes of LAYER_SIZE."""
    return bytes((number + i) % 251 for i in range(LAYER_SIZE))


def push(fake: FakeRegistry, layers: int, tag: str = "latest") -> dict[str, Any]:
    """An image of *layers* layers as ``library/app:<tag>`` in *fake*."""
    config = fake.add_blob(CONFIG)
    blobs = [fake.add_blob(layer(n)) for n in range(layers)]
    document = image_manifest(
        (config, len(CONFIG)), [(digest, LAYER_SIZE) for digest in blobs]
    )
    manifest, body = fake.add_manifest("library/app", tag, document, OCI_MANIFEST)
    return {"config": config, "layers": blobs, "manifest": manifest, "body": body}


def blob_gets(fake: FakeRegistry) -> list[str]:
    """The digests of the blob GETs the upstream saw, in order."""
    return [
        p.rsplit("/", 1)[1] for m, p in fake.requests if m == "GET" and "/blobs/" in p
    ]


def held_open(fake: FakeRegistry, digest: str) -> bool:
    """Is the held GET of *digest* still connected?"""
    (request,) = [r for r, _ in fake.held if r.path.decode().endswith(digest)]
    return not request._disconnected


def prefetched(harness: Harness, result: str, namespace: str = "docker.io") -> float:
    return harness.metrics.total(
        "regmirror_prefetch_total", namespace=namespace, result=result
    )


def mirror(tmp_path: Path, **kwargs: Any) -> tuple[Harness, FakeRegistry]:
    origin = FakeRegistry()
    return Harness(str(tmp_path / "cache"), {"origin": origin}, **kwargs), origin


def test_a_served_manifest_starts_at_most_prefetch_downloads_at_once(
    tmp_path: Path,
) -> None:
    """
    With ``prefetch = 2``, serving an image of a config and four layers
    starts two downloads (the config first, then the first layer); as each
    ends the next starts, until every blob is cached, each fetched once.
    """
    harness, origin = mirror(tmp_path, prefetch=2)
    image = push(origin, 4)
    wanted = [image["config"], *image["layers"]]
    for digest in wanted:
        origin.hold[digest] = 10
    served = harness.request("GET", "/v2/app/manifests/latest")
    assert served.code == 200
    assert harness.body(served) == image["body"]
    assert blob_gets(origin) == wanted[:2]
    for done in (4, 5):
        origin.release()
        harness.settle()
        assert blob_gets(origin) == wanted[:done]
    origin.release()
    harness.settle()
    assert blob_gets(origin) == wanted
    for digest in wanted:
        assert harness.store.has_blob(parse_digest(digest))
    assert prefetched(harness, "fetched") == 5


def test_a_clients_request_joins_the_prefetch(tmp_path: Path) -> None:
    """
    A client asking for a layer the mirror is fetching ahead joins that
    download: it streams every byte, and the upstream sees one GET of it.
    """
    harness, origin = mirror(tmp_path, prefetch=3)
    image = push(origin, 1)
    (digest,) = image["layers"]
    origin.hold[digest] = 4096
    harness.body(harness.request("GET", "/v2/app/manifests/latest"))
    assert blob_gets(origin) == [image["config"], digest]
    received: list[bytes] = []
    done: list[object] = []
    d = harness.client.get(f"http://mirror.test/v2/app/blobs/{digest}", unbuffered=True)
    d.addCallback(treq.collect, received.append).addBoth(done.append)
    harness.settle()
    assert done == []
    origin.release()
    harness.settle()
    assert done == [None]
    assert b"".join(received) == layer(0)
    assert blob_gets(origin) == [image["config"], digest]
    assert (
        harness.metrics.total(
            "regmirror_cache_lookups_total", kind="blob", result="joined"
        )
        == 1
    )
    assert prefetched(harness, "fetched") == 2


def test_a_blob_a_client_asks_for_leaves_its_place_ahead_to_the_next(
    tmp_path: Path,
) -> None:
    """
    With ``prefetch = 1``: the config is fetched ahead; once the client
    asks for it (joining that download), it is no longer ahead, and the
    first layer starts while the config is still coming; the second waits
    for the client to ask for the first.
    """
    harness, origin = mirror(tmp_path, prefetch=1)
    image = push(origin, 2)
    wanted = [image["config"], *image["layers"]]
    for digest in wanted:
        origin.hold[digest] = 10
    harness.body(harness.request("GET", "/v2/app/manifests/latest"))
    assert blob_gets(origin) == wanted[:1]
    asked = [harness.client.get(f"http://mirror.test/v2/app/blobs/{wanted[0]}")]
    harness.settle()
    assert blob_gets(origin) == wanted[:2]
    asked.append(harness.client.get(f"http://mirror.test/v2/app/blobs/{wanted[1]}"))
    harness.settle()
    assert blob_gets(origin) == wanted
    origin.release()
    harness.settle()
    assert [result(d).code for d in asked] == [200, 200]
    assert blob_gets(origin) == wanted
    assert prefetched(harness, "fetched") == 3


def test_a_clients_request_never_waits_for_the_prefetches(tmp_path: Path) -> None:
    """
    With ``prefetch = 1`` and the config's download held, a client asking
    for the second layer (still waiting its turn ahead) gets it at once
    from its own download; when the turn comes, it is not fetched again.
    """
    harness, origin = mirror(tmp_path, prefetch=1)
    image = push(origin, 2)
    config, first, second = image["config"], *image["layers"]
    origin.hold[config] = 10
    harness.body(harness.request("GET", "/v2/app/manifests/latest"))
    assert blob_gets(origin) == [config]
    served = harness.request("GET", f"/v2/app/blobs/{second}")
    assert served.code == 200
    assert harness.body(served) == layer(1)
    origin.release()
    harness.settle()
    assert blob_gets(origin) == [config, second, first]
    assert prefetched(harness, "fetched") == 2


def test_prefetch_0_fetches_nothing_ahead(tmp_path: Path) -> None:
    """``prefetch = 0``: the upstream sees only what clients ask for."""
    harness, origin = mirror(tmp_path, prefetch=0)
    push(origin, 2)
    harness.body(harness.request("GET", "/v2/app/manifests/latest"))
    harness.clock.advance(60)
    harness.settle()
    assert blob_gets(origin) == []
    assert harness.metrics.total("regmirror_prefetch_total") == 0


def test_a_head_of_a_manifest_fetches_nothing_ahead(tmp_path: Path) -> None:
    """A HEAD (a client checking whether a tag moved) pulls nothing."""
    harness, origin = mirror(tmp_path, prefetch=3)
    push(origin, 2)
    assert harness.request("HEAD", "/v2/app/manifests/latest").code == 200
    harness.settle()
    assert blob_gets(origin) == []


def test_an_index_is_not_pulled_ahead(tmp_path: Path) -> None:
    """
    An index served fetches neither its manifests nor their blobs ahead
    (a client pulls one platform of it); that platform's manifest, once
    served, does.
    """
    harness, origin = mirror(tmp_path, prefetch=3)
    image = push(origin, 1, tag="amd64")
    index = index_manifest([(image, "amd64")])
    origin.add_manifest("library/app", "latest", index, OCI_INDEX)
    served = harness.request(
        "GET", "/v2/app/manifests/latest", headers={"Accept": OCI_INDEX}
    )
    assert json.loads(harness.body(served))["mediaType"] == OCI_INDEX
    harness.settle()
    assert blob_gets(origin) == []
    assert origin.count("GET", f"/manifests/{image['manifest']}") == 0
    harness.body(harness.request("GET", f"/v2/app/manifests/{image['manifest']}"))
    assert blob_gets(origin) == [image["config"], *image["layers"]]


def test_no_prefetch_takes_the_cache_past_its_size_limit(tmp_path: Path) -> None:
    """
    With room in ``max_size`` for the manifest, the config and one layer,
    the second layer is not fetched ahead (counted ``full``), and nothing
    is evicted for it; the client's own request still gets it.
    """
    probe = FakeRegistry()
    body = push(probe, 2)["body"]
    room = len(body) + len(CONFIG) + LAYER_SIZE + LAYER_SIZE // 2
    harness, origin = mirror(tmp_path, prefetch=3, max_size=room)
    image = push(origin, 2)
    assert image["body"] == body
    harness.body(harness.request("GET", "/v2/app/manifests/latest"))
    first, second = image["layers"]
    assert blob_gets(origin) == [image["config"], first]
    assert prefetched(harness, "full") == 1
    assert prefetched(harness, "fetched") == 2
    assert harness.store.has_blob(parse_digest(first))
    assert harness.store.size <= room
    served = harness.request("GET", f"/v2/app/blobs/{second}")
    assert harness.body(served) == layer(1)


def _room_for_one_layer(tmp_path: Path) -> tuple[Harness, FakeRegistry, Any, str]:
    """
    A mirror whose ``max_size`` has room for an image's manifest, config
    and one layer and a half, the image served with its layer's download
    held (fetched ahead, 10 bytes in), and another layer that the image
    does not name.
    """
    probe = FakeRegistry()
    body = push(probe, 1)["body"]
    room = len(body) + len(CONFIG) + LAYER_SIZE + LAYER_SIZE // 2
    harness, origin = mirror(tmp_path, prefetch=3, max_size=room)
    image = push(origin, 1)
    (ahead_of,) = image["layers"]
    origin.hold[ahead_of] = 10
    other = origin.add_blob(layer(7))
    harness.body(harness.request("GET", "/v2/app/manifests/latest"))
    assert blob_gets(origin) == [image["config"], ahead_of]
    assert prefetched(harness, "fetched") == 1
    return harness, origin, image, other


def test_a_clients_download_that_would_pass_max_size_cancels_a_prefetch(
    tmp_path: Path,
) -> None:
    """
    A client's download of another blob, which with the layer being
    fetched ahead would take the cache past ``max_size``, cancels that
    prefetch (counted ``cancelled``): its upstream connection is closed,
    its spool gone, nothing evicted; the client's blob is cached, and a
    later request for the cancelled layer downloads it anew.
    """
    harness, origin, image, other = _room_for_one_layer(tmp_path)
    (cancelled,) = image["layers"]
    served = harness.request("GET", f"/v2/app/blobs/{other}")
    assert harness.body(served) == layer(7)
    assert prefetched(harness, "cancelled") == 1
    assert harness.metrics.total("regmirror_prefetch_total") == 2
    assert not held_open(origin, cancelled)
    origin.held.clear()
    assert not os.path.exists(harness.store.spool_path(parse_digest(cancelled)))
    assert harness.store.has_blob(parse_digest(other))
    assert harness.store.has_blob(parse_digest(image["config"]))
    assert not harness.fetcher.blobs.underway(parse_digest(cancelled))
    del origin.hold[cancelled]
    again = harness.request("GET", f"/v2/app/blobs/{cancelled}")
    assert harness.body(again) == layer(0)
    assert blob_gets(origin) == [image["config"], cancelled, other, cancelled]
    assert harness.store.has_blob(parse_digest(cancelled))


def test_a_prefetch_a_client_joined_is_never_cancelled(tmp_path: Path) -> None:
    """
    With two layers fetched ahead and a client having joined the second
    (the newer), another client's download that would pass ``max_size``
    cancels the first; even though that is not room enough, the one the
    client joined goes on, and its client gets every byte.
    """
    probe = FakeRegistry()
    body = push(probe, 2)["body"]
    room = len(body) + len(CONFIG) + 2 * LAYER_SIZE + LAYER_SIZE // 2
    harness, origin = mirror(tmp_path, prefetch=3, max_size=room)
    image = push(origin, 2)
    first, second = image["layers"]
    origin.hold[first] = origin.hold[second] = 10
    big = origin.add_blob(layer(7) * 2)
    harness.body(harness.request("GET", "/v2/app/manifests/latest"))
    assert blob_gets(origin) == [image["config"], first, second]
    received: list[bytes] = []
    done: list[object] = []
    d = harness.client.get(f"http://mirror.test/v2/app/blobs/{second}", unbuffered=True)
    d.addCallback(treq.collect, received.append).addBoth(done.append)
    harness.settle()
    served = harness.request("GET", f"/v2/app/blobs/{big}")
    assert harness.body(served) == layer(7) * 2
    assert not held_open(origin, first)
    assert held_open(origin, second)
    assert prefetched(harness, "cancelled") == 1
    origin.held = [(r, rest) for r, rest in origin.held if not r._disconnected]
    origin.release()
    harness.settle()
    assert done == [None]
    assert b"".join(received) == layer(1)
    assert prefetched(harness, "fetched") == 2
    assert harness.store.has_blob(parse_digest(second))


def test_a_clients_download_with_room_enough_cancels_no_prefetch(
    tmp_path: Path,
) -> None:
    """With room in ``max_size`` for the client's download besides the
    layer being fetched ahead, to the byte, the prefetch goes on and ends
    cached."""
    harness, origin, image, other = _room_for_one_layer(tmp_path)
    (ahead_of,) = image["layers"]
    assert harness.store.max_size is not None
    harness.store.max_size += LAYER_SIZE // 2
    served = harness.request("GET", f"/v2/app/blobs/{other}")
    assert harness.body(served) == layer(7)
    assert held_open(origin, ahead_of)
    origin.release()
    harness.settle()
    assert prefetched(harness, "cancelled") == 0
    assert prefetched(harness, "fetched") == 2
    assert harness.store.has_blob(parse_digest(ahead_of))
    assert harness.store.has_blob(parse_digest(other))


def test_no_prefetch_below_min_free_or_into_a_cache_that_cannot_be_written(
    tmp_path: Path,
) -> None:
    """Nothing is fetched ahead while the file system has less free space
    than ``min_free`` would leave, nor while the cache cannot be written
    (both counted ``full``)."""
    harness, origin = mirror(tmp_path, prefetch=3)
    image = push(origin, 1)
    # Far beyond what is free: other processes (xdist's other worker) free
    # and fill the same file system meanwhile.
    harness.store.min_free = harness.store.free_space() + 2**40
    harness.body(harness.request("GET", "/v2/app/manifests/latest"))
    assert blob_gets(origin) == []
    assert prefetched(harness, "full") == 2
    harness.store.min_free = None
    harness.store.degraded_until = harness.clock.seconds() + 60
    harness.body(harness.request("GET", f"/v2/app/manifests/{image['manifest']}"))
    assert blob_gets(origin) == []
    assert prefetched(harness, "full") == 4


def test_beyond_so_many_waiting_a_namespace_queues_no_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for two waiting, the third blob of an image is not
    queued (counted ``busy``); the client fetches it itself."""
    monkeypatch.setattr(ahead, "MAX_WAITING", 2)
    harness, origin = mirror(tmp_path, prefetch=1)
    image = push(origin, 2)
    harness.body(harness.request("GET", "/v2/app/manifests/latest"))
    assert prefetched(harness, "busy") == 1
    assert blob_gets(origin) == [image["config"], image["layers"][0]]


def test_a_failing_prefetch_fails_nothing_a_client_asked(tmp_path: Path) -> None:
    """
    A layer the upstream fails to give (a 500) is counted ``failed``; the
    manifest was served whole, the config fetched ahead is served, and the
    client's own request for the layer, once the upstream recovered,
    fetches it: the failure was not remembered as an answer.
    """
    harness, origin = mirror(tmp_path, prefetch=3)
    image = push(origin, 1)
    (digest,) = image["layers"]

    def broken(request: Any) -> tuple[int, bytes] | None:
        if request.path.endswith(digest.encode()):
            return 500, b"oops"
        return None

    origin.fault = broken
    served = harness.request("GET", "/v2/app/manifests/latest")
    assert served.code == 200
    assert harness.body(served) == image["body"]
    harness.settle()
    assert prefetched(harness, "failed") == 1
    assert prefetched(harness, "fetched") == 1
    config = harness.request("GET", f"/v2/app/blobs/{image['config']}")
    assert config.code == 200
    assert harness.body(config) == CONFIG
    origin.fault = None
    harness.clock.advance(60)  # past the breaker's back-off, if it opened
    again = harness.request("GET", f"/v2/app/blobs/{digest}")
    assert again.code == 200
    assert harness.body(again) == layer(0)


def test_nothing_is_fetched_ahead_from_upstreams_marked_down(tmp_path: Path) -> None:
    """A cached manifest served while the namespace's only upstream is
    marked down fetches nothing ahead (counted ``down``): a guess is not
    the breaker's probe."""
    harness, origin = mirror(tmp_path, prefetch=3)
    image = push(origin, 1)
    assert harness.request("HEAD", f"/v2/app/manifests/{image['manifest']}").code == 200
    harness.upstreams["origin"].breaker.failed(True)
    origin.requests.clear()
    served = harness.request("GET", f"/v2/app/manifests/{image['manifest']}")
    assert served.code == 200
    harness.settle()
    assert origin.requests == []
    assert prefetched(harness, "down") == 2


def test_an_image_whose_blobs_are_cached_does_nothing(tmp_path: Path) -> None:
    """A manifest by tag whose config and layers are all cached starts
    nothing and counts nothing."""
    harness, origin = mirror(tmp_path, prefetch=3)
    image = push(origin, 2)
    harness.body(harness.request("GET", "/v2/app/manifests/latest"))
    assert prefetched(harness, "fetched") == 3
    origin.requests.clear()
    harness.clock.advance(60)  # past tag_ttl: the origin is asked again
    harness.body(harness.request("GET", "/v2/app/manifests/latest"))
    harness.settle()
    assert blob_gets(origin) == []
    assert harness.metrics.total("regmirror_prefetch_total") == 3
    assert all(
        harness.store.has_blob(parse_digest(d))
        for d in [image["config"], *image["layers"]]
    )


def test_another_worker_joins_a_prefetch_through_the_spool_lock(
    tmp_path: Path,
) -> None:
    """
    With two worker processes on one cache folder, a layer the first is
    fetching ahead is asked of the second: the second follows the first's
    spool (one upstream GET, no HEAD: the first recorded that docker.io
    vouches for it), and its client gets every byte.
    """
    origin = FakeRegistry()
    image = push(origin, 1)
    (digest,) = image["layers"]
    origin.hold[digest] = 4096
    first = Harness(str(tmp_path / "cache"), {"origin": origin}, prefetch=3)
    second = Harness(str(tmp_path / "cache"), {"origin": origin}, clock=first.clock)
    first.body(first.request("GET", "/v2/app/manifests/latest"))
    assert blob_gets(origin) == [image["config"], digest]
    asked = second.client.get(f"http://mirror.test/v2/app/blobs/{digest}")
    second.settle()
    origin.release()
    for _ in range(10):
        first.settle()
        second.settle()
        first.clock.advance(FOLLOW_INTERVAL)
    served = result(asked)
    assert served.code == 200
    assert second.body(served) == layer(0)
    assert blob_gets(origin) == [image["config"], digest]
    assert origin.count("HEAD", "/blobs/") == 0


def test_another_node_joins_a_prefetch_through_its_lease(tmp_path: Path) -> None:
    """
    In a cluster, a layer node a is fetching ahead (holding the digest's
    lease) is asked of node b: b streams it from a, and the upstream sees
    one GET of it.
    """
    c = Cluster(tmp_path, "ab", prefetch=3)
    image = push(c.origin, 1)
    (digest,) = image["layers"]
    c.origin.hold[digest] = 4096
    c.body(c.request("a", "GET", "/v2/app/manifests/latest"))
    assert blob_gets(c.origin) == [image["config"], digest]
    streamed = c.stream("b", f"/v2/app/blobs/{digest}")
    c.origin.release()
    c.settle()
    assert streamed.outcome == [None]
    assert streamed.data == layer(0)
    assert blob_gets(c.origin) == [image["config"], digest]


def test_a_blob_the_bucket_redirects_clients_to_is_not_fetched_ahead(
    tmp_path: Path,
) -> None:
    """
    With ``redirect = true``, node b serving a manifest whose blobs node a
    put in the bucket fetches none of them (its clients are sent to the
    bucket: the bytes are not to flow through b); a blob not in the bucket
    yet is fetched ahead as ever.
    """
    c = Cluster(tmp_path, "ab", redirect_ttl=600.0, prefetch=3)
    image = push(c.origin, 1)
    c.body(c.request("a", "GET", "/v2/app/manifests/latest"))
    assert prefetched(c["a"], "fetched") == 2
    c.origin.requests.clear()
    c.body(c.request("b", "GET", "/v2/app/manifests/latest"))
    c.settle()
    assert blob_gets(c.origin) == []
    for digest in (image["config"], *image["layers"]):
        assert cached(c["b"], digest) is None
    assert c["b"].metrics.total("regmirror_prefetch_total") == 0
    (digest,) = image["layers"]
    sent = c.request("b", "GET", f"/v2/app/blobs/{digest}", allow_redirects=False)
    assert sent.code == 307


def test_contents_are_the_config_then_the_served_layers() -> None:
    """Foreign (non-distributable) layers, entries without a size and
    repeats are left out."""
    good, other, foreign = digest_of(b"a"), digest_of(b"b"), digest_of(b"c")
    body = json.dumps(
        {
            "config": {"digest": good, "size": 1},
            "layers": [
                {"digest": other, "size": 2},
                {"digest": good, "size": 1},
                {
                    "mediaType": FOREIGN,
                    "digest": foreign,
                    "size": 3,
                },
                {"digest": foreign},
                {"digest": "nonsense", "size": 4},
            ],
        }
    ).encode()
    assert contents(body) == [(parse_digest(good), 1), (parse_digest(other), 2)]
    assert contents(b"not json") == []


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.sampled_from(["config", "layers", "digest", "size", "mediaType", "x"]),
            inner,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@given(JSON)
def test_contents_of_any_document_never_raise(document: object) -> None:
    """Whatever an upstream's manifest holds, reading it for blobs to fetch
    ahead gives digests with sizes, or nothing, never an exception."""
    body = json.dumps(document).encode()
    for digest, size in contents(body):
        assert isinstance(size, int) and size >= 0
        assert str(parse_digest(str(digest))) == str(digest)
