"""
Tests for :class:`regmirror.routing.Router`: which namespace a request is
for, and the repository name to ask its upstreams for.
"""

from __future__ import annotations

from typing import Any

import pytest

from regmirror.config import NamespaceConfig
from regmirror.errors import NameInvalid, NameUnknown
from regmirror.routing import Router

DOCKER = NamespaceConfig(
    name="docker.io",
    upstreams=("dockerhub",),
    origin="dockerhub",
    default=True,
    aliases=("index.docker.io", "registry-1.docker.io"),
    hosts=("docker.mirror.example",),
    library=True,
)
GHCR = NamespaceConfig(
    name="ghcr.io",
    upstreams=("ghcr",),
    origin="ghcr",
    hosts=("ghcr.mirror.example",),
)
QUAY = NamespaceConfig(name="quay.io", upstreams=("quay",), origin="quay")


class _Pool:
    """A stand-in for an UpstreamPool: the router only stores it."""

    def __init__(self, name: str) -> None:
        self.name = name


POOLS: dict[str, Any] = {ns.name: _Pool(ns.name) for ns in (DOCKER, GHCR, QUAY)}


@pytest.fixture
def router() -> Router:
    return Router([(ns, POOLS[ns.name]) for ns in (DOCKER, GHCR, QUAY)])


def test_path_prefix_selects_namespace(router: Router) -> None:
    """A first component naming a namespace selects it and is stripped."""
    route = router.route("ghcr.io/org/app")
    assert route.namespace == GHCR
    assert route.pool is POOLS["ghcr.io"]
    assert route.repository == "org/app"
    assert route.client_name == "ghcr.io/org/app"


def test_path_prefix_one_word_without_library(router: Router) -> None:
    """A namespace without ``library`` leaves one-word names alone."""
    route = router.route("quay.io/app")
    assert route.namespace == QUAY
    assert route.repository == "app"


def test_ns_parameter_selects_namespace(router: Router) -> None:
    """``?ns=ghcr.io`` (containerd) selects ghcr.io with the full name."""
    route = router.route("org/app", ns="ghcr.io")
    assert route.namespace == GHCR
    assert route.pool is POOLS["ghcr.io"]
    assert route.repository == "org/app"
    assert route.client_name == "org/app"


def test_ns_parameter_keeps_prefix_like_name(router: Router) -> None:
    """With ``ns``, a first component is not taken as a namespace prefix."""
    route = router.route("quay.io/app", ns="ghcr.io")
    assert route.namespace == GHCR
    assert route.repository == "quay.io/app"


@pytest.mark.parametrize("ns", ["ghcr.io", "GHCR.IO"])
def test_ns_parameter_and_the_same_namespace_as_prefix(router: Router, ns: str) -> None:
    """containerd pointed at a path-prefix mirror (``/v2/ghcr.io`` with
    ``override_path``) sends the prefix and ``ns`` both: the prefix naming
    the same namespace is not part of the repository."""
    route = router.route("ghcr.io/org/app", ns=ns)
    assert route.namespace == GHCR
    assert route.repository == "org/app"


def test_ns_parameter_alias_and_case(router: Router) -> None:
    """``ns`` may name an alias, in any case; docker.io still adds ``library/``."""
    route = router.route("busybox", ns="Index.Docker.IO")
    assert route.namespace == DOCKER
    assert route.repository == "library/busybox"


def test_ns_parameter_wins_over_host(router: Router) -> None:
    """``ns`` comes before the Host header."""
    route = router.route("org/app", ns="quay.io", host="ghcr.mirror.example")
    assert route.namespace == QUAY


@pytest.mark.parametrize("ns", ["gcr.io", "evil.example.com", "", "docker"])
def test_unknown_ns_parameter(router: Router, ns: str) -> None:
    """An ``ns`` that names no configured namespace is NameUnknown."""
    with pytest.raises(NameUnknown):
        router.route("org/app", ns=ns)


@pytest.mark.parametrize(
    "host",
    ["ghcr.mirror.example", "ghcr.mirror.example:5000", "GHCR.Mirror.Example:443"],
)
def test_host_header_selects_namespace(router: Router, host: str) -> None:
    """A Host header listed in ``hosts``, with or without a port, selects it."""
    route = router.route("org/app", host=host)
    assert route.namespace == GHCR
    assert route.repository == "org/app"
    assert route.client_name == "org/app"


def test_host_header_wins_over_path_prefix(router: Router) -> None:
    """The Host header comes before a namespace-looking first component."""
    route = router.route("quay.io/app", host="ghcr.mirror.example")
    assert route.namespace == GHCR
    assert route.repository == "quay.io/app"


