"""
Builds the running service tree from a configuration.

:func:`build_tree` builds it for every process: the ``twistd`` process
(:func:`make_service`, which the plugin calls) and each worker process
(:mod:`regmirror.worker`).  It is given the reactor; nothing below it
imports the global one.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import quote

from attrs import define, field, frozen
from prometheus_client.core import Metric
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.server import Site

from regmirror import nodes
from regmirror.access.gate import Gate
from regmirror.access.tokens import shared_key
from regmirror.cluster import Coordinator
from regmirror.config import ClusterConfig, Config, ConfigError, S3Config
from regmirror.fetch import Fetcher
from regmirror.http.api import RegistryAPI
from regmirror.http.channel import listener_factory
from regmirror.http.health import Health, Root
from regmirror.http.site import MirrorSite
from regmirror.http.token import TokenResource
from regmirror.ini import load
from regmirror.listeners import Adopt, Bind, BoundListener, Inherited, Listeners
from regmirror.metrics import Metrics, MetricsResource, View, gauge, total
from regmirror.nodes import Peers
from regmirror.pool import UpstreamPool
from regmirror.routing import Router
from regmirror.s3.location import S3Location
from regmirror.s3.objects import ObjectStore
from regmirror.s3.shared import SharedStore
from regmirror.status import SAMPLE_INTERVAL, History, StatusJSON, StatusPage
from regmirror.store import Store
from regmirror.transport import (
    ReloadableTLS,
    UpstreamTLS,
    agent_for,
    parse_tls_listener,
)
from regmirror.upstream import Upstream
from regmirror.workers import Parent, Workers

log = Logger()

#: How often upstreams marked down are looked at (each at most once per
#: its ``breaker_backoff``).
RECOVERY_INTERVAL = 1.0

#: How often the cache is checked against its limits and tags expired.
HOUSEKEEPING_INTERVAL = 300.0


def _recovery_failed(failure: Failure, upstream: str) -> None:
    log.failure("cannot probe upstream {upstream}", failure, upstream=upstream)


def validate(path: str) -> Config:
    """
    Everything start-up checks before it listens: the file, the listener
    descriptions, the certificate files, the cache folder.

    :raises ConfigError: naming file, section and key.
    """
    config = load(path)
    check_upstreams(config)
    for key in ("listen", "metrics_listen"):
        try:
            check_listeners(getattr(config.server, key))
        except ValueError as error:
            raise ConfigError(config.path, "server", key, str(error)) from None
    try:
        check_cache(config)
    except ValueError as error:
        raise ConfigError(config.path, "cache", "directory", str(error)) from None
    return config


def check_listeners(descriptions: Sequence[str]) -> None:
    """
    Parse listener descriptions, so that a bad one (or a missing
    certificate file) stops start-up before anything listens.

    :raises ValueError: naming the listener and the problem.
    """
    for description in descriptions:
        try:
            if description.startswith("ssl:"):
                ReloadableTLS(parse_tls_listener(description))
            else:
                # Parsing needs no reactor; a real one is given in make_service.
                serverFromString(None, description)
        except Exception as e:
            raise ValueError(f"bad listener {description!r}: {e}") from None


def check_upstreams(config: Config) -> None:
    """
    Load every upstream's certificate files now, so that a bad one stops
    start-up with one line.

    :raises ConfigError: naming the upstream's section.
    """
    for upstream in config.upstreams.values():
        try:
            UpstreamTLS(upstream)
        except ValueError as e:
            key = "ca_file" if "ca_file" in str(e) else "client_cert"
            raise ConfigError(
                config.path, f"upstream:{upstream.name}", key, str(e)
            ) from None


def check_cache(config: Config) -> None:
    """
    Make sure the cache folder is writable, or can be created (start-up
    creates it; a configuration check changes nothing), so that start-up
    fails with one clear line rather than a traceback after listening.

    :raises ValueError: naming the problem.
    """
    directory = config.cache.directory
    existing = directory
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"cannot create {directory}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == directory else "cannot be created"
        raise ValueError(f"{directory} {what}")


class MirrorService(MultiService):
    """
    The top service: opens the cache before the listeners start (emptying
    its spool folder in the *primary* process only: a worker joins a cache
    in use), and reloads TLS certificates on SIGHUP (certbot renewals)
    without dropping a connection; its :meth:`stopService` ends with
    :meth:`Mirror.stop`.
    """

    def __init__(self, mirror: Mirror, reactor: Any, *, primary: bool = True) -> None:
        super().__init__()
        self.mirror = mirror
        self.primary = primary
        self._reactor = reactor
        self.certificates: list[ReloadableTLS] = []
        self.workers: Workers | None = None

    def startService(self) -> None:
        self.mirror.start(clean=self.primary)
        # Always ours: the default action of SIGHUP would end the process
        # on `systemctl reload`.
        signal.signal(
            signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload)
        )
        super().startService()

    def stopService(self) -> Deferred[None]:
        d: Deferred[None] = super().stopService()
        d.addCallback(lambda _: Deferred.fromCoroutine(self.mirror.stop()))
        return d

    def reload(self) -> None:
        log.info("reload requested (SIGHUP)")
        if self.workers is not None:
            self.workers.signal("HUP")
        for certificate in self.certificates:
            try:
                certificate.reload()
            except ValueError as e:
                log.error("certificate not reloaded, keeping the old one: {why}", why=e)
            else:
                log.info("certificate reloaded")


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class _QuietPool(HTTPConnectionPool):
    """
    A connection pool that does not log every upstream connection.

    Twisted offers no public way to quiet the factories its pool builds:
    this is the one place that uses its private ``_factory`` hook
    (tests/test_private_apis.py fails if it changes).
    """

    _factory = _QuietFactory


@define(eq=False)
class Mirror:
    """Every part of a running mirror, wired together from the config."""

    config: Config
    store: Store
    upstreams: dict[str, Upstream]
    pools: list[UpstreamPool]
    fetcher: Fetcher
    metrics: Metrics
    site: Site
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
        shared = self.fetcher.shared
        if shared is not None:
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

    async def status(self) -> dict[str, Any]:
        """
        Everything the status page shows: the totals and their history are
        the machine's, the rest (upstreams, downloads) what the answering
        process (``pid``) sees.
        """
        totals = await self.totals()
        now = self.fetcher.clock.seconds()

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
                    ],
                }
                for pool in self.pools
            ],
            "cache": {"size": self.store.size, "max_size": self.store.max_size},
            "downloads": [
                {
                    "digest": str(d.digest),
                    "upstream": d.source,
                    "written": d.written,
                    "size": d.size,
                }
                for d in self.fetcher.downloads
            ],
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

    def housekeep(self) -> None:
        """Periodic: evict if over the limits, expire old tag records."""
        self.fetcher.housekeep()
        keep = max(n.max_stale for n in self.config.namespaces)
        cutoff = self.fetcher.clock.seconds() - keep
        d = self.fetcher.run_in_thread(lambda: self.store.expire_tags(cutoff))
        d.addErrback(lambda failure: log.failure("tag expiry failed", failure))

    def problems(self) -> list[str]:
        """Why the mirror is not ready to serve, if it is not."""
        found = []
        spool = os.path.join(self.store.root, "spool")
        if not os.access(spool, os.W_OK | os.X_OK):
            found.append(f"cache folder {spool} is not writable")
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


def build_mirror(config: Config, reactor: Any) -> Mirror:
    """Every part, wired to upstreams over one connection pool."""
    metrics = Metrics()
    connections = _QuietPool(reactor, persistent=True)
    connections.maxPersistentPerHost = 8
    upstreams = {
        name: Upstream(
            upstream,
            agent_for(upstream, reactor, connections),
            reactor,
            deny=config.server.deny_hosts,
            health_record=os.path.join(config.cache.directory, "health", name),
        )
        for name, upstream in config.upstreams.items()
    }
    namespaces = [
        (
            namespace,
            UpstreamPool(
                namespace.name,
                [upstreams[name] for name in namespace.upstreams],
                upstreams[namespace.origin],
                origin_unreachable=namespace.origin_unreachable,
                max_stale=namespace.max_stale,
                metrics=metrics,
            ),
        )
        for namespace in config.namespaces
    ]
    store = Store(
        config.cache.directory,
        max_size=config.cache.max_size,
        min_free=config.cache.min_free,
        now=reactor.seconds,
    )

    def in_thread(work: Any) -> Deferred[None]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), work)

    s3, cluster = config.cache.s3, config.cluster
    shared = None if s3 is None else shared_store(s3, reactor, connections)
    redis = None if cluster is None else coordinator(cluster, reactor)
    peers = (
        None if cluster is None else Peers(Agent(reactor, pool=connections), reactor)
    )
    fetcher = Fetcher(
        store,
        reactor,
        run_in_thread=in_thread,
        tag_ttl=config.cache.tag_ttl,
        max_blob_size=config.cache.max_blob_size,
        metrics=metrics,
        shared=shared,
        shared_max_size=None if s3 is None else s3.max_size,
        redirect_ttl=s3.redirect_ttl if s3 is not None and s3.redirect else None,
        coordinator=redis,
        peers=peers,
    )
    gate = None
    if config.access is not None:
        gate = Gate(
            config.access,
            reactor,
            in_thread,
            {n.name: n.anonymous for n in config.namespaces if n.anonymous is not None},
            key=shared_key(os.path.join(config.cache.directory, "token.key")),
            logins=os.path.join(config.cache.directory, "logins"),
        )
    router = Router(namespaces)
    api = RegistryAPI(router, fetcher, reactor, metrics, gate)
    root = Root(api, {nodes.PATH: api} if fetcher.coordinator else None)
    if gate is not None:
        root.putChild(b"token", TokenResource(gate, router))
    trusted = config.access.trusted_proxies if config.access else ()
    forwarded = config.access.forwarded_header if config.access else "x-forwarded-for"
    mirror = Mirror(
        config,
        store,
        upstreams,
        [pool for _, pool in namespaces],
        fetcher,
        metrics,
        MirrorSite(root, reactor, trusted, forwarded),
    )
    metrics.watch(mirror.live_metrics)
    root.putChild(b"", StatusPage())
    root.putChild(b"_status", StatusPage())
    root.putChild(b"_status.json", StatusJSON(mirror.status))
    root.putChild(b"healthz", Health(lambda: []))
    root.putChild(b"readyz", Health(mirror.problems, mirror.degraded))
    if not config.server.metrics_listen:
        root.putChild(b"metrics", MetricsResource(mirror.families))
    return mirror


def shared_store(
    config: S3Config, reactor: Any, connections: HTTPConnectionPool
) -> SharedStore:
    """The cluster's bucket, over the upstreams' connection pool."""
    location = S3Location(
        endpoint=config.endpoint,
        bucket=config.bucket,
        region=config.region,
        access_key=config.access_key,
        secret_key=config.secret_key,
        addressing=config.addressing,
    )
    return SharedStore(ObjectStore(Agent(reactor, pool=connections), reactor, location))


def coordinator(config: ClusterConfig, reactor: Any) -> Coordinator:
    url = config.redis
    if config.redis_password is not None:
        password = quote(config.redis_password.reveal(), safe="")
        url = url.replace("redis://", f"redis://:{password}@", 1)
    return Coordinator(
        reactor,
        url,
        config.advertise,
        lease_ttl=config.lease_ttl,
        timeout=config.redis_timeout,
    )


@frozen
class Worker:
    """
    A worker process's place in the tree: the listening sockets it
    inherited, and its socket to the parent.
    """

    inherited: tuple[Inherited, ...]
    channel: int


def make_service(config: Config, reactor: Any) -> MirrorService:
    """The ``twistd`` process's service tree (see :func:`build_tree`)."""
    return build_tree(config, reactor, None)


