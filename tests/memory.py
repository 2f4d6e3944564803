"""
An in-memory mirror for unit tests: the real resources, fetcher and store
over fake upstream registries, with ``StubTreq`` on both sides and a
``Clock`` for time.  No sockets, no sleeps.
"""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from fakeregistry import FakeRegistry
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from regmirror import nodes
from regmirror.access.gate import Gate
from regmirror.cluster import Coordinator
from regmirror.config import AccessConfig, NamespaceConfig, Network, UpstreamConfig
from regmirror.fetch import Fetcher
from regmirror.http.api import RegistryAPI
from regmirror.http.health import Root
from regmirror.http.token import TokenResource
from regmirror.metrics import Metrics
from regmirror.nodes import Peers
from regmirror.pool import UpstreamPool
from regmirror.reference import OCI_INDEX, OCI_MANIFEST
from regmirror.repositories import restricted
from regmirror.routing import Router
from regmirror.s3.shared import SharedStore
from regmirror.store import Store
from regmirror.upstream import Upstream

LAYER = bytes(range(256)) * 40  # 10 KiB
CONFIG = b'{"architecture":"amd64","os":"linux"}'
#: the other names the harness's namespaces answer to: a path prefix
#: (or ``ns``) alias and a ``Host`` header each
DOCKER_ALIAS, DOCKER_HOST = "index.docker.io", "hub.mirror.test"
GHCR_ALIAS, GHCR_HOST = "ghcr.alias.test", "ghcr.mirror.test"


class Harness:
    """
    A mirror over the given fake upstreams with two namespaces: docker.io
    (the default, every upstream) and ghcr.io (the last upstream), each also
    reachable by an alias and a ``Host`` header.
    """

    def __init__(
        self,
        root: str,
        upstreams: dict[str, FakeRegistry],
        settings: dict[str, dict[str, Any]] | None = None,
        access: AccessConfig | None = None,
        narrower: dict[str, tuple[Network, ...]] | None = None,
        clock: Clock | None = None,
        coordinator: Coordinator | None = None,
        peers: Peers | None = None,
        bucket: SharedStore | None = None,
        redirect_ttl: float | None = None,
        prefetch: int = 0,
        max_size: int | None = None,
        docker: dict[str, Any] | None = None,
    ) -> None:
        """
        :param clock: shared by several harnesses acting as one cluster.
        :param coordinator: this node's view of the cluster: given to the
            fetcher and the API, which then answers other nodes at
            ``/_cluster/blobs/`` as :func:`regmirror.service.build_mirror`
            wires it.
        :param peers: how this node reaches the other nodes.
        :param bucket: the cluster's bucket; *redirect_ttl* as in the config.
        :param prefetch: both namespaces' ``prefetch`` (none by default, so
            that the upstreams see only what the clients ask for).
        :param max_size: the cache's ``max_size``.
        :param docker: more keys of docker.io's :class:`NamespaceConfig`
            (``allow``, ``deny``...).
        """
        self.clock = clock if clock is not None else Clock()
        self.store = Store(root, max_size=max_size, now=self.clock.seconds)
        self.store.open()
        self.fakes = upstreams
        self.stubs = {
            name: RequestTraversalAgent(fake) for name, fake in upstreams.items()
        }
        clients = [
            Upstream(
                UpstreamConfig(
                    name, f"http://{name}.test", **(settings or {}).get(name, {})
                ),
                stub,
                self.clock,
            )
            for name, stub in self.stubs.items()
        ]
        self.upstreams = {upstream.name: upstream for upstream in clients}
        namespace = NamespaceConfig(
            "docker.io",
            tuple(self.stubs),
            clients[-1].name,
            default=True,
            library=True,
            aliases=(DOCKER_ALIAS,),
            hosts=(DOCKER_HOST,),
            prefetch=prefetch,
            **(docker or {}),
        )
        ghcr = NamespaceConfig(
            "ghcr.io",
            (clients[-1].name,),
            clients[-1].name,
            aliases=(GHCR_ALIAS,),
            hosts=(GHCR_HOST,),
            prefetch=prefetch,
        )
        self.metrics = Metrics()
        pool = UpstreamPool(
            "docker.io",
            clients,
            clients[-1],
            metrics=self.metrics,
            per_repository=restricted(namespace),
        )
        self.pools = {"docker.io": pool}
        router = Router(
            [
                (namespace, pool),
                (ghcr, UpstreamPool("ghcr.io", clients[-1:], clients[-1])),
            ]
        )
        self.fetcher = Fetcher(
            self.store,
            self.clock,
            tag_ttl=30.0,
            metrics=self.metrics,
            coordinator=coordinator,
            peers=peers,
            bucket=bucket,
            redirect_ttl=redirect_ttl,
        )
        self.gate = None
        children: dict[bytes, Resource] = {}
        if access is not None:
            self.gate = Gate(access, self.clock, maybeDeferred, narrower or {})
            children[b"token"] = TokenResource(self.gate, router)
        api = RegistryAPI(router, self.fetcher, self.clock, self.metrics, self.gate)
        if coordinator is not None:
            children[nodes.PATH] = api
        self.root = Root(api, children)
        self.client = StubTreq(self.root)

    def router_pool(self, namespace: str) -> UpstreamPool:
        return self.pools[namespace]

    def settle(self) -> None:
        """Pump every in-memory connection until nothing moves."""
        for _ in range(50):
            before = sum(len(f.requests) for f in self.fakes.values())
            for stub in self.stubs.values():
                stub.flush()
            self.client.flush()
            after = sum(len(f.requests) for f in self.fakes.values())
            if before == after:
                self.clock.advance(0)
                for stub in self.stubs.values():
                    stub.flush()
                self.client.flush()
                if after == sum(len(f.requests) for f in self.fakes.values()):
                    return

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        d = self.client.request(method, f"http://mirror.test{path}", **kwargs)
        self.settle()
        return result(d)

    def body(self, response: Any) -> bytes:
        d = treq.content(response)
        self.settle()
        return result(d)

    def cached_files(self) -> list[str]:
        found = []
        for sub in ("blobs", "manifests", "tags", "spool"):
            for folder, _, files in os.walk(os.path.join(self.store.root, sub)):
                found += [os.path.join(folder, f) for f in files]
        return sorted(found)


