"""
The fetcher's cluster logic, in memory: two or three nodes (the real
resources, fetchers and stores of :class:`memory.Harness`) on one
:class:`Clock`, wired as :func:`regmirror.service.build_mirror` wires them:
the real :class:`Coordinator` over :class:`memory_redis.FakeRedis`, a bucket
of :class:`fakes3.FakeS3` (which checks every signature) as the shared
store, and an in-memory network that carries one node's requests to
another node's ``/_cluster/blobs/``.  One fake upstream registry serves
every node and counts what it is asked.
"""

from __future__ import annotations

import gc
import json
import textwrap
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import treq
from fakeregistry import FakeRegistry
from fakes3 import FakeS3
from memory import LAYER, Harness, image, result
from memory_redis import FakeRedis, Link
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from regmirror import cluster, nodes
from regmirror._attempts import MAX_FRUITLESS
from regmirror.cluster import Coordinator, Lease
from regmirror.config import Secret
from regmirror.download import Download
from regmirror.ini import load
from regmirror.nodes import Peers
from regmirror.reference import OCI_INDEX, OCI_MANIFEST, Digest, parse_digest
from regmirror.s3.location import S3Location
from regmirror.s3.objects import ObjectStore
from regmirror.s3.shared import SharedStore
from regmirror.service import build_mirror
from regmirror.sources import CLAIM_POLLS

REDIS = "redis://127.0.0.1:6379/0"
ACCESS = "AKIDEXAMPLE7Q"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"
REGION = "eu-test-1"
BUCKET = "cache"
# 2021-01-01T00:00:00Z: signing times come from the clock.
START = 1_609_459_200.0
#: The nodes' lease ttl: a node asks again for a held digest every second.
TTL = 4.0
TAG_TTL = 30.0  # the Harness's


class Gateway(Resource):
    """A node's resources as the network reaches them; remembers each
    request so that a node's death can break them."""

    def __init__(self, root: Resource) -> None:
        super().__init__()
        self.root = root
        self.requests: list[Request] = []

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        self.requests.append(request)
        return self.root.getChildWithDefault(path, request)


@implementer(IAgent)
class Network:
    """
    The nodes' network: ``http://node-<name>:5000`` reaches that node's
    resources; a node in :attr:`down` refuses connections.
    """

    def __init__(self) -> None:
        self.gateways: dict[str, Gateway] = {}
        self.agents: dict[str, RequestTraversalAgent] = {}
        self.down: set[str] = set()

    def add(self, host: str, root: Resource) -> None:
        self.gateways[host] = Gateway(root)
        self.agents[host] = RequestTraversalAgent(self.gateways[host])

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        host = (urlsplit(uri).hostname or b"").decode()
        if host in self.down or host not in self.agents:
            return fail(ConnectionRefusedError(host))
        response: Deferred[IResponse] = self.agents[host].request(
            method, uri, headers, bodyProducer
        )
        return response

    def cut(self, host: str) -> None:
        """Break every open connection to *host*."""
        for request in self.gateways[host].requests:
            if not request.finished and request.channel is not None:
                # As a TCP transport does when its connection is lost: stop
                # the producer first (iosim's transports do not).
                request.channel.stopProducing()
            if not request.finished and request.channel is not None:
                request.loseConnection()

    def flush(self) -> None:
        for agent in self.agents.values():
            agent.flush()


