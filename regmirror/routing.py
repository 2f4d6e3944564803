"""
Which namespace (registry) a request is for, and under which name.

First match wins: the ``ns`` query parameter (containerd), a ``Host``
header listed in a namespace's ``hosts``, a first path component naming a
namespace or alias (``/v2/ghcr.io/org/app/...``), else the default
namespace.  A name whose first component looks like a registry host the
config does not name is refused: the mirror is no open proxy.  A namespace
named with its port (``registry.local:5000``) is a path prefix too.

This is the only place a namespace is decided: for a pull, and for each
scope of a token request (see :mod:`regmirror.access`), so that a token
names the namespace a pull routed the same way reaches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from attrs import frozen

from regmirror.config import NamespaceConfig
from regmirror.errors import NameInvalid, NameUnknown
from regmirror.pool import UpstreamPool
from regmirror.reference import validate_name

#: What chose a route's namespace.
Via = Literal["ns", "host", "prefix", "default"]


@frozen
class Route:
    """
    :ivar namespace: the namespace's configuration.
    :ivar pool: its upstreams.
    :ivar repository: the name to ask upstream for (``library/`` added).
    :ivar client_name: the name as the client wrote it, for links back.
    :ivar via: what chose the namespace: the ``ns`` parameter, the ``Host``
        header, the name's first component, or nothing (the default).
    """

    namespace: NamespaceConfig
    pool: UpstreamPool
    repository: str
    client_name: str
    via: Via = "default"


def _looks_like_registry(component: str) -> bool:
    """Docker's rule for "this first component is a registry host"."""
    return "." in component or ":" in component or component == "localhost"


def _host_keys(host: str) -> tuple[str, ...]:
    """
    What a ``Host`` header may match in ``hosts``: the host with its port,
    then without; a trailing dot (``mirror.example.``, the fully qualified
    form) names the same host.  An ``[IPv6]`` literal is never in
    ``hosts``.
    """
    lowered = host.lower()
    if lowered.startswith("["):
        return ()
    name, colon, port = lowered.partition(":")
    if name.endswith("."):
        name = name[:-1]
    return (f"{name}:{port}", name) if colon else (name,)


class Router:
    """Maps requests to namespaces; built once from the configuration."""

    def __init__(
        self, namespaces: Sequence[tuple[NamespaceConfig, UpstreamPool]]
    ) -> None:
        self._by_name: dict[str, tuple[NamespaceConfig, UpstreamPool]] = {}
        self._by_host: dict[str, tuple[NamespaceConfig, UpstreamPool]] = {}
        self._default: tuple[NamespaceConfig, UpstreamPool] | None = None
        for namespace, pool in namespaces:
            # One entry per namespace, whatever it is named by: _select
            # compares entries by identity.
            entry = (namespace, pool)
            for name in (namespace.name, *namespace.aliases):
                self._by_name[name] = entry
            for host in namespace.hosts:
                self._by_host[host] = entry
            if namespace.default:
                self._default = entry

    def route(self, name: str, ns: str | None = None, host: str | None = None) -> Route:
        """
        Route a request for repository *name* (as written in the path).

        :raises NameInvalid: for a name that breaks the grammar.
        :raises NameUnknown: for a namespace the config does not name.
        """
        first, slash, rest = name.partition("/")
        if slash and ":" in first and first in self._by_name:
            # A namespace named with its port (registry.local:5000): the
            # one place a colon may be in a name; the rest obeys the
            # grammar, and so does the repository asked for below.
            validate_name(rest)
        else:
            validate_name(name)
        (namespace, pool), repository, via = self._select(name, ns, host)
        if namespace.library:
            if "/" not in repository:
                repository = f"library/{repository}"
            elif _looks_like_registry(repository.partition("/")[0]):
                # No Docker Hub repository starts so (a client's reference
                # would name that registry): asked of an upstream that is
                # itself a mirror of several registries, it would be taken
                # as that registry's, past this mirror's rules for it.
                raise NameUnknown(
                    f"{repository[:80]} is no {namespace.name} repository: "
                    f"{repository.partition('/')[0][:60]} names a registry"
                )
        return Route(namespace, pool, validate_name(repository), name, via)

    def _select(
        self, name: str, ns: str | None, host: str | None
    ) -> tuple[tuple[NamespaceConfig, UpstreamPool], str, Via]:
        if ns is not None:
            found = self._by_name.get(ns.lower())
            if found is None:
                raise NameUnknown(
                    f"namespace {ns[:80]!r} is not configured on this mirror"
                )
            first, slash, rest = name.partition("/")
            if slash and self._by_name.get(first) is found:
                # containerd pointed at a path-prefix mirror
                # (``.../v2/ghcr.io`` with ``override_path``) sends both.
                return found, rest, "ns"
            return found, name, "ns"
        if host:
            for key in _host_keys(host):
                found = self._by_host.get(key)
                if found is not None:
                    return found, name, "host"
        first, slash, rest = name.partition("/")
        if slash:
            found = self._by_name.get(first)
            if found is not None:
                return found, rest, "prefix"
            if _looks_like_registry(first):
                raise NameUnknown(
                    f"namespace {first!r} is not configured on this mirror"
                )
        if self._default is None:  # the config guarantees one
            raise NameInvalid("no default namespace")
        return self._default, name, "default"