def result(d: Deferred[Any]) -> Any:
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


def image_manifest(
    config: tuple[str, int],
    layers: list[tuple[str, int]],
    layer_type: str = "application/vnd.oci.image.layer.v1.tar",
) -> dict[str, Any]:
    """An OCI image manifest of *config* and *layers*, each ``(digest,
    size)``."""
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config[0],
            "size": config[1],
        },
        "layers": [
            {"mediaType": layer_type, "digest": digest, "size": size}
            for digest, size in layers
        ],
    }


def index_manifest(
    images: list[tuple[dict[str, Any], str]], media_type: str = OCI_INDEX
) -> dict[str, Any]:
    """An index of *images*, each an :func:`image`-like dict (``manifest``,
    ``body``) and its linux architecture."""
    return {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": child["manifest"],
                "size": len(child["body"]),
                "platform": {"os": "linux", "architecture": architecture},
            }
            for child, architecture in images
        ],
    }


def image(
    fake: FakeRegistry,
    name: str = "library/app",
    tag: str | None = "latest",
    created: str | None = None,
) -> dict[str, str]:
    """An image with one layer in *fake*; *created* makes its config unique."""
    layer = fake.add_blob(LAYER)
    config_bytes = CONFIG
    if created is not None:
        config_bytes = json.dumps(
            {"architecture": "amd64", "os": "linux", "created": created}
        ).encode()
    config = fake.add_blob(config_bytes)
    document = image_manifest((config, len(config_bytes)), [(layer, len(LAYER))])
    manifest, body = fake.add_manifest(name, tag, document, OCI_MANIFEST)
    return {
        "layer": layer,
        "config": config,
        "manifest": manifest,
        "body": body.decode(),
    }


def error_code(harness: Harness, response: Any) -> str:
    document = json.loads(harness.body(response))
    return str(document["errors"][0]["code"])