class Sink:
    """What a client received of one streamed response."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.outcome: list[object] = []
        self.response: IResponse | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def finished(self) -> bool:
        return bool(self.outcome)

    def got(self, response: IResponse) -> Deferred[None]:
        self.response = response
        return treq.collect(response, self.chunks.append)


class Cluster:
    """
    Nodes ``a``, ``b``, ... over one fake upstream (``origin``), one Redis,
    one bucket (unless *shared* is false) and one clock.
    """

    def __init__(
        self,
        root: Path,
        names: str = "ab",
        shared: bool = True,
        origin: FakeRegistry | None = None,
        s3: type[FakeS3] = FakeS3,
        redirect_ttl: float | None = None,
        prefetch: int = 0,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.origin = origin if origin is not None else FakeRegistry()
        self.redis = FakeRedis(self.clock)
        self.s3 = s3(ACCESS, SECRET, REGION, {BUCKET}, self.clock.seconds)
        self.s3_agent = RequestTraversalAgent(self.s3)
        self.location = S3Location(
            "http://s3.test:7480", BUCKET, REGION, Secret(ACCESS), Secret(SECRET)
        )
        self.network = Network()
        self.peers = Peers(self.network, self.clock)
        self.nodes: dict[str, Harness] = {}
        self.coordinators: dict[str, Coordinator] = {}
        self.links: dict[str, Link] = {}
        for name in names:
            self.links[name] = self.redis.link()
            coordinator = self.coordinator(self.url(name), self.links[name])
            node = Harness(
                str(root / name),
                {"origin": self.origin},
                clock=self.clock,
                coordinator=coordinator,
                peers=self.peers,
                bucket=(
                    SharedStore(ObjectStore(self.s3_agent, self.clock, self.location))
                    if shared
                    else None
                ),
                redirect_ttl=redirect_ttl,
                prefetch=prefetch,
            )
            self.network.add(f"node-{name}", node.root)
            self.nodes[name] = node
            self.coordinators[name] = coordinator

    def coordinator(self, url: str, link: Link) -> Coordinator:
        """A started coordinator advertising *url*, reaching Redis by *link*."""
        coordinator = Coordinator(
            self.clock, REDIS, url, lease_ttl=TTL, timeout=1.0, endpoint=link
        )
        coordinator.start()
        return coordinator

    @staticmethod
    def url(name: str) -> str:
        return f"http://node-{name}:5000"

    def __getitem__(self, name: str) -> Harness:
        return self.nodes[name]

    # -- driving ------------------------------------------------------------

    def settle(self) -> None:
        """Pump every in-memory connection, and the clock's zero delays."""
        for _ in range(40):
            for node in self.nodes.values():
                for stub in node.stubs.values():
                    stub.flush()
                node.client.flush()
            self.network.flush()
            self.s3_agent.flush()
            self.clock.advance(0)

    def tick(self, seconds: float) -> None:
        """Let *seconds* pass, a quarter of a second at a time (leases are
        renewed on the way, as they would be)."""
        steps = max(1, round(seconds / 0.25))
        for _ in range(steps):
            self.clock.advance(seconds / steps)
            self.settle()

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        d = Deferred.fromCoroutine(coroutine)
        self.settle()
        return result(d)

    def stream(self, name: str, path: str, **kwargs: Any) -> Sink:
        """A GET by node *name*'s client, streamed into a :class:`Sink`."""
        sink = Sink()
        d = self[name].client.get(
            f"http://mirror.test{path}", unbuffered=True, **kwargs
        )
        d.addCallback(sink.got).addBoth(sink.outcome.append)
        self.settle()
        return sink

    def request(self, name: str, method: str, path: str, **kwargs: Any) -> Any:
        d = self[name].client.request(method, f"http://mirror.test{path}", **kwargs)
        self.settle()
        return result(d)

    def body(self, response: IResponse) -> bytes:
        d = treq.content(response)
        self.settle()
        data: bytes = result(d)
        return data

    def peer_get(
        self, name: str, digest: str, token: str | None, **headers: str
    ) -> tuple[int, bytes]:
        """What node *name*'s ``/_cluster/blobs/<digest>`` answers."""
        sent = Headers({k.replace("_", "-"): [v] for k, v in headers.items()})
        if token is not None:
            sent.setRawHeaders(nodes.AUTH_HEADER, [token.encode()])
        d = self.network.request(
            b"GET",
            f"{self.url(name)}/_cluster/blobs/{digest}".encode(),
            sent,
        )
        self.settle()
        response = result(d)
        return response.code, self.body(response)

    # -- looking --------------------------------------------------------------

    def blob_gets(self) -> int:
        return self.origin.count("GET", "/blobs/")

    def in_bucket(self, key: str) -> bytes | None:
        found = self.s3.objects.get((BUCKET, key))
        return None if found is None else found[0]

    def acquires(self, name: str) -> int:
        """How many times node *name* asked Redis for a lease."""
        return len(
            [
                args
                for args in self.redis.named(cluster._ACQUIRE.encode())
                if args[-3] == self.url(name).encode()
            ]
        )

    def holder(self, digest: str) -> str | None:
        """The URL of the node holding *digest*'s lease, as Redis has it."""
        value = self.redis.get(f"regmirror:lease:{digest}".encode())
        return None if value is None else value.decode().split(" ", 1)[1]

    def cut_off(self, name: str) -> None:
        """Node *name* can reach Redis no more: it renews no lease."""
        self.links[name].down = True
        self.links[name].drop()

    def dead_holder(self, name: str, digest: str) -> Lease:
        """
        The lease on *digest* left by a previous life of node *name*: taken
        under its URL, then never renewed nor released (it was killed).
        """
        link = self.redis.link()
        previous = self.coordinator(self.url(name), link)
        lease = self.run(previous.acquire(parse_digest(digest)))
        assert isinstance(lease, Lease)
        link.down = True
        link.drop()
        return lease


