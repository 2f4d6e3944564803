"""
Several nodes, one cache: three ``twistd regmirror`` processes sharing a
real ``redis-server`` (and, where the bucket matters, a real Ceph RGW)
in front of a real ``docker-registry`` whose access log counts the GETs.

The big layer goes through a throttling relay so that the download is
still running while the test looks (and kills).
"""

from __future__ import annotations

import hashlib
import http.client
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .engines import CephRGW, RedisServer
from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    free_port,
    http_request,
    json_lines,
    mirror_config_upstreams,
    poll_until,
)
from .images import Blob, Catalog, assert_layout_matches
from .servers import ThrottleRelay

pytestmark = pytest.mark.e2e

NODES = 3
CLIENTS = 30
#: the throttled upstream: the 40 MiB layer takes about 2.5 s
RATE = 16 << 20
CLIENT_TIMEOUT = 60.0
READ_CHUNK = 256 * 1024
LEASE_TTL = "2s"
#: the most a client reads
MAX_BODY = 64 << 20


@dataclass
class Pulled:
    """What one client got, and what the upstream transfer was doing when
    its first byte arrived."""

    node: int
    status: int = 0
    size: int = 0
    digest: str = ""
    error: str | None = None
    #: whether the upstream was still sending when the first byte came
    upstream_busy_at_first_byte: bool | None = None


