"""
What the mirror counts, in Prometheus terms (prometheus-client).

One :class:`Metrics` per running mirror, with a registry of its own, so
that tests can build as many mirrors as they like.  Live values (downloads
in flight, breaker states, pull quotas) are read when scraped, from the
objects that own them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.server import Request

from regmirror._resource import ReadOnlyResource


class Metrics:
    """The counters and histograms every part updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "regmirror_requests",
            "HTTP requests answered",
            ["namespace", "endpoint", "method", "status"],
            registry=registry,
        )
        self.cache = Counter(
            "regmirror_cache_lookups",
            "Look-ups by digest: hit (on disk), miss (fetched), joined (shared a "
            "fetch already under way)",
            ["kind", "result"],
            registry=registry,
        )
        self.served_bytes = Counter(
            "regmirror_served_bytes",
            "Blob bytes sent to clients, from finished cache files or from "
            "downloads under way",
            ["source"],
            registry=registry,
        )
        self.sendfile_bytes = Counter(
            "regmirror_sendfile_bytes",
            "Of the blob bytes sent to clients, those the kernel sent from the "
            "page cache with sendfile(2) (plain-TCP connections)",
            registry=registry,
        )
        self.upstream_bytes = Counter(
            "regmirror_upstream_bytes",
            "Blob bytes received from each upstream",
            ["upstream"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "regmirror_upstream_errors",
            "Upstream failures by kind (connect, timeout, status, invalid, broken)",
            ["upstream", "kind"],
            registry=registry,
        )
        self.stale = Counter(
            "regmirror_stale_detections",
            "Mirror tag answers that differed from the origin's",
            ["namespace", "mirror"],
            registry=registry,
        )
        self.evictions = Counter(
            "regmirror_cache_evictions",
            "Files evicted to keep the cache within its limits",
            registry=registry,
        )
        self.evicted_bytes = Counter(
            "regmirror_cache_evicted_bytes",
            "Bytes evicted to keep the cache within its limits",
            registry=registry,
        )
        self.tag_checks = Histogram(
            "regmirror_tag_check_seconds",
            "Time to learn from upstream what a tag points at",
            ["namespace"],
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    def total(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include *labels*."""
        found = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    found += sample.value
        return found

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add live values, computed by *collect* at each scrape."""
        self.registry.register(_Live(collect))


class _Live:
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()


def gauge(
    name: str,
    documentation: str,
    labels: list[str],
    values: Iterable[tuple[list[str], float]],
) -> GaugeMetricFamily:
    """A gauge family from ``(label values, value)`` pairs."""
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


class MetricsResource(ReadOnlyResource):
    """``/metrics`` in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("Content-Type", CONTENT_TYPE_LATEST)
        body: bytes = generate_latest(self._metrics.registry)
        return body

    def render_HEAD(self, request: Request) -> bytes:
        request.setHeader("Content-Type", CONTENT_TYPE_LATEST)
        return b""


__all__ = ["Metrics", "MetricsResource", "gauge"]
