"""
Which namespace (registry) a request is for, and under which name.

First match wins: the ``ns`` query parameter (containerd), a ``Host``
header listed in a namespace's ``hosts``, a first path component naming a
namespace or alias (``/v2/ghcr.io/org/app/...``), else the default
namespace.  A name whose first component looks like a registry host the
config does not name is refused: the mirror is no open proxy.
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import frozen

from regmirror.config import NamespaceConfig
from regmirror.errors import NameInvalid, NameUnknown
from regmirror.pool import UpstreamPool
from regmirror.reference import validate_name


@frozen
class Route:
    """
    :ivar namespace: the namespace's configuration.
    :ivar pool: its upstreams.
    :ivar repository: the name to ask upstream for (``library/`` added).
    :ivar client_name: the name as the client wrote it, for links back.
    """

    namespace: NamespaceConfig
    pool: UpstreamPool
    repository: str
    client_name: str


def _looks_like_registry(component: str) -> bool:
    """Docker's rule for "this first component is a registry host"."""
    return "." in component or ":" in component or component == "localhost"


class Router:
    """Maps requests to namespaces; built once from the configuration."""

    def __init__(
        self, namespaces: Sequence[tuple[NamespaceConfig, UpstreamPool]]
    ) -> None:
        self._by_name: dict[str, tuple[NamespaceConfig, UpstreamPool]] = {}
        self._by_host: dict[str, tuple[NamespaceConfig, UpstreamPool]] = {}
        self._default: tuple[NamespaceConfig, UpstreamPool] | None = None
        for namespace, pool in namespaces:
            for name in (namespace.name, *namespace.aliases):
                self._by_name[name] = (namespace, pool)
            for host in namespace.hosts:
                self._by_host[host] = (namespace, pool)
            if namespace.default:
                self._default = (namespace, pool)

    def route(self, name: str, ns: str | None = None, host: str | None = None) -> Route:
        """
        Route a request for repository *name* (as written in the path).

        :raises NameInvalid: for a name that breaks the grammar.
        :raises NameUnknown: for a namespace the config does not name.
        """
        validate_name(name)
        chosen = self._select(name, ns, host)
        namespace, pool = chosen[0]
        repository = chosen[1]
        if namespace.library and "/" not in repository:
            repository = f"library/{repository}"
        return Route(namespace, pool, validate_name(repository), name)

    def _select(
        self, name: str, ns: str | None, host: str | None
    ) -> tuple[tuple[NamespaceConfig, UpstreamPool], str]:
        if ns is not None:
            found = self._by_name.get(ns.lower())
            if found is None:
                raise NameUnknown(
                    f"namespace {ns[:80]!r} is not configured on this mirror"
                )
            return found, name
        if host:
            lowered = host.lower()
            found = self._by_host.get(lowered) or self._by_host.get(
                lowered.rsplit(":", 1)[0]
            )
            if found is not None:
                return found, name
        first, slash, rest = name.partition("/")
        if slash:
            found = self._by_name.get(first)
            if found is not None:
                return found, rest
            if _looks_like_registry(first):
                raise NameUnknown(
                    f"namespace {first!r} is not configured on this mirror"
                )
        if self._default is None:  # the config guarantees one
            raise NameInvalid("no default namespace")
        return self._default, name
