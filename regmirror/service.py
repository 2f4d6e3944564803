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
import tempfile
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from attrs import frozen
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from regmirror import nodes
from regmirror.access.gate import Gate
from regmirror.access.tokens import shared_key
from regmirror.cluster import Coordinator
from regmirror.config import (
    EVERYONE,
    AccessConfig,
    ClusterConfig,
    Config,
    ConfigError,
    S3Config,
    restart_needed,
)
from regmirror.fetch import Fetcher
from regmirror.http.api import RegistryAPI
from regmirror.http.channel import listener_factory
from regmirror.http.health import Health, Root
from regmirror.http.site import MirrorSite
from regmirror.http.token import TokenResource
from regmirror.ini import load, parse
from regmirror.listeners import (
    Address,
    Adopt,
    Bind,
    BoundListener,
    Inherited,
    Listeners,
    listen_address,
)
from regmirror.metrics import Metrics, MetricsOnly, MetricsResource
from regmirror.mirror import Mirror
from regmirror.nodes import Peers
from regmirror.passthrough import Passthrough
from regmirror.pool import UpstreamPool
from regmirror.repositories import restricted
from regmirror.routing import Router
from regmirror.s3.location import S3Location
from regmirror.s3.objects import ObjectStore
from regmirror.s3.shared import SharedStore
from regmirror.stale import StaleMirrors
from regmirror.status import SAMPLE_INTERVAL, StatusJSON, StatusPage
from regmirror.store import Store
from regmirror.tls_listener import ReloadableTLS, parse_tls_listener
from regmirror.transport import (
    CertificateError,
    ConnectionPools,
    UpstreamTLS,
    agent_for,
)
from regmirror.upstream import Upstream
from regmirror.warm import KeepWarm
from regmirror.workers import Parent, Workers

log = Logger()

#: How often the cache is checked against its limits and tags expired.
HOUSEKEEPING_INTERVAL = 300.0


def validate(path: str, text: str | None = None) -> Config:
    """
    Everything start-up checks before it listens: the file (or *text*, the
    file at *path* as it was read), the listener descriptions, the
    certificate files, the cache folder.

    :raises ConfigError: naming file, section and key.
    """
    config = load(path) if text is None else parse(text, path)
    check_upstreams(config)
    server = config.server
    for key, descriptions, taken in (
        ("listen", server.listen, ()),
        ("metrics_listen", server.metrics_listen, server.listen),
    ):
        try:
            check_listeners(descriptions, taken)
        except ValueError as error:
            raise ConfigError(config.path, "server", key, str(error)) from None
    try:
        check_cache(config)
    except ValueError as error:
        raise ConfigError(config.path, "cache", "directory", str(error)) from None
    return config


def check_listeners(descriptions: Sequence[str], taken: Sequence[str] = ()) -> None:
    """
    Parse listener descriptions, so that a bad one (a port out of range, a
    missing or unusable certificate file, an address that one of them or
    of *taken* binds already) stops start-up before anything listens.

    :raises ValueError: naming the listener and the problem.
    """
    bound = [(d, a) for d in taken if (a := _address(d)) is not None]
    for description in descriptions:
        try:
            if description.startswith("ssl:"):
                ReloadableTLS(parse_tls_listener(description))
            else:
                # Parsing needs no reactor; a real one is given in make_service.
                serverFromString(None, description)
            address = listen_address(description)
        except Exception as e:
            raise ValueError(f"bad listener {description!r}: {e}") from None
        if address is None:
            continue
        for other, theirs in bound:
            if address.clashes(theirs):
                what = (
                    f"port {address.port} on {address.where()}"
                    if address.path is None
                    else f"socket {address.path}"
                )
                raise ValueError(
                    f"bad listener {description!r}: {what} clashes with {other!r}"
                )
        bound.append((description, address))


def _address(description: str) -> Address | None:
    try:
        return listen_address(description)
    except ValueError:
        return None  # reported under its own key


def check_upstreams(config: Config) -> None:
    """
    Load every upstream's certificate files now, so that a bad one stops
    start-up with one line.

    :raises ConfigError: naming the upstream's section.
    """
    for upstream in config.upstreams.values():
        try:
            UpstreamTLS(upstream)
        except CertificateError as e:
            raise ConfigError(
                config.path, f"upstream:{upstream.name}", e.key, str(e)
            ) from None


