"""Metrics after a scripted sequence of pulls against real upstreams."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    free_port,
    http_request,
    mirror_config,
    mirror_config_upstreams,
)
from .images import Catalog

pytestmark = pytest.mark.e2e


def fetch(port: int, path: str, results: list[int]) -> None:
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    response.read()
    results.append(response.status)


def test_metrics_count_misses_hits_joins_and_failover(
    catalog: Catalog,
    upstream: RegistryProcess,
    start_mirror: Callable[..., MirrorProcess],
    tmp_path: Path,
) -> None:
    """A dead first upstream, then a cold blob pulled by eight clients at
    once, then once more: /metrics shows the failover error, one miss, the
    joined waiters, the hit, the bytes from the upstream and from the cache,
    and the requests by status."""
    dead = f"http://{LOCALHOST}:{free_port()}"
    mirror = start_mirror(
        lambda port: mirror_config_upstreams(
            port,
            {"dead": {"url": dead}, "origin": {"url": upstream.url}},
            origin="origin",
        )
    )
    layer = catalog.big.layers[0]
    path = f"/v2/{catalog.big.repository}/blobs/{layer.digest}"
    results: list[int] = []
    clients = [
        threading.Thread(target=fetch, args=(mirror.port, path, results))
        for _ in range(8)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=60)
    fetch(mirror.port, path, results)
    assert results == [200] * 9

    assert mirror.metric("regmirror_upstream_errors_total", upstream="dead") == 1

    def lookups(result: str) -> float:
        return mirror.metric(
            "regmirror_cache_lookups_total", kind="blob", result=result
        )

    # Eight at once: one miss, the others joined it (a straggler arriving
    # after the download finished would be a hit); the ninth is a hit.
    assert lookups("miss") == 1
    assert lookups("joined") >= 1
    assert lookups("joined") + lookups("hit") == 8
    assert (
        mirror.metric("regmirror_upstream_bytes_total", upstream="origin") == layer.size
    )
    assert mirror.metric("regmirror_served_bytes_total", source="cache") == (
        layer.size * lookups("hit")
    )
    assert mirror.metric("regmirror_served_bytes_total") == 9 * layer.size
    assert (
        mirror.metric(
            "regmirror_requests_total", endpoint="blobs", method="GET", status="200"
        )
        == 9
    )
    assert mirror.metric("regmirror_upstream_down", upstream="dead") == 1
    assert upstream.count_blob_gets(layer.digest) == 1


def test_metrics_listener_serves_metrics_alone(
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """``metrics_listen``'s port answers ``/metrics`` (GET and HEAD) and
    nothing else: the API, the status page and its JSON, the probes, any
    other path get a plain-text 404 there, and stay on the main port."""
    metrics_port = free_port()
    mirror = start_mirror(
        lambda port: mirror_config(port, "http://127.0.0.1:9").replace(
            "[cache]",
            f"metrics_listen = tcp:{metrics_port}:interface={LOCALHOST}\n\n[cache]",
        )
    )
    scrape = http_request(metrics_port, "GET", "/metrics")
    assert scrape.status == 200
    assert scrape.headers.get("Content-Type", "").startswith("text/plain")
    assert b"# TYPE regmirror_requests_total counter" in scrape.body
    assert http_request(metrics_port, "HEAD", "/metrics").status == 200
    for path in (
        "/",
        "/v2/",
        "/v2/library/x/manifests/latest",
        "/_status.json",
        "/_status",
        "/healthz",
        "/metrics/x",
        "/metricsx",
        "/nothing",
    ):
        answer = http_request(metrics_port, "GET", path)
        assert answer.status == 404, path
        assert answer.headers.get("Content-Type", "").startswith("text/plain"), path
        assert b"regmirror_" not in answer.body, path
    assert mirror.request("GET", "/v2/").status == 200
    assert mirror.request("GET", "/metrics").status == 404
