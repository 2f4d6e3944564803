"""
:class:`Mirror`: every part of a running mirror, as
:func:`regmirror.service.build_mirror` wired them; it starts and stops
them, and is what the status page, ``/metrics``, the health probes and
housekeeping ask.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from typing import Any

from attrs import define, field
from prometheus_client.core import Metric
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from regmirror.cluster import Coordinator
from regmirror.config import Config
from regmirror.download import Download
from regmirror.fetch import Fetcher
from regmirror.http.site import MirrorSite
from regmirror.metrics import Metrics, View, gauge, total
from regmirror.pool import UpstreamPool
from regmirror.reference import is_immutable
from regmirror.status import EVERYTHING, History, Shown
from regmirror.store import Store
from regmirror.upstream import Upstream
from regmirror.warm import RECORD as WARM_RECORD
from regmirror.warm import read_record

log = Logger()

#: How often upstreams marked down are looked at (each at most once per
#: its ``breaker_backoff``).
RECOVERY_INTERVAL = 1.0


def _recovery_failed(failure: Failure, upstream: str) -> None:
    log.failure("cannot probe upstream {upstream}", failure, upstream=upstream)


@define(eq=False)
class Mirror:
    """Every part of a running mirror, wired together from the config."""

    config: Config
    store: Store
    upstreams: dict[str, Upstream]
    pools: list[UpstreamPool]
    fetcher: Fetcher
    metrics: Metrics
    site: MirrorSite
    #: every process's metric families, with worker processes
    #: (:meth:`Workers.gather`, :meth:`Parent.gather`); ``None``: this
    #: process serves alone
    gather: View | None = None
    history: History = field(init=False)
    _recovery: LoopingCall = field(init=False)

    @property
    def coordinator(self) -> Coordinator | None:
        """The other nodes, through Redis (``[cluster]``)."""
        return self.fetcher.coordinator

    def start(self, clean: bool = True) -> None:
        """
        Open the cache (see :meth:`Store.open`); join the cluster; look
        after upstreams marked down (:meth:`Upstream.recover`).  With
        *clean* (the ``twistd`` process, before its workers start), the
        upstreams' health records are reset too: what an earlier run learnt
        may not hold for this one's configuration.
        """
        self.store.open(clean)
        if clean:
            for upstream in self.upstreams.values():
                upstream.breaker.reset()
        self._recovery.clock = self.fetcher.clock
        self._recovery.start(RECOVERY_INTERVAL, now=False).addErrback(
            lambda failure: log.failure("upstream recovery stopped", failure)
        )
        if self.coordinator is not None:
            self.coordinator.start()
        bucket = self.fetcher.bucket
        if bucket is not None:
            shared = bucket.objects
            # Said at once, not at the first pull: a wrong key or bucket.
            location = shared.objects.location
            where = f"{location.endpoint} bucket {location.bucket}"
            Deferred.fromCoroutine(shared.objects.check()).addCallbacks(
                lambda _: log.info("shared store {where} ready", where=where),
                lambda failure: log.warn(
                    "shared store {where} unusable, serving without it for now: {why}",
                    where=where,
                    why=failure.getErrorMessage(),
                ),
            )

    async def stop(self) -> None:
        """Leave the cluster (its leases go at once, not at expiry)."""
        if self._recovery.running:
            self._recovery.stop()
        for upstream in self.upstreams.values():
            upstream.breaker.close()
        if self.coordinator is not None:
            await self.coordinator.stop()

    def __attrs_post_init__(self) -> None:
        self.history = History(self.totals, self.fetcher.clock.seconds)
        self._recovery = LoopingCall(self._recover)
        # Each mirror's stale count is there from the start, at 0, so
        # that Prometheus sees its first detection as an increase (a
        # series first scraped at 1 shows none).
        for pool in self.pools:
            for upstream in pool.upstreams:
                if upstream is not pool.origin:
                    self.metrics.stale.labels(pool.namespace, upstream.name)

    def _recover(self) -> None:
        for upstream in self.upstreams.values():
            Deferred.fromCoroutine(upstream.recover()).addErrback(
                _recovery_failed, upstream.name
            )

    def families(self) -> Deferred[list[Metric]]:
        """The metric families of the machine: of every process serving."""
        if self.gather is None:
            return self.metrics.view()
        return self.gather()

    async def totals(self) -> dict[str, float]:
        """Cumulative counts for the status page, of every process."""
        families = await self.families()
        return {
            "hits": total(families, "regmirror_cache_lookups_total", result="hit"),
            "misses": total(families, "regmirror_cache_lookups_total", result="miss"),
            "joined": total(families, "regmirror_cache_lookups_total", result="joined"),
            "cache_bytes": total(
                families, "regmirror_served_bytes_total", source="cache"
            ),
            "upstream_bytes": total(families, "regmirror_upstream_bytes_total"),
        }

    async def status(self, shown: Shown = EVERYTHING) -> dict[str, Any]:
        """
        Everything the status page shows: the totals and their history,
        the upstreams' health, the stale mirrors and the images kept warm
        (as the ``twistd`` process last wrote them) are the machine's, the
        downloads what the answering process (``pid``) sees.  Stale tags
        and downloads only of the repositories *shown* lets the client see
        (``downloads_hidden``: how many others there are).
        """
        totals = await self.totals()
        now = self.fetcher.clock.seconds()
        downloads = self.fetcher.downloads

        def upstream(u: Upstream) -> dict[str, Any]:
            health = u.breaker.health()
            return {
                "name": u.name,
                "down": health.opened > 0,
                "retry_in": max(0.0, health.open_until - now),
                "rate_limited": u.backing_off(),
                "quota": (
                    {"limit": u.rate_limit[0], "remaining": u.rate_limit[1]}
                    if u.rate_limit
                    else None
                ),
            }

        return {
            "namespaces": [
                {
                    "name": pool.namespace,
                    "origin": pool.origin.name,
                    "upstreams": [upstream(u) for u in pool.upstreams],
                    "stale": [
                        {
                            "mirror": mirror,
                            "repository": repository,
                            "tag": stale.tag,
                            "theirs": str(stale.theirs),
                            "origin": str(stale.origin),
                        }
                        for (mirror, repository), stale in pool.stale.items()
                        if shown(pool.namespace, repository)
                    ],
                }
                for pool in self.pools
            ],
            "keep_warm": [
                image
                for image in read_record(os.path.join(self.store.root, WARM_RECORD))
                if shown(image.get("namespace"), image.get("repository"))
            ],
            "cache": {"size": self.store.size, "max_size": self.store.max_size},
            "downloads": [
                {
                    "digest": str(d.digest),
                    "upstream": d.source,
                    "written": d.written,
                    "size": d.size,
                }
                for d in downloads
                if shown(*_whose(d))
            ],
            "downloads_hidden": sum(not shown(*_whose(d)) for d in downloads),
            "cluster": self._cluster_status(),
            "totals": totals,
            "history": list(self.history.samples),
            "pid": os.getpid(),
        }

    def _cluster_status(self) -> dict[str, Any] | None:
        if self.coordinator is None or self.config.cluster is None:
            return None
        return {
            "redis": self.coordinator.where,
            "available": self.coordinator.available,
            "advertise": self.config.cluster.advertise,
        }

    def live_metrics(self) -> Iterator[Metric]:
        """Values read at each scrape from the objects that own them."""
        upstreams = self.upstreams.values()
        yield gauge(
            "regmirror_downloads_in_flight",
            "Blob downloads under way",
            [],
            # Another worker's download, followed here, is counted there.
            [([], sum(not d.follower for d in self.fetcher.downloads))],
        )
        yield gauge(
            "regmirror_cache_size_bytes",
            "Bytes of content in the cache",
            [],
            [([], self.store.size)],
        )
        yield gauge(
            "regmirror_cache_max_size_bytes",
            "The cache's size limit (0: none)",
            [],
            [([], self.store.max_size or 0)],
        )
        yield gauge(
            "regmirror_upstream_down",
            "1 while an upstream's circuit breaker is open",
            ["upstream"],
            [([u.name], float(u.breaker.opened > 0)) for u in upstreams],
        )
        if self.coordinator is not None:
            yield gauge(
                "regmirror_cluster_coordinator_up",
                "1 while the cluster's Redis answers (0: this node works alone)",
                [],
                [([], float(self.coordinator.available))],
            )
        yield gauge(
            "regmirror_upstream_ratelimit_remaining",
            "Pulls left in the upstream's quota (RateLimit-Remaining)",
            ["upstream"],
            [([u.name], u.rate_limit[1]) for u in upstreams if u.rate_limit],
        )
        yield from self._alert_metrics()

    def _alert_metrics(self) -> Iterator[Metric]:
        """What the alert rules (etc/deploy/prometheus-rules.yml) need
        beside the rest: readiness, the cache disk's space, each
        namespace's origin, the pull quota's size and 429 back-offs."""
        upstreams = self.upstreams.values()
        yield gauge(
            "regmirror_ready",
            "1 while /readyz answers 200 (0: not ready, /readyz says why)",
            [],
            [([], float(not self.problems()))],
        )
        try:
            disk = os.statvfs(self.store.root)
        except OSError:
            pass  # not ready, which says why; a scrape still answers
        else:
            yield gauge(
                "regmirror_cache_disk_free_bytes",
                "Bytes free for the mirror on the cache folder's file system",
                [],
                [([], disk.f_bavail * disk.f_frsize)],
            )
            yield gauge(
                "regmirror_cache_disk_size_bytes",
                "Size of the cache folder's file system",
                [],
                [([], disk.f_blocks * disk.f_frsize)],
            )
        yield gauge(
            "regmirror_namespace_origin",
            "1 for each namespace's origin upstream (what decides its tags)",
            ["namespace", "upstream"],
            [([pool.namespace, pool.origin.name], 1.0) for pool in self.pools],
        )
        yield gauge(
            "regmirror_upstream_ratelimit_limit",
            "The size of the upstream's pull quota (RateLimit-Limit)",
            ["upstream"],
            [([u.name], u.rate_limit[0]) for u in upstreams if u.rate_limit],
        )
        yield gauge(
            "regmirror_upstream_rate_limited",
            "1 while the upstream is not asked after it answered 429",
            ["upstream"],
            [([u.name], float(u.backing_off() is not None)) for u in upstreams],
        )

    def housekeep(self) -> None:
        """Periodic: evict if over the limits, expire old tag records
        (an immutable tag's only once its manifest is evicted) and stale
        mirrors' records older than their namespace's ``max_stale``."""
        self.fetcher.housekeep()
        now = self.fetcher.clock.seconds()
        keep = max(n.max_stale for n in self.config.namespaces)
        cutoff = now - keep
        patterns = {n.name: n.immutable_tags for n in self.config.namespaces}

        def immutable(namespace: str, tag: str) -> bool:
            return is_immutable(patterns.get(namespace, ()), tag)

        d = self.fetcher.run_in_thread(
            lambda: self.store.expire_tags(cutoff, immutable)
        )
        d.addErrback(lambda failure: log.failure("tag expiry failed", failure))
        for pool in self.pools:
            expire = partial(pool.stale.expire, now - pool.max_stale)
            self.fetcher.run_in_thread(expire).addErrback(
                lambda failure: log.failure("stale mirror expiry failed", failure)
            )

    def problems(self) -> list[str]:
        """Why the mirror is not ready to serve, if it is not."""
        found = []
        spool = os.path.join(self.store.root, "spool")
        if not os.access(spool, os.W_OK | os.X_OK):
            found.append(f"cache folder {spool} is not writable")
        degraded = self.store.degraded()
        if degraded is not None:
            # A full disk, a read-only one: the node relays, but the
            # operator must hear of it (the failed spool is gone, and with
            # it the space a disk-space alert would see).
            found.append(degraded)
        for pool in self.pools:
            if all(u.breaker.opened > 0 for u in pool.upstreams):
                found.append(f"namespace {pool.namespace}: every upstream is down")
        return found

    def degraded(self) -> list[str]:
        """What works less well than it should, without making the node
        unready: taking every node out of the load balancer because Redis
        is down would be worse than each working alone."""
        found = []
        if self.coordinator is not None and not self.coordinator.available:
            found.append("cluster: Redis unreachable, this node works alone")
        return found


def _whose(download: Download) -> tuple[str | None, str | None]:
    """The namespace and repository a download is for, where known (not
    for another worker process's, followed here)."""
    if download.pool is None:
        return None, None
    return download.pool.namespace, download.repository