def check_cache(config: Config) -> None:
    """
    Make sure the cache folder is writable, or can be created (start-up
    creates it; a configuration check does not), so that start-up fails
    with one clear line rather than a traceback after listening.

    Whether folders can be made in the nearest folder that exists is
    asked of the file system itself, with an empty folder of our own made
    and removed at once: ``access()`` says yes to root everywhere, also in
    ``/proc``, where no folder can be made.

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
    try:
        probe = tempfile.mkdtemp(prefix=".regmirror-check-", dir=existing)
    except OSError as error:
        why = error.strerror or str(error)
        if existing == directory:
            raise ValueError(
                f"{directory} cannot hold the cache's folders ({why})"
            ) from None
        raise ValueError(
            f"cannot create {directory}: no folder can be made in {existing} ({why})"
        ) from None
    os.rmdir(probe)


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
        #: the images kept warm (the primary process only)
        self.warm: KeepWarm | None = None

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
            self.workers.reload()
        for certificate in self.certificates:
            try:
                certificate.reload()
            except ValueError as e:
                log.error("certificate not reloaded, keeping the old one: {why}", why=e)
            else:
                log.info("certificate reloaded")
        if self.primary:
            self._read_again()

    def _read_again(self) -> None:
        """
        The configuration file read again (SIGHUP, the ``twistd`` process):
        the ``keep_warm`` lists and intervals are taken; every other change
        waits for a restart, and the log says which.  A file that does not
        load changes nothing.
        """
        running = self.mirror.config
        try:
            config = load(running.path)
        except (ConfigError, OSError) as error:
            log.error(
                "configuration file not read again, nothing of it changes: {why}",
                why=str(error),
            )
            return
        waiting = restart_needed(running, config)
        if waiting:
            log.warn(
                "SIGHUP does not apply these changes of the file, a restart "
                "does: {changes}",
                changes=", ".join(waiting),
            )
        if self.warm is not None:
            self.warm.change(config.namespaces)


#: Bytes read from an upstream connection at once (Twisted reads 64 KiB):
#: a blob's body arrives in fewer, larger pieces, for fewer turns of the
#: reactor per mebibyte.  Read only when the bytes are there: small answers
#: stay small.
UPSTREAM_READ_SIZE = 1024 * 1024


class _UpstreamConnection(HTTP11ClientProtocol):
    """An upstream connection that reads in large pieces (plain TCP; under
    TLS, its records decide)."""

    def makeConnection(self, transport: Any) -> None:
        if isinstance(transport, tcp.Connection):
            transport.bufferSize = UPSTREAM_READ_SIZE
        super().makeConnection(transport)


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _UpstreamConnection(self._quiescentCallback)


class _QuietPool(HTTPConnectionPool):
    """
    A connection pool that does not log every upstream connection, and
    whose connections read in large pieces.

    Twisted offers no public way to quiet the factories its pool builds:
    this is the one place that uses its private ``_factory`` hook, and the
    factory's ``_quiescentCallback`` (tests/test_private_apis.py fails if
    they change).
    """

    _factory = _QuietFactory


def _quiet_pool(reactor: Any) -> HTTPConnectionPool:
    pool = _QuietPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    return pool


def build_mirror(config: Config, reactor: Any) -> Mirror:
    """
    Every part, wired to upstreams over persistent connection pools, one
    per way of connecting (TLS settings, proxy: :class:`ConnectionPools`).
    """
    metrics = Metrics()
    connections = ConnectionPools(lambda: _quiet_pool(reactor))
    upstreams = {
        name: Upstream(
            upstream,
            agent_for(upstream, reactor, connections.pool_for(upstream)),
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
                tag_ttl=namespace.tag_ttl,
                immutable_tags=namespace.immutable_tags,
                origin_retry=namespace.origin_retry,
                stale_while_revalidate=namespace.stale_while_revalidate,
                # Passed-through credentials: content vouched for per
                # repository, whose access each client's own is checked for.
                per_repository=restricted(namespace) or namespace.passthrough,
                refusals_answer=namespace.passthrough,
                stale=StaleMirrors(
                    os.path.join(config.cache.directory, "stale", namespace.name)
                ),
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
        on_degrade=metrics.cache_write_failures.inc,
    )

    def in_thread(work: Any) -> Deferred[None]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), work)

    s3, cluster = config.cache.s3, config.cluster
    shared = None if s3 is None else shared_store(s3, reactor, connections.pool_for())
    redis = None if cluster is None else coordinator(cluster, reactor)
    peers = (
        None
        if cluster is None
        else Peers(Agent(reactor, pool=connections.pool_for()), reactor)
    )
    fetcher = Fetcher(
        store,
        reactor,
        run_in_thread=in_thread,
        call_from_thread=lambda f, *args: reactor.callFromThread(f, *args),
        tag_ttl=config.cache.tag_ttl,
        max_blob_size=config.cache.max_blob_size,
        metrics=metrics,
        bucket=shared,
        bucket_max_size=None if s3 is None else s3.max_size,
        redirect_ttl=s3.redirect_ttl if s3 is not None and s3.redirect else None,
        coordinator=redis,
        peers=peers,
    )
    gate = None
    passing = frozenset(n.name for n in config.namespaces if n.passthrough)
    # Clients' own credentials come through the gate and /token, even
    # where everyone may pull.
    access = config.access
    if access is None and passing:
        access = AccessConfig(anonymous=EVERYONE)
    if access is not None:
        gate = Gate(
            access,
            reactor,
            in_thread,
            {n.name: n.anonymous for n in config.namespaces if n.anonymous is not None},
            key=shared_key(os.path.join(config.cache.directory, "token.key")),
            logins=os.path.join(config.cache.directory, "logins"),
            passthrough=passing,
        )
    router = Router(namespaces)
    passthrough = Passthrough(reactor) if passing else None
    api = RegistryAPI(router, fetcher, reactor, metrics, gate, passthrough)
    root = Root(api, {nodes.PATH: api} if fetcher.coordinator else None)
    if gate is not None:
        root.putChild(b"token", TokenResource(gate, router, passthrough))
    trusted = config.access.trusted_proxies if config.access else ()
    forwarded = config.access.forwarded_header if config.access else "x-forwarded-for"
    mirror = Mirror(
        config,
        store,
        upstreams,
        [pool for _, pool in namespaces],
        fetcher,
        metrics,
        MirrorSite(root, reactor, trusted, forwarded, metrics),
    )
    metrics.watch(mirror.live_metrics)
    root.putChild(b"", StatusPage())
    root.putChild(b"_status", StatusPage())
    root.putChild(
        b"_status.json",
        StatusJSON(mirror.status, gate, [n.name for n in config.namespaces]),
    )
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
    files, evicting more than needed); and it keeps images warm
    (:mod:`regmirror.warm`), whose refreshes are the machine's.
    """
    primary = worker is None
    mirror = build_mirror(config, reactor)
    top = MirrorService(mirror, reactor, primary=primary)
    if worker is not None:
        # First: the timers and the listeners ask the parent through it.
        parent = Parent(
            reactor, worker.channel, mirror.metrics.families, reactor.stop, top.reload
        )
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
    if primary:
        # Once for the machine, like housekeeping: a worker's refreshes
        # would ask the origin again, and fetch nothing more.
        warm = KeepWarm(mirror.fetcher, mirror.pools, config.namespaces, reactor)
        warm.setName("keep warm")
        warm.setServiceParent(top)
        top.warm = warm
    served: list[tuple[str, Any]] = [
        (d, listener_factory(mirror.site, d)) for d in config.server.listen
    ]
    if config.server.metrics_listen:
        # The API's access lines and hardened connections for scrapes too.
        metrics_site = mirror.site.serving(MetricsOnly(mirror.families))
        served += [
            (d, listener_factory(metrics_site, d)) for d in config.server.metrics_listen
        ]
    source: Listeners = (
        Bind(reactor, shared=config.server.workers > 1)
        if worker is None
        else Adopt(reactor, worker.inherited)
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
            config,
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