def blob_key(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def manifest_key(digest: str) -> str:
    return "manifests/sha256/" + digest.removeprefix("sha256:")


def cached(node: Harness, digest: str) -> bytes | None:
    parsed = parse_digest(digest)
    if node.store.blob_size(parsed) is None:
        return None
    with open(node.store.blob_path(parsed), "rb") as f:
        return f.read()


def error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


# -- one download for the cluster ----------------------------------------------


@pytest.mark.parametrize("together", [False, True], ids=["a-first", "together"])
def test_a_node_takes_a_blob_from_the_node_downloading_it(
    tmp_path: Path, together: bool
) -> None:
    """
    While one node downloads a blob under its lease, another node asking
    for it streams it from that node (``node <URL>``), not from upstream:
    the upstream sees one blob GET, and both nodes end with verified bytes.
    Asked at the same moment, one node wins the lease and the other follows.
    """
    c = Cluster(tmp_path)
    layer = image(c.origin)["layer"]
    c.origin.hold[layer] = 4096
    path = f"/v2/app/blobs/{layer}"
    if together:
        sinks = [Sink(), Sink()]
        for name, sink in zip("ab", sinks, strict=True):
            d = c[name].client.get(f"http://mirror.test{path}", unbuffered=True)
            d.addCallback(sink.got).addBoth(sink.outcome.append)
        c.settle()
    else:
        sinks = [c.stream("a", path)]
        sinks.append(c.stream("b", path))

    assert c.blob_gets() == 1
    downloads: list[Download] = [*c["a"].fetcher.downloads, *c["b"].fetcher.downloads]
    sources = sorted(d.source for d in downloads)
    assert len(sources) == 2 and sources[1] == "origin", sources
    assert sources[0] in ("node " + c.url("a"), "node " + c.url("b"))
    holder = next(d for d in downloads if d.source == "origin")
    follower = next(d for d in downloads if d.source != "origin")
    assert isinstance(holder.lease, Lease) and follower.lease is None
    # Both clients are served as the bytes arrive, neither is complete.
    assert not any(sink.finished for sink in sinks)
    assert all(0 < len(sink.data) < len(LAYER) for sink in sinks)

    c.origin.release()
    c.settle()
    assert [sink.outcome for sink in sinks] == [[None], [None]]
    assert all(sink.data == LAYER for sink in sinks)
    assert cached(c["a"], layer) == cached(c["b"], layer) == LAYER
    assert c.blob_gets() == 1


def test_the_holder_shares_blob_and_manifests_then_a_cold_node_needs_no_upstream(
    tmp_path: Path,
) -> None:
    """
    The node that took a blob from upstream puts it in the bucket and
    releases its lease; manifests it fetched are in the bucket too.  A cold
    node then pulls the whole image (tag, manifest, blobs) without a single
    upstream request: the tag from the cluster, the rest from the bucket.
    """
    c = Cluster(tmp_path, "abc")
    content = image(c.origin)
    pulled = c.request("a", "GET", "/v2/app/manifests/latest")
    assert pulled.code == 200
    assert pulled.headers.getRawHeaders("Regmirror-Tag-Source") == ["origin"]
    for blob in ("config", "layer"):
        assert c.body(c.request("a", "GET", f"/v2/app/blobs/{content[blob]}"))

    assert c.in_bucket(blob_key(content["layer"])) == LAYER
    assert c.in_bucket(manifest_key(content["manifest"])) == content["body"].encode()
    assert c.s3.objects[(BUCKET, manifest_key(content["manifest"]))][1] == OCI_MANIFEST
    assert c.holder(content["layer"]) is None
    released = c.redis.named(cluster._RELEASE.encode())
    assert len(released) == 2  # one per blob

    before = list(c.origin.requests)
    manifest = c.request("c", "GET", "/v2/app/manifests/latest")
    assert manifest.code == 200
    assert manifest.headers.getRawHeaders("Regmirror-Tag-Source") == ["cluster"]
    assert c.body(manifest) == content["body"].encode()
    by_digest = c.request("c", "GET", f"/v2/app/manifests/{content['manifest']}")
    assert c.body(by_digest) == content["body"].encode()
    layer = c.stream("c", f"/v2/app/blobs/{content['layer']}")
    assert layer.outcome == [None] and layer.data == LAYER
    assert cached(c["c"], content["layer"]) == LAYER
    assert c.origin.requests == before
    # Taken from the bucket, the blob is not put there again.
    assert c.s3.operations().count("PutObject") == 3  # config, layer, manifest


@pytest.mark.parametrize(
    ("stored_type", "from_bucket"), [("text/html", True), (OCI_INDEX, False)]
)
def test_a_manifest_from_the_bucket_gets_the_check_an_upstream_answer_gets(
    tmp_path: Path, stored_type: str, from_bucket: bool
) -> None:
    """
    A manifest read back from the bucket is served with the media type its
    document says, not with the object's Content-Type (``text/html`` would
    be served from the mirror's origin); an object whose Content-Type names
    another shape of manifest is no manifest, and the node asks upstream
    instead (issue 16, item 10).
    """
    c = Cluster(tmp_path, "ac")
    content = image(c.origin)
    assert c.request("a", "GET", "/v2/app/manifests/latest").code == 200
    key = (BUCKET, manifest_key(content["manifest"]))
    c.s3.objects[key] = (c.s3.objects[key][0], stored_type)
    before = c.origin.count("GET", "/manifests/")

    answer = c.request("c", "GET", "/v2/app/manifests/latest")
    assert answer.code == 200
    assert answer.headers.getRawHeaders("Content-Type") == [OCI_MANIFEST]
    assert c.body(answer) == content["body"].encode()
    asked = c.origin.count("GET", "/manifests/") - before
    assert asked == (0 if from_bucket else 1)


# -- the node-to-node endpoint -------------------------------------------------


@pytest.mark.parametrize("auth", ["none", "other-key", "other-digest", "garbage"])
def test_peer_endpoint_refuses_requests_without_the_clusters_token(
    tmp_path: Path, auth: str
) -> None:
    """No token, or one that is not the digest's under the cluster's key:
    403 DENIED, and nothing is downloaded or asked upstream."""
    c = Cluster(tmp_path)
    layer = image(c.origin)["layer"]
    c.body(c.request("a", "GET", f"/v2/app/blobs/{layer}"))  # a has it
    key = c.run(c.coordinators["a"].peer_key())
    token = {
        "none": None,
        "other-key": nodes.token(b"k" * 32, parse_digest(layer)),
        "other-digest": nodes.token(key, Digest.of(b"something else")),
        "garbage": "0" * 64,
    }[auth]
    before = list(c.origin.requests)
    code, body = c.peer_get("a", layer, token)
    assert code == 403
    assert error_code(body) == "DENIED"
    assert c.origin.requests == before


def test_peer_endpoint_serves_only_what_the_node_has_and_never_asks_upstream(
    tmp_path: Path,
) -> None:
    """
    With the right token: a digest the node neither has nor downloads is
    404 BLOB_UNKNOWN even though the upstream has it (the endpoint is no
    proxy: no upstream request, no download started); a cached one is
    served, ranges included.
    """
    c = Cluster(tmp_path)
    content = image(c.origin)
    layer, config = content["layer"], content["config"]
    c.body(c.request("a", "GET", f"/v2/app/blobs/{layer}"))
    key = c.run(c.coordinators["a"].peer_key())
    before = list(c.origin.requests)
    files = c["a"].cached_files()

    code, body = c.peer_get("a", config, nodes.token(key, parse_digest(config)))
    assert (code, error_code(body)) == (404, "BLOB_UNKNOWN")
    assert c["a"].cached_files() == files
    assert c["a"].fetcher.downloads == []

    token = nodes.token(key, parse_digest(layer))
    assert c.peer_get("a", layer, token) == (200, LAYER)
    assert c.peer_get("a", layer, token, Range="bytes=100-") == (206, LAYER[100:])
    assert c.origin.requests == before


# -- a holder that does not answer ---------------------------------------------


@pytest.mark.parametrize("why", ["refused", "not-downloading"])
def test_a_dead_holder_is_polled_until_its_lease_runs_out(
    tmp_path: Path, why: str
) -> None:
    """
    The node holding a digest's lease refuses connections, or answers 404
    (it is not downloading it): the asking node asks Redis again every
    ``lease_ttl / 4`` and, once the lease has run out, takes it and
    downloads from upstream itself.
    """
    c = Cluster(tmp_path)
    layer = image(c.origin)["layer"]
    c.dead_holder("a", layer)
    if why == "refused":
        c.network.down.add("node-a")

    sink = c.stream("b", f"/v2/app/blobs/{layer}")
    for polls in range(1, 5):
        assert c.acquires("b") == polls
        assert not sink.finished and c.blob_gets() == 0
        c.tick(TTL / 4)
    assert c.acquires("b") == 5
    assert sink.outcome == [None] and sink.data == LAYER
    assert c.blob_gets() == 1
    # b took the lease, shared the blob and let go.
    assert c.in_bucket(blob_key(layer)) == LAYER
    assert c.holder(layer) is None


def test_a_holder_that_never_answers_is_given_up_after_claim_polls(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """
    A holder that keeps its lease alive but never gives the blob: after
    ``CLAIM_POLLS`` looks, ``lease_ttl / 4`` apart, the node downloads alone
    (without the lease, which stays with the holder), and says so once.
    """
    c = Cluster(tmp_path)
    layer = image(c.origin)["layer"]
    c.run(c.coordinators["a"].acquire(parse_digest(layer)))  # renewed, never served

    sink = c.stream("b", f"/v2/app/blobs/{layer}")
    for _ in range(CLAIM_POLLS - 1):
        c.tick(TTL / 4)
    assert c.acquires("b") == CLAIM_POLLS
    assert not sink.finished and c.blob_gets() == 0
    c.tick(TTL / 4)
    assert sink.outcome == [None] and sink.data == LAYER
    assert c.acquires("b") == CLAIM_POLLS
    assert c.blob_gets() == 1
    assert c.holder(layer) == c.url("a")
    text = [formatEvent(e) for e in logged]
    assert len([t for t in text if "cannot give" in t]) == CLAIM_POLLS
    assert len([t for t in text if "never answered: downloading alone" in t]) == 1


def test_a_follower_resumes_from_upstream_when_the_holder_dies_mid_transfer(
    tmp_path: Path,
) -> None:
    """
    The holder dies while a follower streams the blob from it: the
    follower's transfer breaks, it waits for the dead node's lease to run
    out, takes it and asks upstream for the rest only (one ranged GET);
    its client gets the whole blob, verified.
    """
    c = Cluster(tmp_path)
    layer = image(c.origin)["layer"]
    c.origin.hold[layer] = 4096
    c.stream("a", f"/v2/app/blobs/{layer}")
    sink = c.stream("b", f"/v2/app/blobs/{layer}")
    (download,) = c["b"].fetcher.downloads
    assert download.from_peer and download.written == 4095
    (holding,) = c["a"].fetcher.downloads
    assert holding.lease is not None

    # Node a dies: its connections break, its lease is no longer renewed.
    c.cut_off("a")
    c.network.down.add("node-a")
    c.network.cut("node-a")
    c.settle()
    assert not sink.finished
    for _ in range(4):
        c.tick(TTL / 4)
    assert sink.outcome == [None] and sink.data == LAYER
    assert download.resumed == 1 and download.source == "origin"
    assert c.origin.ranges == ["bytes=4095-"]
    assert c.blob_gets() == 2
    assert cached(c["b"], layer) == LAYER
    assert c.in_bucket(blob_key(layer)) == LAYER


# -- Redis down ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["refused", "silent"])
def test_without_redis_a_node_works_alone(tmp_path: Path, how: str) -> None:
    """
    Redis refuses connections, or stops answering: each node downloads on
    its own (a silent Redis costs one ``timeout``, then calls fail at once),
    resolves tags at the origin, and its peer endpoint answers 503 while it
    cannot learn the cluster's key.
    """
    c = Cluster(tmp_path, shared=False)
    content = image(c.origin)
    if how == "refused":
        c.redis.down = True
        c.redis.drop()
    else:
        c.redis.silent = True
    c.settle()

    sink = c.stream("a", f"/v2/app/blobs/{content['layer']}")
    if how == "silent":
        assert not sink.finished and c.blob_gets() == 0
        c.tick(1.0)  # the coordinator's timeout
    assert sink.outcome == [None] and sink.data == LAYER
    assert c.coordinators["a"].available is False

    other = c.stream("b", f"/v2/app/blobs/{content['layer']}")
    if how == "silent":
        c.tick(1.0)
    assert other.outcome == [None] and other.data == LAYER
    assert c.blob_gets() == 2  # no cluster: one download per node

    manifest = c.request("a", "GET", "/v2/app/manifests/latest")
    assert manifest.code == 200
    assert manifest.headers.getRawHeaders("Regmirror-Tag-Source") == ["origin"]
    key = b"k" * 32
    token = nodes.token(key, parse_digest(content["layer"]))
    code, body = c.peer_get("a", content["layer"], token)
    assert (code, error_code(body)) == (503, "UNAVAILABLE")


def test_readyz_says_degraded_while_redis_is_unreachable(tmp_path: Path) -> None:
    """
    As :func:`build_mirror` wires it: a node whose Redis does not answer
    stays ready (200) and says it is degraded; the coordinator gauge is 0.
    """
    config = tmp_path / "mirror.ini"
    config.write_text(
        textwrap.dedent(
            f"""\
            [server]
            listen = tcp:0:interface=127.0.0.1

            [cache]
            directory = {tmp_path / "cache"}

            [upstream:one]
            url = http://127.0.0.1:9

            [namespace:docker.io]
            upstreams = one
            default = true

            [cluster]
            redis = redis://127.0.0.1:9/0
            advertise = http://127.0.0.1:5000
            """
        )
    )
    reactor = MemoryReactorClock()
    mirror = build_mirror(load(str(config)), reactor)
    mirror.start()
    reactor.advance(5.0)  # the connection never comes
    agent = RequestTraversalAgent(mirror.site.resource)
    client = HTTPClient(agent)

    def get(path: str) -> tuple[int, bytes]:
        d = client.get(f"http://mirror.test{path}")
        agent.flush()
        response = result(d)
        return response.code, result(treq.content(response))

    assert get("/readyz") == (
        200,
        b"ok, degraded: cluster: Redis unreachable, this node works alone\n",
    )
    code, metrics = get("/metrics")
    assert code == 200
    assert b"regmirror_cluster_coordinator_up 0.0" in metrics


# -- tags --------------------------------------------------------------------------


def test_tag_answers_are_shared_for_tag_ttl(tmp_path: Path) -> None:
    """
    A tag the origin answered for one node is answered from the cluster on
    another within ``tag_ttl`` (counted from the origin's answer), without
    asking the origin; after ``tag_ttl`` the other node asks the origin.
    """
    c = Cluster(tmp_path)
    content = image(c.origin)

    def tag_requests() -> int:
        return len([p for _, p in c.origin.requests if p.endswith("/manifests/latest")])

    def source(name: str) -> list[str]:
        response = c.request(name, "GET", "/v2/app/manifests/latest")
        assert response.code == 200
        assert c.body(response) == content["body"].encode()
        return list(response.headers.getRawHeaders("Regmirror-Tag-Source"))

    assert source("a") == ["origin"]
    assert tag_requests() == 1
    c.tick(TAG_TTL - 1)
    assert source("b") == ["cluster"]
    assert tag_requests() == 1
    c.tick(1)
    assert source("b") == ["origin"]
    assert tag_requests() == 2


# -- redirects to the bucket -------------------------------------------------------


def test_redirect_to_the_bucket_only_for_blobs_not_cached_here(tmp_path: Path) -> None:
    """
    With ``redirect_ttl``: a blob in the bucket and not in this node's cache
    is a 307 to a presigned URL of the bucket (which works, and holds no
    secret); a blob in this node's cache is served by the node.
    """
    c = Cluster(tmp_path, "ab", redirect_ttl=600.0)
    content = image(c.origin)
    layer = content["layer"]
    first = c.stream("a", f"/v2/app/blobs/{layer}")
    assert first.outcome == [None] and first.data == LAYER  # not in the bucket yet

    local = c.stream("a", f"/v2/app/blobs/{layer}", allow_redirects=False)
    assert local.response is not None and local.response.code == 200
    assert local.data == LAYER

    elsewhere = c.request("b", "GET", f"/v2/app/blobs/{layer}", allow_redirects=False)
    assert elsewhere.code == 307
    (location,) = elsewhere.headers.getRawHeaders("Location")
    assert SECRET not in location and SECRET.replace("/", "%2F") not in location
    parts = urlsplit(location)
    assert (parts.hostname, parts.path) == ("s3.test", f"/{BUCKET}/{blob_key(layer)}")
    query = parse_qs(parts.query)
    assert query["X-Amz-Expires"] == ["600"]
    assert query["X-Amz-Credential"][0].startswith(ACCESS + "/")
    assert cached(c["b"], layer) is None
    assert c.blob_gets() == 1

    d = HTTPClient(c.s3_agent).get(location)
    c.settle()
    followed = result(d)
    assert followed.code == 200
    assert c.body(followed) == LAYER


# -- the bucket's size ---------------------------------------------------------------


def test_bucket_eviction_deletes_least_recently_used_blobs_until_under_the_limit(
    tmp_path: Path,
) -> None:
    """
    ``Bucket.evict`` deletes the bucket's least recently used blobs (a
    blob read from the bucket counts as used) from the bucket and from
    Redis's index, until the total is at most its ``max_size``
    (``s3_max_size``).
    """
    c = Cluster(tmp_path, "ac")
    blobs = {
        name: c.origin.add_blob(bytes([n]) * size)
        for n, (name, size) in enumerate([("x", 1000), ("y", 2000), ("z", 3000)])
    }
    for name in "xyz":
        c.body(c.request("a", "GET", f"/v2/app/blobs/{blobs[name]}"))
        c.tick(10)
    index = c.redis.hashes[b"regmirror:store:size"]
    assert {bytes(k).decode() for k in index} == set(blobs.values())
    assert c.run(c.coordinators["c"].total_size()) == 6000

    bucket = c["c"].fetcher.bucket
    assert bucket is not None
    bucket.max_size = 10**9
    assert c.body(c.request("c", "GET", f"/v2/app/blobs/{blobs['x']}"))  # x used now
    assert c.blob_gets() == 3

    bucket.max_size = 4000
    assert c.run(bucket.evict()) == 1
    assert [c.in_bucket(blob_key(blobs[n])) is not None for n in "xyz"] == [
        True,
        False,
        True,
    ]
    assert blobs["y"].encode() not in index
    assert c.run(c.coordinators["c"].total_size()) == 4000
    assert c.run(bucket.evict()) == 0

    bucket.max_size = 0
    assert c.run(bucket.evict()) == 2
    assert all(c.in_bucket(blob_key(digest)) is None for digest in blobs.values())
    assert index == {}
    assert c.run(c.coordinators["c"].total_size()) == 0


# -- breaks and refusals -------------------------------------------------------


def test_peer_endpoint_does_not_pass_on_what_the_node_takes_from_another(
    tmp_path: Path,
) -> None:
    """A node streaming a blob from the holder answers 404 for it: nodes
    never chain blobs through each other."""
    c = Cluster(tmp_path)
    layer = image(c.origin)["layer"]
    c.origin.hold[layer] = 4096
    c.stream("a", f"/v2/app/blobs/{layer}")
    c.stream("b", f"/v2/app/blobs/{layer}")
    (download,) = c["b"].fetcher.downloads
    assert download.from_peer
    key = c.run(c.coordinators["a"].peer_key())
    code, body = c.peer_get("b", layer, nodes.token(key, parse_digest(layer)))
    assert (code, error_code(body)) == (404, "BLOB_UNKNOWN")


def test_a_follower_cut_off_from_a_live_holder_goes_on_from_it_with_a_range(
    tmp_path: Path,
) -> None:
    """The connection to the holder breaks, the holder lives on: the
    follower asks the holder again from the bytes it has (no wait, no
    upstream request of its own)."""
    c = Cluster(tmp_path)
    layer = image(c.origin)["layer"]
    c.origin.hold[layer] = 4096
    c.stream("a", f"/v2/app/blobs/{layer}")
    sink = c.stream("b", f"/v2/app/blobs/{layer}")
    (download,) = c["b"].fetcher.downloads
    c.network.cut("node-a")
    c.settle()
    assert download.resumed == 1 and download.from_peer
    ranged = [r for r in c.network.gateways["node-a"].requests if r.getHeader("range")]
    assert [r.getHeader("range") for r in ranged] == ["bytes=4095-"]
    c.origin.release()
    c.settle()
    assert sink.outcome == [None] and sink.data == LAYER
    assert c.blob_gets() == 1 and c.origin.ranges == []
    assert cached(c["b"], layer) == LAYER


def test_a_holder_whose_transfers_bring_nothing_is_left_for_upstream(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """
    A live holder whose transfers to this node already broke
    ``MAX_FRUITLESS`` times without bringing a byte (recorded as such):
    when the transfer breaks again the node does not ask it once more, it
    downloads the rest alone, with one ranged GET upstream, and says so.
    """
    c = Cluster(tmp_path)
    layer = image(c.origin)["layer"]
    c.origin.hold[layer] = 4096
    c.stream("a", f"/v2/app/blobs/{layer}")
    sink = c.stream("b", f"/v2/app/blobs/{layer}")
    (download,) = c["b"].fetcher.downloads
    assert download.from_peer and download.written == 4095
    holder = download.source
    for _ in range(MAX_FRUITLESS):
        download.attempts.began(holder, 4095)
        download.attempts.ended(4095)
    download.attempts.began(holder, 4095)
    c.network.cut("node-a")
    c.settle()
    assert sink.outcome == [None] and sink.data == LAYER
    assert download.source == "origin" and download.lease is None
    assert c.origin.ranges == ["bytes=4095-"]
    assert [
        r for r in c.network.gateways["node-a"].requests if r.getHeader("range")
    ] == []
    text = [formatEvent(e) for e in logged]
    assert len([t for t in text if "too often: downloading alone" in t]) == 1
    assert cached(c["b"], layer) == LAYER


class BreakingS3(FakeS3):
    """A FakeS3 whose next GetObject of a key in :attr:`drop` breaks off
    after that many bytes."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.drop: dict[str, int] = {}

    def _dispatch(
        self,
        request: Request,
        bucket: str,
        key: str | None,
        query: dict[str, str],
        body: bytes,
    ) -> bytes | int:
        answer = super()._dispatch(request, bucket, key, query, body)
        if request.method != b"GET" or key not in self.drop:
            return answer
        assert isinstance(answer, bytes)
        cut = self.drop.pop(key)
        request.setHeader(b"content-length", str(len(answer)).encode())
        request.write(answer[:cut])
        request.loseConnection()
        return NOT_DONE_YET


def test_a_transfer_from_the_bucket_that_breaks_goes_on_from_upstream(
    tmp_path: Path,
) -> None:
    """The bucket's body breaks off: the node takes the lease and asks the
    upstream for the rest only."""
    c = Cluster(tmp_path, "ac", s3=BreakingS3)
    assert isinstance(c.s3, BreakingS3)
    layer = image(c.origin)["layer"]
    c.body(c.request("a", "GET", f"/v2/app/blobs/{layer}"))
    assert c.in_bucket(blob_key(layer)) == LAYER
    c.s3.drop[blob_key(layer)] = 3000
    sink = c.stream("c", f"/v2/app/blobs/{layer}")
    assert sink.outcome == [None] and sink.data == LAYER
    assert c.origin.ranges == ["bytes=3000-"]
    assert c.blob_gets() == 2
    assert cached(c["c"], layer) == LAYER
    assert c.holder(layer) is None


def test_a_blob_no_upstream_has_lets_the_lease_go_at_once(tmp_path: Path) -> None:
    """404 upstream: BLOB_UNKNOWN, and the lease is released, not left to
    run out (the next node asking does not wait for it)."""
    c = Cluster(tmp_path)
    missing = Digest.of(b"nowhere")
    response = c.request("a", "GET", f"/v2/app/blobs/{missing}")
    assert response.code == 404
    assert c.acquires("a") == 1
    assert c.holder(str(missing)) is None
    again = c.request("b", "GET", f"/v2/app/blobs/{missing}")
    assert again.code == 404
    assert c.acquires("b") == 1


def test_with_the_bucket_refusing_one_node_still_downloads_for_all(
    tmp_path: Path,
) -> None:
    """The bucket refuses every request: the lease still makes one
    download for the cluster, and the holder lets go after failing to
    share."""
    c = Cluster(tmp_path)
    c.s3.denied.add(BUCKET)
    layer = image(c.origin)["layer"]
    c.origin.hold[layer] = 4096
    first = c.stream("a", f"/v2/app/blobs/{layer}")
    second = c.stream("b", f"/v2/app/blobs/{layer}")
    c.origin.release()
    c.settle()
    assert first.data == second.data == LAYER
    assert c.blob_gets() == 1
    assert c.holder(layer) is None


def test_a_tag_answered_from_the_cluster_is_kept_for_when_the_origin_is_down(
    tmp_path: Path,
) -> None:
    """
    A node that answered a tag from the cluster's record of the origin's
    answer keeps it as its own cached answer, as the node that asked the
    origin does: once the origin is unreachable, both answer from cache.
    """
    c = Cluster(tmp_path)
    content = image(c.origin)
    assert c.request("a", "GET", "/v2/app/manifests/latest").code == 200
    b = c.request("b", "GET", "/v2/app/manifests/latest")
    assert b.headers.getRawHeaders("Regmirror-Tag-Source") == ["cluster"]
    c.tick(TAG_TTL + 1)
    c.origin.fault = lambda request: (503, b"maintenance")
    for name in "ab":
        response = c.request(name, "GET", "/v2/app/manifests/latest")
        assert (name, response.code) == (name, 200)
        assert response.headers.getRawHeaders("Regmirror-Tag-Source") == ["cache"]
        assert response.headers.getRawHeaders("Docker-Content-Digest") == [
            content["manifest"]
        ]


def test_a_lease_left_under_the_nodes_own_url_is_not_asked_of_itself(
    tmp_path: Path,
) -> None:
    """
    A node that restarted within ``lease_ttl`` finds its previous life's
    lease under its own URL: it does not request the blob from itself (its
    own pending download would hold the request until the peer timeout),
    it waits for the lease to run out like any dead holder's.
    """
    c = Cluster(tmp_path)
    layer = image(c.origin)["layer"]
    c.dead_holder("b", layer)
    sink = c.stream("b", f"/v2/app/blobs/{layer}")
    for _ in range(4):
        c.tick(TTL / 4)
    assert sink.outcome == [None] and sink.data == LAYER
    assert c.network.gateways["node-b"].requests == []


class SlowRegistry(FakeRegistry):
    """A FakeRegistry that holds blob GETs of the digests in :attr:`slow`
    unanswered (not even headers) until :meth:`answer`."""

    def __init__(self) -> None:
        super().__init__()
        self.slow: set[str] = set()
        self.waiting: list[Request] = []

    def render(self, request: Request) -> Any:
        digest = request.path.decode().rsplit("/", 1)[-1]
        if request.method == b"GET" and digest in self.slow:
            self.slow.discard(digest)
            self.requests.append(("GET", request.path.decode()))
            self.waiting.append(request)
            return NOT_DONE_YET
        return super().render(request)

    def answer(self) -> None:
        waiting, self.waiting = self.waiting, []
        for request in waiting:
            self.requests.remove(("GET", request.path.decode()))  # counted once
            body = super().render(request)
            if body != NOT_DONE_YET:
                request.write(body)
                request.finish()


def test_a_peer_giving_up_on_a_holder_still_waiting_for_upstream_breaks_nothing(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """
    The holder's upstream is slow to answer; the other node's request for
    the blob times out (``Peers.timeout``) while the holder's endpoint waits
    for that download to start.  The holder drops the abandoned request
    quietly: no error written to the closed connection, nothing unhandled.
    """
    origin = SlowRegistry()
    c = Cluster(tmp_path, origin=origin)
    layer = image(origin)["layer"]
    origin.slow.add(layer)
    first = c.stream("a", f"/v2/app/blobs/{layer}")
    second = c.stream("b", f"/v2/app/blobs/{layer}")
    assert c.blob_gets() == 1 and not first.finished
    c.tick(c.peers.timeout)  # b gives up on a
    origin.answer()
    c.settle()
    c.tick(TTL / 4)  # b asks again
    assert first.outcome == [None] and first.data == LAYER
    assert second.outcome == [None] and second.data == LAYER
    gc.collect()  # an unhandled failure in a Deferred is logged when collected
    failures = [e for e in logged if "log_failure" in e]
    assert [repr(e["log_failure"].value) for e in failures] == []


def test_a_node_that_wins_the_lease_after_the_holder_shared_takes_the_bucket(
    tmp_path: Path,
) -> None:
    """
    A node could not reach the holder; meanwhile the holder finished, put
    the blob in the bucket and let go.  When the waiting node then wins the
    lease it takes the blob from the bucket: still one upstream download
    for the cluster.
    """
    c = Cluster(tmp_path)
    layer = image(c.origin)["layer"]
    c.origin.hold[layer] = 4096
    first = c.stream("a", f"/v2/app/blobs/{layer}")
    c.network.down.add("node-a")  # for a moment, b cannot reach a
    second = c.stream("b", f"/v2/app/blobs/{layer}")
    assert c.acquires("b") == 1
    c.network.down.clear()
    del c.origin.hold[layer]
    c.origin.release()
    c.settle()
    assert first.outcome == [None] and c.in_bucket(blob_key(layer)) == LAYER
    assert c.holder(layer) is None
    c.tick(TTL / 4)
    assert second.outcome == [None] and second.data == LAYER
    assert c.blob_gets() == 1