def test_host_header_library(router: Router) -> None:
    """A Host selecting docker.io still gets ``library/`` on one-word names."""
    route = router.route("busybox", host="docker.mirror.example:5000")
    assert route.namespace == DOCKER
    assert route.repository == "library/busybox"


@pytest.mark.parametrize("host", ["localhost:5000", "mirror.example", "", None])
def test_unlisted_host_header_ignored(router: Router, host: str | None) -> None:
    """A Host not listed anywhere falls through to the other rules."""
    route = router.route("ghcr.io/org/app", host=host)
    assert route.namespace == GHCR
    assert route.repository == "org/app"


def test_bare_name_goes_to_default_with_library(router: Router) -> None:
    """A one-word name goes to the default namespace, docker.io: ``library/``."""
    route = router.route("busybox")
    assert route.namespace == DOCKER
    assert route.pool is POOLS["docker.io"]
    assert route.repository == "library/busybox"
    assert route.client_name == "busybox"


def test_two_component_name_goes_to_default(router: Router) -> None:
    """A name whose first component is no host goes to the default, unchanged."""
    route = router.route("bitnami/redis")
    assert route.namespace == DOCKER
    assert route.repository == "bitnami/redis"


@pytest.mark.parametrize(
    "name",
    [
        "docker.io/library/busybox",
        "index.docker.io/library/busybox",
        "registry-1.docker.io/library/busybox",
        "docker.io/busybox",
        "library/busybox",
    ],
)
def test_docker_io_spellings(router: Router, name: str) -> None:
    """docker.io, its aliases and the bare form all reach library/busybox."""
    route = router.route(name)
    assert route.namespace == DOCKER
    assert route.repository == "library/busybox"
    assert route.client_name == name


@pytest.mark.parametrize(
    "name",
    [
        "evil.example.com/x",
        "localhost/x",
        "gcr.io/org/app",
        "127.0.0.1/x",
    ],
)
def test_unconfigured_registry_refused(router: Router, name: str) -> None:
    """
    A first component that looks like a registry host the config does not
    name is NameUnknown: the mirror is no open proxy.
    """
    with pytest.raises(NameUnknown):
        router.route(name)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("Busybox", id="uppercase"),
        pytest.param("../etc/passwd", id="dotdot"),
        pytest.param("/busybox", id="leading-slash"),
        pytest.param("a//b", id="empty-component"),
        pytest.param("localhost:5000/x", id="port"),
        pytest.param("a%2fb", id="percent"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("a" * 256, id="too-long"),
    ],
)
def test_name_off_grammar(router: Router, name: str) -> None:
    """A name that breaks the grammar is NameInvalid, whatever the routing."""
    with pytest.raises(NameInvalid):
        router.route(name)
    with pytest.raises(NameInvalid):
        router.route(name, ns="ghcr.io")
    with pytest.raises(NameInvalid):
        router.route(name, host="ghcr.mirror.example")


def test_prefix_only_name_invalid(router: Router) -> None:
    """``ghcr.io/`` leaves no repository: NameInvalid."""
    with pytest.raises(NameInvalid):
        router.route("ghcr.io/")


def test_library_prefix_too_long(router: Router) -> None:
    """
    A one-word name that fits 255 characters but not with ``library/`` added
    is NameInvalid, not a name the upstream would refuse.
    """
    with pytest.raises(NameInvalid):
        router.route("a" * 250)


def test_default_namespace_without_library() -> None:
    """With a default namespace that is not docker.io, bare names stay bare."""
    default = NamespaceConfig(
        name="registry.example", upstreams=("r",), origin="r", default=True
    )
    pool = _Pool("r")
    route = Router([(default, pool)]).route("busybox")
    assert route.namespace == default
    assert route.pool is pool
    assert route.repository == "busybox"


@pytest.mark.parametrize(
    ("name", "ns", "host", "namespace", "via"),
    [
        ("org/app", "ghcr.io", None, GHCR, "ns"),
        ("org/app", "Index.Docker.IO", "ghcr.mirror.example", DOCKER, "ns"),
        ("org/app", None, "GHCR.Mirror.Example:5000", GHCR, "host"),
        ("ghcr.io/org/app", None, "elsewhere.example", GHCR, "prefix"),
        ("index.docker.io/org/app", None, None, DOCKER, "prefix"),
        ("org/app", None, "elsewhere.example", DOCKER, "default"),
        ("org/app", None, None, DOCKER, "default"),
    ],
)
def test_a_route_says_what_chose_its_namespace(
    router: Router,
    name: str,
    ns: str | None,
    host: str | None,
    namespace: NamespaceConfig,
    via: str,
) -> None:
    """
    A route names what chose its namespace (``ns``, Host, the path prefix,
    or the default), so that the access check can challenge a client with a
    realm that routes its token request the same way.
    """
    route = router.route(name, ns=ns, host=host)
    assert (route.namespace, route.via) == (namespace, via)


