"""Metrics, health and readiness: what an operator sees."""

from __future__ import annotations

from pathlib import Path

import treq
from configs import write_config
from fakeregistry import FakeRegistry
from memory import LAYER, Harness, image, result
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from regmirror.config import UpstreamConfig
from regmirror.ini import load
from regmirror.service import build_mirror
from regmirror.upstream import Upstream


def sample(harness: Harness, name: str, **labels: str) -> float:
    value = harness.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_metrics_after_a_scripted_sequence(tmp_path: Path) -> None:
    """Miss, hit, a coalesced waiter, failover and a stale mirror all show in
    the counters."""
    mirror_up, origin = FakeRegistry(), FakeRegistry()
    harness = Harness(str(tmp_path), {"mirror": mirror_up, "origin": origin})
    content = image(origin, created="2024-01-01T00:00:00Z")
    image(mirror_up, created="2020-01-01T00:00:00Z")
    mirror_up.fault = lambda request: (
        (500, b"x") if b"/blobs/" in request.path else None
    )
    origin.hold[content["layer"]] = 1000
    harness.request("GET", "/v2/app/manifests/latest")
    path = f"http://mirror.test/v2/app/blobs/{content['layer']}"
    first = harness.client.get(path, unbuffered=True)
    second = harness.client.get(path, unbuffered=True)
    harness.settle()
    origin.release()
    harness.settle()
    for d in (first, second):
        d.addCallback(treq.content)
    harness.settle()
    assert result(first) == result(second) == LAYER
    assert (
        harness.body(harness.request("GET", path[len("http://mirror.test") :])) == LAYER
    )

    assert (
        sample(harness, "regmirror_cache_lookups_total", kind="blob", result="miss")
        == 1
    )
    assert (
        sample(harness, "regmirror_cache_lookups_total", kind="blob", result="joined")
        == 1
    )
    assert (
        sample(harness, "regmirror_cache_lookups_total", kind="blob", result="hit") == 1
    )
    assert sample(harness, "regmirror_upstream_bytes_total", upstream="origin") == len(
        LAYER
    )
    assert sample(
        harness, "regmirror_served_bytes_total", source="download"
    ) == 2 * len(LAYER)
    assert sample(harness, "regmirror_served_bytes_total", source="cache") == len(LAYER)
    assert (
        sample(
            harness, "regmirror_upstream_errors_total", upstream="mirror", kind="status"
        )
        == 1
    )
    assert (
        sample(
            harness,
            "regmirror_stale_detections_total",
            namespace="docker.io",
            mirror="mirror",
        )
        == 1
    )
    assert (
        sample(
            harness,
            "regmirror_requests_total",
            namespace="docker.io",
            endpoint="blobs",
            method="GET",
            status="200",
        )
        == 3
    )
    assert (
        sample(harness, "regmirror_tag_check_seconds_count", namespace="docker.io") == 1
    )


def test_probes_and_metrics_endpoint(tmp_path: Path) -> None:
    """/healthz is up; /readyz turns 503 naming the namespace once every
    upstream of it is down; /metrics speaks the Prometheus text format."""
    mirror = build_mirror(load(str(write_config(tmp_path))), MemoryReactorClock())
    mirror.store.open()
    client = StubTreq(mirror.site.resource)

    def get(path: str) -> tuple[int, bytes]:
        d = client.get(f"http://mirror.test{path}")
        client.flush()
        response = result(d)
        body = result(treq.content(response))
        return response.code, body

    assert get("/healthz") == (200, b"ok\n")
    assert get("/readyz") == (200, b"ok\n")
    mirror.upstreams["one"].breaker.failed(transport=True)
    code, body = get("/readyz")
    assert code == 503
    assert b"namespace docker.io: every upstream is down" in body
    code, body = get("/metrics")
    assert code == 200
    assert b"# TYPE regmirror_requests_total counter" in body
    assert b'regmirror_upstream_down{upstream="one"} 1.0' in body
    assert b"regmirror_downloads_in_flight 0.0" in body
    assert b"regmirror_cache_size_bytes 0.0" in body


def test_metrics_on_their_own_listener(tmp_path: Path) -> None:
    """With ``metrics_listen`` the main listener has no /metrics."""
    config = load(str(write_config(tmp_path, "metrics_listen = tcp:0")))
    assert config.server.metrics_listen == ("tcp:0",)
    mirror = build_mirror(config, MemoryReactorClock())
    assert b"metrics" not in mirror.site.resource.children


