"""
What the mirror counts, in Prometheus terms (prometheus-client).

One :class:`Metrics` per running mirror, with a registry of its own, so
that tests can build as many mirrors as they like.  Live values (downloads
in flight, breaker states, pull quotas) are read when scraped, from the
objects that own them.

With worker processes (``[server] workers``) every process keeps its own
:class:`Metrics`; a scrape gathers the families of every process
(:mod:`regmirror.workers`) and adds them up with :func:`combine`, so that
``/metrics`` shows the machine's totals whichever process answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, succeed
from twisted.web.resource import Resource
from twisted.web.server import Request

from regmirror.http.resource import ReadOnlyResource, answer_later

#: The metric families of one process or of several, when asked for.
View = Callable[[], Deferred[list[Metric]]]

#: A metric family as JSON: ``[name, type, documentation, unit, samples]``,
#: each sample ``[name, labels, value]``.
Exported = list[Any]


def _first(values: Sequence[float]) -> float:
    return values[0]


#: How one gauge's values in several processes make the machine's value
#: (the parent's first); a gauge not named here is added up, as counters
#: and histograms are.
GAUGE_RULES: dict[str, Callable[[Sequence[float]], float]] = {
    # The cache folder's, which every process reads.
    "regmirror_cache_size_bytes": _first,
    "regmirror_cache_max_size_bytes": _first,
    "regmirror_cache_disk_free_bytes": _first,
    "regmirror_cache_disk_size_bytes": _first,
    # Not ready when any process is not; the configuration's, in each.
    "regmirror_ready": min,
    "regmirror_namespace_origin": max,
    "regmirror_upstream_ratelimit_limit": max,
    "regmirror_upstream_rate_limited": max,
    # The breakers are the machine's (every process reads one record per
    # upstream); each process has its own quotas and Redis connection.
    "regmirror_upstream_down": max,
    "regmirror_upstream_ratelimit_remaining": min,
    "regmirror_cluster_coordinator_up": min,
}


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
            "Blob bytes sent to clients, from finished cache files, from "
            "downloads under way, or relayed from upstream uncached",
            ["source"],
            registry=registry,
        )
        self.sendfile_bytes = Counter(
            "regmirror_sendfile_bytes",
            "Of the blob bytes sent to clients, those the kernel sent from the "
            "page cache with sendfile(2) (plain-TCP connections)",
            registry=registry,
        )
        self.cache_write_failures = Counter(
            "regmirror_cache_write_failures",
            "Writes to the cache folder refused (a full disk, a read-only or "
            "failing file system): each starts a while of serving without "
            "caching",
            registry=registry,
        )
        self.upstream_bytes = Counter(
            "regmirror_upstream_bytes",
            "Blob bytes received from each upstream (or the bucket, another "
            "node), those relayed uncached too",
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
        self.prefetch = Counter(
            "regmirror_prefetch",
            "Blobs of a served image manifest fetched ahead of the client, by "
            "result: fetched (now cached), failed, full (the cache's size "
            "limit would be passed, or it cannot be written), down (every "
            "upstream of the namespace marked down), busy (too many waiting), "
            "cancelled (to make room for another download)",
            ["namespace", "result"],
            registry=registry,
        )
        self.keep_warm = Counter(
            "regmirror_keep_warm_refreshes",
            "Refreshes of keep_warm images, by outcome: fetched (a manifest or "
            "blob came from upstream), unchanged (everything was here), failed, "
            "too_big (the images kept warm would not fit in the cache's max_size)",
            ["namespace", "outcome"],
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
        return total(self.families(), name, **labels)

    def families(self) -> list[Metric]:
        """Every family of this process, live values read now."""
        return list(self.registry.collect())

    def view(self) -> Deferred[list[Metric]]:
        """:meth:`families`, as a :data:`View` of this process alone."""
        return succeed(self.families())

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add live values, computed by *collect* at each scrape."""
        self.registry.register(_Live(collect))


class _Live(Collector):
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


def total(families: Iterable[Metric], name: str, **labels: str) -> float:
    """The sum of the samples of *name* whose labels include *labels*."""
    found = 0.0
    for family in families:
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                found += sample.value
    return found


def export(families: Iterable[Metric]) -> list[Exported]:
    """*families* as JSON, for another process to :func:`revive`."""
    return [
        [
            family.name,
            family.type,
            family.documentation,
            family.unit,
            [[s.name, s.labels, s.value] for s in family.samples],
        ]
        for family in families
    ]


def revive(exported: list[Exported]) -> list[Metric]:
    """The families that :func:`export` wrote."""
    families = []
    for name, type_, documentation, unit, samples in exported:
        family = Metric(name, documentation, type_, unit)
        for sample_name, labels, value in samples:
            family.add_sample(sample_name, labels, float(value))
        families.append(family)
    return families


def combine(processes: Iterable[Iterable[Metric]]) -> list[Metric]:
    """
    The families of several processes as one machine's: each sample's
    values added up, but the earliest ``_created`` time, and gauges by
    :data:`GAUGE_RULES`.  Samples keep the order they first came in.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    labels_of: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, str]] = {}
    for process in processes:
        for family in process:
            if family.name not in families:
                families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                labels_of[key] = sample.labels
                values[family.name].setdefault(key, []).append(sample.value)
    for name, family in families.items():
        for key, found in values[name].items():
            sample_name = key[0]
            if sample_name.endswith("_created"):
                rule: Callable[[Sequence[float]], float] = min
            elif family.type == "gauge":
                rule = GAUGE_RULES.get(name, sum)
            else:
                rule = sum
            family.add_sample(sample_name, labels_of[key], rule(found))
    return list(families.values())


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


class MetricsResource(ReadOnlyResource):
    """
    ``/metrics`` in the Prometheus text format, of the families *view*
    gives: this process's (:meth:`Metrics.view`) or every process's.
    """

    isLeaf = True

    def __init__(self, view: View) -> None:
        super().__init__()
        self._view = view

    def render_GET(self, request: Request) -> int:
        async def body() -> bytes:
            text: bytes = generate_latest(_Fixed(await self._view()))
            request.setHeader("Content-Type", CONTENT_TYPE_LATEST)
            return text

        return answer_later(request, body, "the metrics")

    def render_HEAD(self, request: Request) -> bytes:
        request.setHeader("Content-Type", CONTENT_TYPE_LATEST)
        return b""


class _NotFound(Resource):
    """A plain-text 404, whatever the method."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found: this port serves /metrics only\n"


class MetricsOnly(Resource):
    """
    The root of ``[server] metrics_listen``'s listeners: ``/metrics`` (as
    :class:`MetricsResource`), and a plain-text 404 for every other path,
    the registry API and the status page included.
    """

    def __init__(self, view: View) -> None:
        super().__init__()
        self._metrics = MetricsResource(view)
        self._not_found = _NotFound()

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        # What is left of the path once this segment is taken.
        if path == b"metrics" and not request.postpath:
            return self._metrics
        return self._not_found

    def render(self, request: Request) -> bytes:
        return self._not_found.render(request)


__all__ = [
    "Metrics",
    "MetricsOnly",
    "MetricsResource",
    "View",
    "combine",
    "export",
    "gauge",
    "revive",
    "total",
]