LOCAL = NamespaceConfig(
    name="registry.local:5000",
    upstreams=("local",),
    origin="local",
    aliases=("10.0.0.7:5000",),
    hosts=("local.mirror.example:8443",),
)


@pytest.fixture
def with_port() -> Router:
    return Router(
        [(ns, _Pool(ns.name)) for ns in (DOCKER, GHCR, QUAY, LOCAL)],
    )


@pytest.mark.parametrize("prefix", ["registry.local:5000", "10.0.0.7:5000"])
def test_path_prefix_with_a_port_selects_namespace(
    with_port: Router, prefix: str
) -> None:
    """A namespace (or alias) named with its port is a path prefix too, the
    one place a colon may be in a name: ``registry.local:5000/app`` is
    ``app`` there (it was refused as an invalid name)."""
    route = with_port.route(f"{prefix}/team/app")
    assert route.namespace == LOCAL
    assert route.repository == "team/app"
    assert route.client_name == f"{prefix}/team/app"
    assert route.via == "prefix"
    # containerd, pointed at the prefix with override_path, sends ns too.
    route = with_port.route(f"{prefix}/app", ns="registry.local:5000")
    assert (route.namespace, route.repository, route.via) == (LOCAL, "app", "ns")


def test_names_with_a_port_reach_their_namespace_by_ns_and_host(
    with_port: Router,
) -> None:
    """``?ns=registry.local:5000`` and a ``Host`` listed with its port reach
    the namespace as before."""
    assert with_port.route("app", ns="registry.local:5000").namespace == LOCAL
    route = with_port.route("app", host="local.mirror.example:8443")
    assert (route.namespace, route.via) == (LOCAL, "host")


@pytest.mark.parametrize(
    ("name", "ns"),
    [
        ("registry.other:5000/app", None),  # no such namespace
        ("registry.local:5000:1/app", None),
        ("team/registry.local:5000/app", None),  # not the first component
        ("registry.local:5000/app:x", None),  # the rest obeys the grammar
        ("registry.local:5000/app", "ghcr.io"),  # ns names another namespace
    ],
)
def test_other_colons_in_names_stay_invalid(
    with_port: Router, name: str, ns: str | None
) -> None:
    """A colon anywhere else in a name is refused as before (400)."""
    with pytest.raises(NameInvalid):
        with_port.route(name, ns=ns)


def test_a_request_path_with_a_port_prefix_reaches_its_namespace(
    with_port: Router,
) -> None:
    """``GET /v2/registry.local:5000/app/manifests/v1``, as the API reads
    its path and routes it: namespace registry.local:5000, repository app."""
    from regmirror.reference import parse_api_path

    api = parse_api_path(b"/v2/registry.local:5000/app/manifests/v1")
    assert (api.endpoint, api.reference) == ("manifests", "v1")
    route = with_port.route(api.name)
    assert (route.namespace, route.repository) == (LOCAL, "app")


@pytest.mark.parametrize(
    ("name", "ns", "host"),
    [
        ("docker.io/ghcr.io/org/app", None, None),
        ("ghcr.io/org/app", "docker.io", None),
        ("quay.io/org/app", "docker.io", None),
        ("docker.io/gcr.io/google.com/app", None, None),
        ("docker.io/localhost/app", None, None),
        ("ghcr.io/org/app", None, "docker.mirror.example"),
    ],
)
def test_docker_hub_has_no_repository_whose_first_component_names_a_registry(
    router: Router, name: str, ns: str | None, host: str | None
) -> None:
    """
    A Docker Hub repository never starts with a registry's name (a dot, a
    port, ``localhost``: a client's reference would name that registry):
    ``ghcr.io/org/app`` in docker.io is refused, however the request named
    docker.io.  Asked of a plain upstream that is a mirror of several
    registries (a regional regmirror), it was taken as ghcr.io's, past
    this mirror's rules for ghcr.io (found by the fresh-eyes review).
    """
    with pytest.raises(NameUnknown, match="names a registry"):
        router.route(name, ns, host)


def test_other_namespaces_may_have_dots_in_their_first_component(
    router: Router,
) -> None:
    """gcr.io's domain-scoped projects (``google.com/project/app``)."""
    route = router.route("quay.io/google.com/project/app")
    assert (route.namespace.name, route.repository) == (
        "quay.io",
        "google.com/project/app",
    )