def pull(
    node: int,
    port: int,
    path: str,
    upstream_busy: Callable[[], bool],
    first_byte: threading.Event | None = None,
) -> Pulled:
    """GET *path* from a node, hashing the body; bounded."""
    result = Pulled(node)
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=CLIENT_TIMEOUT)
    hasher = hashlib.sha256()
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        result.status = response.status
        if response.length is None:
            result.error = "no Content-Length"
        for _ in range(MAX_BODY // READ_CHUNK + 2):
            data = response.read(READ_CHUNK)
            if not data:
                break
            if result.upstream_busy_at_first_byte is None:
                result.upstream_busy_at_first_byte = upstream_busy()
                if first_byte is not None:
                    first_byte.set()
            hasher.update(data)
            result.size += len(data)
    except (OSError, http.client.HTTPException) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        connection.close()
    result.digest = "sha256:" + hasher.hexdigest()
    return result


def relay_finished(relay: ThrottleRelay, size: int) -> bool:
    """Has the relay delivered a whole body of *size* bytes and closed?"""
    for record in json_lines(relay.log_path):
        if record.get("event") == "closed" and record.get("bytes", 0) >= size:
            return True
    return False


def assert_whole(results: list[Pulled], blob: Blob) -> None:
    """Every client got all of *blob*, verified, without an error."""
    for got in results:
        assert (got.status, got.size, got.digest, got.error) == (
            200,
            blob.size,
            blob.digest,
            None,
        ), got


def wait_in_bucket(rgw: CephRGW, bucket: str, blob: Blob) -> None:
    """Wait (bounded) until the node that downloaded *blob* has shared it."""
    key = f"/{bucket}/blobs/sha256/{blob.digest.split(':')[1]}"
    poll_until(
        lambda: rgw.request("HEAD", key).status == 200,
        timeout=10,
        describe=lambda: f"{key} never reached the bucket",
    )


def download_lines(node: MirrorProcess, digest: str) -> list[str]:
    return [line for line in node.log().splitlines() if f"downloading {digest}" in line]


def holder_of(nodes: list[MirrorProcess], digest: str) -> list[int]:
    """The nodes that downloaded *digest* from the upstream itself."""
    return [
        index
        for index, node in enumerate(nodes)
        if any("from origin" in line for line in download_lines(node, digest))
    ]


def cluster_config(
    upstream_url: str, redis: RedisServer, rgw: CephRGW | None = None, bucket: str = ""
) -> Callable[[int], str]:
    """A node's INI text: the shared Redis (and bucket), advertising its port."""

    def config(port: int) -> str:
        text = mirror_config_upstreams(
            port,
            {"origin": {"url": upstream_url, "breaker_backoff": "1s"}},
            origin="origin",
            tag_ttl="30s",
        )
        if rgw is not None:
            text = text.replace(
                "[cache]\n",
                "[cache]\nbackend = s3\n"
                f"s3_endpoint = {rgw.endpoint}\ns3_bucket = {bucket}\n"
                f"s3_region = {rgw.region}\n"
                f"s3_access_key = {rgw.access_key}\n"
                f"s3_secret_key = {rgw.secret_key}\n",
            )
        return text + (
            f"\n[cluster]\nredis = {redis.url}\n"
            f"advertise = http://{LOCALHOST}:{port}\nlease_ttl = {LEASE_TTL}\n"
        )

    return config


@pytest.fixture
def relay(
    tmp_path: Path,
    upstream: RegistryProcess,
    start_program: Callable[[ThrottleRelay], ThrottleRelay],
) -> ThrottleRelay:
    """The origin slowed to RATE, so that a download is seen under way."""
    return start_program(ThrottleRelay(tmp_path / "relay", upstream.port, RATE))


def start_nodes(
    start_mirror: Callable[..., MirrorProcess], config: Callable[[int], str]
) -> list[MirrorProcess]:
    return [start_mirror(config) for _ in range(NODES)]


def blob_path(catalog: Catalog, blob: Blob) -> str:
    return f"/v2/{catalog.big.repository}/blobs/{blob.digest}"


def test_one_upstream_download_for_the_cluster(
    catalog: Catalog,
    upstream: RegistryProcess,
    redis: RedisServer,
    ceph_rgw: CephRGW,
    s3_bucket: str,
    start_mirror: Callable[..., MirrorProcess],
    relay: ThrottleRelay,
) -> None:
    """
    30 clients spread over three nodes (sharing Redis and an RGW bucket)
    pull one cold image at once, manifest, config and its 40 MiB layer:
    the upstream sees one GET per blob, every client gets the right bytes,
    and the clients of the two nodes that did not download the layer
    themselves had their first bytes while the upstream was still sending.
    """
    image = catalog.big
    layer = image.layers[0]
    nodes = start_nodes(
        start_mirror, cluster_config(relay.url, redis, ceph_rgw, s3_bucket)
    )
    path = blob_path(catalog, layer)
    barrier = threading.Barrier(CLIENTS, timeout=CLIENT_TIMEOUT)
    results: list[Pulled] = []
    small: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        node = index % NODES
        port = nodes[node].port
        barrier.wait()
        manifest = http_request(
            port,
            "GET",
            f"/v2/{image.repository}/manifests/{image.tag}",
            {"Accept": image.root.media_type},
            timeout=CLIENT_TIMEOUT,
        )
        got_small = [manifest.body == image.root.data]
        for blob in image.blobs:
            if blob.digest != layer.digest:
                response = http_request(
                    port, "GET", blob_path(catalog, blob), timeout=CLIENT_TIMEOUT
                )
                got_small.append(response.body == blob.data)
        got = pull(node, port, path, lambda: not relay_finished(relay, layer.size))
        with lock:
            results.append(got)
            small.append((f"client {index} on node {node}", all(got_small)))

    threads = [
        threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=CLIENT_TIMEOUT)
    assert len(results) == CLIENTS, "some clients never finished"
    assert_whole(results, layer)
    assert all(ok for _, ok in small), small
    for blob in image.blobs:
        assert upstream.count_blob_gets(blob.digest) == 1, blob
    holders = holder_of(nodes, layer.digest)
    assert len(holders) == 1, [node.log() for node in nodes]
    followers = [i for i in range(NODES) if i not in holders]
    for index in followers:
        lines = download_lines(nodes[index], layer.digest)
        assert lines and all("from node http://" in line for line in lines), lines
    early = [g for g in results if g.node in followers]
    assert early and all(g.upstream_busy_at_first_byte for g in early), early


def test_holder_killed_mid_download(
    catalog: Catalog,
    upstream: RegistryProcess,
    redis: RedisServer,
    start_mirror: Callable[..., MirrorProcess],
    relay: ThrottleRelay,
    tmp_path: Path,
) -> None:
    """
    The node downloading a layer for the cluster is SIGKILLed mid-transfer:
    the clients streaming it through the two other nodes still get every
    byte right, one of those nodes takes the lease over and goes on from
    upstream with a Range request: at most one extra GET upstream.
    """
    layer = catalog.big.layers[0]
    config = cluster_config(relay.url, redis)
    port = free_port()
    doomed = MirrorProcess(tmp_path / "doomed", config(port), port)
    doomed.start()
    try:
        others = [start_mirror(config) for _ in range(NODES - 1)]
        path = blob_path(catalog, layer)
        busy = lambda: not relay_finished(relay, layer.size)  # noqa: E731
        started = threading.Event()
        first = threading.Thread(
            target=pull, args=(0, doomed.port, path, busy, started), daemon=True
        )
        first.start()
        assert started.wait(CLIENT_TIMEOUT), "the first node never started"
        results: list[Pulled] = []
        streaming: list[threading.Event] = []
        threads = []
        for index in range(10):
            node = 1 + index % 2
            event = threading.Event()
            streaming.append(event)

            def client(node: int = node, event: threading.Event = event) -> None:
                results.append(pull(node, others[node - 1].port, path, busy, event))

            threads.append(threading.Thread(target=client, daemon=True))
        for thread in threads:
            thread.start()
        for event in streaming:
            assert event.wait(CLIENT_TIMEOUT), "a client never got a byte"
        assert busy(), "the download ended before the kill: nothing tested"
        assert doomed._process is not None  # noqa: SLF001
        doomed._process.send_signal(signal.SIGKILL)  # noqa: SLF001
        for thread in threads:
            thread.join(timeout=CLIENT_TIMEOUT)
        first.join(timeout=CLIENT_TIMEOUT)
    finally:
        doomed.stop()
    assert len(results) == 10, "some clients never finished"
    assert_whole(results, layer)
    assert holder_of([doomed], layer.digest) == [0]
    assert 1 <= upstream.count_blob_gets(layer.digest) <= 2
    resumed = [
        line
        for node in others
        for line in node.log().splitlines()
        if f"resuming {layer.digest}" in line and "from origin" in line
    ]
    assert len(resumed) == 1, [node.log() for node in others]


def readyz(node: MirrorProcess) -> str:
    response = node.request("GET", "/readyz")
    assert response.status == 200, response
    return response.body.decode()


def test_redis_down_nodes_work_alone(
    catalog: Catalog,
    upstream: RegistryProcess,
    redis: RedisServer,
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    With Redis stopped the nodes go on serving, cached and uncached, each
    alone, and say so (/readyz, the gauge); once it is back they join again.
    """
    nodes = start_nodes(start_mirror, cluster_config(upstream.url, redis))
    small = catalog.small
    layers = small.layers
    before = layers[0]
    path = f"/v2/{small.repository}/blobs/{before.digest}"
    for node in nodes:
        assert readyz(node) == "ok\n"
    assert node.request("GET", path).status == 200
    redis.stop()
    for node in nodes:
        poll_until(
            lambda node=node: "degraded" in readyz(node),  # type: ignore[misc]
            timeout=10,
            describe=lambda: "no node noticed Redis was gone",
        )
        assert node.metric("regmirror_cluster_coordinator_up") == 0
    for index, node in enumerate(nodes):
        for layer in layers:
            blob = f"/v2/{small.repository}/blobs/{layer.digest}"
            response = node.request("GET", blob)
            assert response.status == 200, (index, response)
            assert "sha256:" + hashlib.sha256(response.body).hexdigest() == layer.digest
        manifest = node.request(
            "GET",
            f"/v2/{small.repository}/manifests/{small.tag}",
            {"Accept": small.root.media_type},
        )
        assert manifest.status == 200, manifest
    redis.start()
    for node in nodes:
        poll_until(
            lambda node=node: readyz(node) == "ok\n",  # type: ignore[misc]
            timeout=15,
            describe=lambda: "a node never saw Redis again",
        )
        assert node.metric("regmirror_cluster_coordinator_up") == 1


def test_the_bucket_serves_every_node_afterwards(
    catalog: Catalog,
    upstream: RegistryProcess,
    redis: RedisServer,
    ceph_rgw: CephRGW,
    s3_bucket: str,
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    With ``backend = s3``: once one node has pulled an image, the other
    nodes take its blobs and manifests from the bucket (Ceph RGW), not from
    the upstream, and a Range request is answered from there too.
    """
    config = cluster_config(upstream.url, redis, ceph_rgw, s3_bucket)
    first, second, third = start_nodes(start_mirror, config)
    image = catalog.small
    manifest_path = f"/v2/{image.repository}/manifests/{image.root.digest}"
    accept = {"Accept": image.root.media_type}
    assert first.request("GET", manifest_path, accept).status == 200
    for layer in image.layers:
        response = first.request("GET", f"/v2/{image.repository}/blobs/{layer.digest}")
        assert response.status == 200
    # The holder puts each blob in the bucket after verifying it.
    for layer in image.layers:
        wait_in_bucket(ceph_rgw, s3_bucket, layer)
    manifest = second.request("GET", manifest_path, accept)
    assert manifest.status == 200 and manifest.body == image.root.data
    for layer in image.layers:
        path = f"/v2/{image.repository}/blobs/{layer.digest}"
        whole = second.request("GET", path)
        assert whole.status == 200 and whole.body == layer.data
        ranged = third.request("GET", path, {"Range": "bytes=5-"})
        assert ranged.status == 206 and ranged.body == layer.data[5:]
        assert upstream.count_blob_gets(layer.digest) == 1
        for node in (second, third):
            lines = download_lines(node, layer.digest)
            assert lines and all("from shared store" in line for line in lines), lines
    manifests = rf"/v2/\S+/manifests/{image.root.digest}"
    assert upstream.count_requests("GET", manifests) == 1


def test_bucket_unreachable_nodes_serve_from_upstream(
    catalog: Catalog,
    upstream: RegistryProcess,
    redis: RedisServer,
    ceph_rgw: CephRGW,
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    A bucket that cannot be reached (nothing listens at its endpoint) costs
    the cache nothing but the sharing: pulls are served from upstream, and
    the node says why in its log.
    """

    class Nowhere:
        endpoint = f"http://{LOCALHOST}:{free_port()}"
        region, access_key, secret_key = (
            ceph_rgw.region,
            ceph_rgw.access_key,
            ceph_rgw.secret_key,
        )

    config = cluster_config(upstream.url, redis, Nowhere, "regmirror")  # type: ignore[arg-type]
    node, other = start_nodes(start_mirror, config)[:2]
    image = catalog.small
    for target in (node, other):
        for layer in image.layers:
            response = target.request(
                "GET", f"/v2/{image.repository}/blobs/{layer.digest}"
            )
            assert response.status == 200 and response.body == layer.data
    node.wait_for_log(r"shared store http://\S+ bucket regmirror unusable")


def test_nodes_with_worker_processes(
    catalog: Catalog,
    upstream: RegistryProcess,
    redis: RedisServer,
    start_mirror: Callable[..., MirrorProcess],
    relay: ThrottleRelay,
) -> None:
    """
    Nodes of two worker processes each: another node's request for a blob
    may reach a worker that is not the one downloading it, which serves it
    by following its sibling's spool.  Still one upstream GET, right bytes.
    """
    layer = catalog.big.layers[0]
    base = cluster_config(relay.url, redis)

    def config(port: int) -> str:
        return base(port).replace("[server]\n", "[server]\nworkers = 2\n", 1)

    nodes = start_nodes(start_mirror, config)
    path = blob_path(catalog, layer)
    busy = lambda: not relay_finished(relay, layer.size)  # noqa: E731
    started = threading.Event()
    results: list[Pulled] = []
    first = threading.Thread(
        target=lambda: results.append(pull(0, nodes[0].port, path, busy, started)),
        daemon=True,
    )
    first.start()
    assert started.wait(CLIENT_TIMEOUT), "the first node never started"
    threads = [
        threading.Thread(
            target=lambda node=node: results.append(
                pull(node, nodes[node].port, path, busy)
            ),
            daemon=True,
        )
        for node in (1, 2) * 6
    ]
    for thread in (*threads,):
        thread.start()
    for thread in (first, *threads):
        thread.join(timeout=CLIENT_TIMEOUT)
    assert len(results) == 13, "some clients never finished"
    assert_whole(results, layer)
    assert upstream.count_blob_gets(layer.digest) == 1


def test_redirect_to_the_bucket(
    catalog: Catalog,
    upstream: RegistryProcess,
    redis: RedisServer,
    ceph_rgw: CephRGW,
    s3_bucket: str,
    start_mirror: Callable[..., MirrorProcess],
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    """
    ``redirect = true``: a node without the blob in its own cache sends the
    client to a presigned URL of the bucket (no secret in it), which RGW
    honours, Range included; skopeo pulls the whole image that way.
    """
    base = cluster_config(upstream.url, redis, ceph_rgw, s3_bucket)

    def config(port: int) -> str:
        return base(port).replace("[cache]\n", "[cache]\nredirect = true\n", 1)

    first, second = start_nodes(start_mirror, config)[:2]
    image = catalog.small
    for layer in image.layers:
        path = f"/v2/{image.repository}/blobs/{layer.digest}"
        assert first.request("GET", path).status == 200
        wait_in_bucket(ceph_rgw, s3_bucket, layer)
        answer = second.request("GET", path)
        assert answer.status == 307, answer
        location = answer.headers["Location"]
        assert location.startswith(ceph_rgw.endpoint + "/")
        assert "X-Amz-Signature=" in location
        assert ceph_rgw.secret_key not in location
        target = urlsplit(location)
        got = http_request(target.port or 80, "GET", f"{target.path}?{target.query}")
        assert got.status == 200 and got.body == layer.data
        ranged = http_request(
            target.port or 80,
            "GET",
            f"{target.path}?{target.query}",
            {"Range": "bytes=3-"},
        )
        assert ranged.status == 206 and ranged.body == layer.data[3:]
    skopeo.pull(second.host, image.reference, tmp_path / "out", "latest")
    assert_layout_matches(tmp_path / "out", image, "latest")
    for layer in image.layers:
        assert upstream.count_blob_gets(layer.digest) == 1