def build_tree(config: Config, reactor: Any, worker: Worker | None) -> MirrorService:
    """
    The service tree of every process: the parent's (*worker* ``None``)
    and each worker's.  The same mirror, listeners, timers (the status
    history's samples, the upstreams' recovery in :meth:`Mirror.start`)
    and clean stop (:meth:`Mirror.stop`: leases released) everywhere.

    Only the parent binds the listeners (a worker adopts the sockets it
    inherited), starts the workers, empties the spool folder at start and
    does the housekeeping: eviction and tag expiry are work on the cache
    folder the processes share, done once (several processes at it would
    each walk the whole folder, and race over the same least recently used
    files, evicting more than needed).
    """
    primary = worker is None
    mirror = build_mirror(config, reactor)
    top = MirrorService(mirror, reactor, primary=primary)
    if worker is not None:
        # First: the timers and the listeners ask the parent through it.
        parent = Parent(reactor, worker.channel, mirror.metrics.families, reactor.stop)
        parent.setName("processes")
        parent.setServiceParent(top)
        mirror.gather = parent.gather
    timers: list[tuple[str, float, Callable[[], object]]] = [
        ("history", SAMPLE_INTERVAL, mirror.history.sample)
    ]
    if primary:
        timers.append(("housekeeping", HOUSEKEEPING_INTERVAL, mirror.housekeep))
    for name, interval, work in timers:
        timer = TimerService(interval, work)
        timer.clock = reactor
        timer.setName(name)
        timer.setServiceParent(top)
    served: list[tuple[str, Any]] = [
        (d, listener_factory(mirror.site, d)) for d in config.server.listen
    ]
    if config.server.metrics_listen:
        metrics_site = Site(MetricsResource(mirror.families))
        served += [(d, metrics_site) for d in config.server.metrics_listen]
    source: Listeners = (
        Bind(reactor) if worker is None else Adopt(reactor, worker.inherited)
    )
    bound = []
    for number, (description, factory) in enumerate(served):
        listener, certificate = source.listener(description, factory)
        if certificate is not None:
            top.certificates.append(certificate)
        listener.setName(f"listener {number}: {description}")
        listener.setServiceParent(top)
        if isinstance(listener, BoundListener):
            bound.append(listener)
    if primary and config.server.workers > 1:
        # Last: started once this process serves, stopped first.
        workers = Workers(
            reactor,
            config.path,
            config.server.workers - 1,
            bound,
            mirror.metrics.families,
        )
        workers.setName("processes")
        workers.setServiceParent(top)
        top.workers = workers
        mirror.gather = workers.gather
    if primary:
        log.info(
            "regmirror serving {namespaces} on {listen}",
            namespaces=" ".join(n.name for n in config.namespaces),
            listen=" ".join(config.server.listen),
        )
    return top