def test_upstream_marked_down_is_looked_at_once_per_backoff() -> None:
    """
    An upstream marked down is asked ``/v2/`` once per ``breaker_backoff``
    with no client request needed; a 5xx keeps it down, the first real
    answer brings it back.
    """
    clock, fake = Clock(), FakeRegistry()
    agent = RequestTraversalAgent(fake)
    upstream = Upstream(
        UpstreamConfig("one", "http://one.test", breaker_backoff=30.0), agent, clock
    )

    def look() -> None:
        d = Deferred.fromCoroutine(upstream.recover())
        agent.flush()
        result(d)

    look()
    assert fake.requests == []  # closed: nothing to look at
    upstream.breaker.failed(transport=True)
    clock.advance(29)
    look()
    assert fake.requests == []  # not before its back-off
    fake.fault = lambda request: (503, b"down")
    clock.advance(1)
    look()
    assert fake.requests == [("GET", "/v2/")]
    assert upstream.breaker.opened == 1
    clock.advance(29)
    look()
    assert len(fake.requests) == 1  # once per breaker_backoff
    fake.fault = None
    clock.advance(1)
    look()
    assert len(fake.requests) == 2
    assert upstream.breaker.opened == 0
    clock.advance(60)
    look()
    assert len(fake.requests) == 2  # closed again: left alone


def test_readiness_returns_without_client_traffic(tmp_path: Path) -> None:
    """
    A started mirror looks at its down upstreams by itself: with the only
    upstream marked down, it connects to it again after ``breaker_backoff``
    (a node a load balancer took out gets no requests to probe with).
    """
    reactor = MemoryReactorClock()
    mirror = build_mirror(load(str(write_config(tmp_path))), reactor)
    mirror.start()
    mirror.upstreams["one"].breaker.failed(transport=True)
    reactor.advance(29)
    assert reactor.tcpClients == []
    for _ in range(3):
        reactor.advance(1)
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("127.0.0.1", 9)]
    result(Deferred.fromCoroutine(mirror.stop()))


def test_request_metric_labels_are_a_fixed_set(tmp_path: Path) -> None:
    """
    Clients choose methods: 2,000 requests with distinct made-up methods
    count under one ``other`` label, so /metrics does not grow with them
    (issue 16 item 5).
    """
    harness = Harness(str(tmp_path), {"origin": FakeRegistry()})
    for n in range(2000):
        assert harness.request(f"M{n}", "/v2/").code == 405
    samples = [
        sample
        for family in harness.metrics.registry.collect()
        if family.name == "regmirror_requests"
        for sample in family.samples
        if sample.name == "regmirror_requests_total"
    ]
    methods = {sample.labels["method"] for sample in samples}
    assert methods == {"other"}
    assert sum(sample.value for sample in samples) == 2000


def test_a_digest_no_upstream_has_is_no_cache_miss(tmp_path: Path) -> None:
    """
    Five requests for blobs and two for manifests by digest that no
    upstream has (404), and one for a blob whose upstream fails (502):
    no lookup counted, as the access log's ``cache=-`` says; a blob and a
    manifest fetched and come count one miss each, then hits.
    """
    origin = FakeRegistry()
    harness = Harness(str(tmp_path), {"origin": origin})
    for i in range(5):
        assert harness.request("GET", f"/v2/app/blobs/sha256:{i:064x}").code == 404
    for i in range(2):
        unknown = f"/v2/app/manifests/sha256:{i:064x}"
        assert harness.request("GET", unknown).code == 404
    origin.fault = lambda request: (500, b"down")
    assert harness.request("GET", f"/v2/app/blobs/sha256:{9:064x}").code == 502
    origin.fault = None
    for kind in ("blob", "manifest"):
        for result_ in ("miss", "joined", "hit"):
            labels = {"kind": kind, "result": result_}
            assert sample(harness, "regmirror_cache_lookups_total", **labels) == 0

    content = image(origin)
    for _ in range(2):
        harness.body(harness.request("GET", f"/v2/app/blobs/{content['layer']}"))
        manifest = f"/v2/app/manifests/{content['manifest']}"
        harness.body(harness.request("GET", manifest))
    for kind in ("blob", "manifest"):
        for result_, count in (("miss", 1), ("hit", 1)):
            labels = {"kind": kind, "result": result_}
            assert sample(harness, "regmirror_cache_lookups_total", **labels) == count
