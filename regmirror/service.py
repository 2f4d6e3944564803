"""
Builds the running service tree from a configuration.

:func:`make_service` is given the reactor; nothing below it imports the
global one.
"""

from __future__ import annotations

import os
from typing import Any

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.server import Site

from regmirror.config import Config, ConfigError
from regmirror.fetch import Fetcher
from regmirror.pool import UpstreamPool
from regmirror.routing import Router
from regmirror.store import Store
from regmirror.transport import UpstreamTLS, agent_for
from regmirror.upstream import Upstream
from regmirror.web import PlainHTTPFactory, RegistryAPI, Root

log = Logger()


def check_listeners(config: Config) -> None:
    """
    Parse every listener description, so that a bad one (or a missing
    certificate file) stops start-up before anything listens.

    :raises ValueError: naming the listener and the problem.
    """
    for description in config.server.listen:
        try:
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
    Make sure the cache folder exists and is writable, so that start-up
    fails with one clear line rather than a traceback after listening.

    :raises ValueError: naming the problem.
    """
    directory = config.cache.directory
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {directory}: {e.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{directory} is not writable")


class _Mirror(MultiService):
    """The top service: opens the cache before the listeners start."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self._store = store

    def startService(self) -> None:
        self._store.open()
        super().startService()


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class _QuietPool(HTTPConnectionPool):
    """A connection pool that does not log every upstream connection."""

    _factory = _QuietFactory


def build_site(config: Config, reactor: Any) -> tuple[Site, Store]:
    """The HTTP site and its store, wired to upstreams over one connection pool."""
    connections = _QuietPool(reactor, persistent=True)
    connections.maxPersistentPerHost = 8
    upstreams = {
        name: Upstream(
            upstream,
            HTTPClient(agent_for(upstream, reactor, connections)),
            reactor,
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
            ),
        )
        for namespace in config.namespaces
    ]
    store = Store(config.cache.directory)
    threads = reactor.getThreadPool()

    def in_thread(work: Any) -> Deferred[None]:
        return deferToThreadPool(reactor, threads, work)

    fetcher = Fetcher(
        store, reactor, run_in_thread=in_thread, tag_ttl=config.cache.tag_ttl
    )
    api = RegistryAPI(Router(namespaces), fetcher, reactor)
    return Site(Root(api)), store


def make_service(config: Config, reactor: Any) -> MultiService:
    """The service tree: one endpoint service per listener."""
    site, store = build_site(config, reactor)
    top = _Mirror(store)
    for description in config.server.listen:
        endpoint = serverFromString(reactor, description)
        StreamServerEndpointService(endpoint, PlainHTTPFactory(site)).setServiceParent(
            top
        )
    log.info(
        "regmirror serving {namespaces} on {listen}",
        namespaces=" ".join(n.name for n in config.namespaces),
        listen=" ".join(config.server.listen),
    )
    return top
