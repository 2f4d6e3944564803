"""
The configuration as frozen values; :mod:`regmirror.ini` reads them from
the INI file.

The format's stable core is described in ``shared/CONFIG.md`` and README.rst.
Every error is a :class:`ConfigError` whose text is one line naming the file,
the section and the key.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from attrs import field, fields, frozen
from attrs.validators import in_

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: ``[namespace:NAME] prefetch``: its default, as many blobs ahead as
#: Docker pulls at once (README.rst says why), and the most it may be.
DEFAULT_PREFETCH = 3
MAX_PREFETCH = 64
#: ``[namespace:NAME] origin_retry`` unless given: how long a failed check
#: of a tag at the origin is remembered (README.rst says why)
DEFAULT_ORIGIN_RETRY = 30.0
#: ``[namespace:NAME] keep_warm_interval`` unless given.
DEFAULT_KEEP_WARM_INTERVAL = 600.0
#: The shortest ``keep_warm_interval``: each refresh asks the origin.
MIN_KEEP_WARM_INTERVAL = 1.0
#: ``[namespace:NAME] credentials``: the upstream's configured account
#: (the default), or each client's own.
CREDENTIALS = ("upstream", "passthrough")
#: ``[namespace:NAME] access_check_ttl`` unless given.
DEFAULT_ACCESS_CHECK_TTL = 60.0
#: ``[upstream:NAME] segments``: the most ranged GETs one blob is fetched
#: in at once, and the smallest blob fetched so (``segment_min_size``)
DEFAULT_SEGMENTS = 1
MAX_SEGMENTS = 16
DEFAULT_SEGMENT_MIN_SIZE = 64 * 1024**2
MIN_SEGMENT_MIN_SIZE = 1024**2


class ConfigError(Exception):
    """A problem in the configuration file, located by file, section and key."""

    def __init__(
        self, path: str, section: str | None, key: str | None, message: str
    ) -> None:
        self.path = path
        self.section = section
        self.key = key
        self.message = message
        where = path
        if section is not None:
            where += f": [{section}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {message}")


@frozen
class Secret:
    """
    A password or token: kept out of every ``repr``, ``str`` and log line.
    Only :meth:`reveal` gives the value, at the point of use.
    """

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


@frozen
class UpstreamConfig:
    """One upstream registry endpoint (``[upstream:NAME]``)."""

    name: str
    #: ``scheme://host[:port]``, the registry's root
    url: str
    connect_timeout: float = 10.0
    response_timeout: float = 30.0
    idle_timeout: float = 60.0
    username: str | None = None
    password: Secret | None = None
    #: a pre-issued bearer token, sent as is
    token: Secret | None = None
    #: hosts besides the upstream's registrable domain that may receive
    #: the credentials as a token realm
    token_realms: tuple[str, ...] = ()
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    insecure: bool = False
    #: ``http://host:port`` of an outbound proxy
    proxy: str | None = None
    #: failed answers in a row that mark the upstream down
    breaker_failures: int = 3
    #: how long a down upstream is skipped (doubling, up to ten times)
    breaker_backoff: float = 30.0
    #: a blob of at least ``segment_min_size`` bytes is fetched as this
    #: many ranged GETs at once (1: one GET)
    segments: int = field(
        default=DEFAULT_SEGMENTS, validator=in_(range(1, MAX_SEGMENTS + 1))
    )
    segment_min_size: int = DEFAULT_SEGMENT_MIN_SIZE
    #: put before every repository name sent (the path of ``url``: a
    #: mirror serving several registries by path, ``ghcr.io`` for
    #: ``https://m.daocloud.io/ghcr.io``); empty for none
    prefix: str = ""
    #: sent as ``?ns=`` with every request (a mirror that routes by
    #: containerd's parameter)
    ns: str | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def base(self) -> str:
        """Where this upstream's requests go, for people: the API root
        with the prefix and ``ns`` (``https://m.daocloud.io/v2/ghcr.io/``)."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        ns = f"?ns={self.ns}" if self.ns is not None else ""
        return f"{self.url}/v2/{prefix}{ns}"


@frozen
class WarmImage:
    """One image of ``[namespace:NAME] keep_warm``:
    ``repository:tag[@os/architecture[/variant]]``."""

    repository: str
    tag: str
    #: ``os/architecture[/variant]``; ``None``: every platform of an index
    platform: str | None = None

    def __str__(self) -> str:
        platform = f"@{self.platform}" if self.platform else ""
        return f"{self.repository}:{self.tag}{platform}"


@frozen
class NamespaceConfig:
    """One registry the mirror serves (``[namespace:NAME]``)."""

    name: str
    upstreams: tuple[str, ...]
    origin: str
    default: bool = False
    aliases: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    #: one-word repository names get ``library/`` (Docker Hub's convention)
    library: bool = False
    #: when the origin cannot be reached: ``freshest``, ``cache`` or ``fail``
    origin_unreachable: str = "freshest"
    #: how old (since the origin last confirmed it) a cached tag may be
    max_stale: float = 7 * 86400.0
    #: client networks that may pull this namespace without credentials;
    #: narrows ``[access] anonymous``
    anonymous: tuple[Network, ...] | None = None
    #: blobs fetched ahead of clients at once, in each process, when an
    #: image manifest is served (:mod:`regmirror.ahead`); 0: none
    prefetch: int = field(
        default=DEFAULT_PREFETCH, validator=in_(range(MAX_PREFETCH + 1))
    )
    #: overrides ``[cache] tag_ttl`` for this namespace (``None``: that one)
    tag_ttl: float | None = None
    #: tags matching one of these globs are asked of the origin once
    immutable_tags: tuple[str, ...] = ()
    #: a failed check of a tag at the origin is not repeated for this long
    origin_retry: float = DEFAULT_ORIGIN_RETRY
    #: past its TTL, a tag is answered from its record for this much longer
    #: while the origin is asked in the background (0: off)
    stale_while_revalidate: float = 0.0
    #: repository globs: with any, only matching repositories are served
    allow: tuple[str, ...] = ()
    #: repository globs refused (over ``allow``)
    deny: tuple[str, ...] = ()
    #: images re-resolved at the origin and fetched every
    #: ``keep_warm_interval``, before anyone asks
    keep_warm: tuple[WarmImage, ...] = ()
    keep_warm_interval: float = DEFAULT_KEEP_WARM_INTERVAL
    #: whose credentials the upstreams get: ``upstream`` (the upstream's
    #: configured account, or none) or ``passthrough`` (each client's own;
    #: the configured account stays for clients without credentials)
    credentials: str = field(default="upstream", validator=in_(CREDENTIALS))
    #: how long an upstream's "this client may read this repository" is
    #: believed (``credentials = passthrough``)
    access_check_ttl: float = DEFAULT_ACCESS_CHECK_TTL
    #: while the upstream cannot be reached, a passthrough client is
    #: served from the cache for repositories confirmed for it within this
    #: long (0: not at all)
    access_check_offline: float = 0.0

    @property
    def passthrough(self) -> bool:
        """Do clients' own credentials go to the upstreams?"""
        return self.credentials == "passthrough"


DEFAULT_LISTEN: tuple[str, ...] = ("tcp:5000",)


#: Where an upstream's redirects and token realms may never send the mirror
#: (its own host excepted): the mirror's own machine (loopback, "this
#: host"), the networks around it (RFC 1918, unique local and site-local
#: IPv6, the shared address space of RFC 6598), link-local addresses (cloud
#: metadata services live there: 169.254.169.254, fd00:ec2::254,
#: 100.100.100.200 are all inside), special-purpose ranges no CDN is on
#: (RFC 6890: IETF assignments, benchmarking, multicast, reserved, the
#: discard prefix) and the names of metadata services.
DEFAULT_DENY: tuple[Network | str, ...] = (
    *(
        ipaddress.ip_network(network)
        for network in (
            "0.0.0.0/8",
            "10.0.0.0/8",
            "100.64.0.0/10",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "172.16.0.0/12",
            "192.168.0.0/16",
            # special purpose (RFC 6890): no upstream's redirect leads there
            "192.0.0.0/24",
            "198.18.0.0/15",
            "224.0.0.0/4",
            "240.0.0.0/4",
            "::/128",
            "::1/128",
            "100::/64",
            "fc00::/7",
            "fe80::/10",
            "fec0::/10",
            "ff00::/8",
        )
    ),
    "metadata.google.internal",
    "metadata",
    "instance-data",
)


@frozen
class ServerConfig:
    listen: tuple[str, ...] = DEFAULT_LISTEN
    workers: int = 1
    #: separate listeners for /metrics; none: /metrics on the main ones
    metrics_listen: tuple[str, ...] = ()
    #: hosts that redirects and token realms may not lead to
    deny_hosts: tuple[Network | str, ...] = DEFAULT_DENY


@frozen
class S3Config:
    """
    The shared store of ``[cache] backend = s3``: finished blobs and
    manifests in an S3 bucket (AWS S3, Ceph RGW, MinIO, ...).
    """

    endpoint: str
    bucket: str
    region: str
    access_key: Secret
    secret_key: Secret
    #: ``path`` (endpoint/bucket/key) or ``virtual`` (bucket.endpoint/key)
    addressing: str = "path"
    #: evict the bucket's least recently used blobs beyond this many bytes
    #: (the index lives in the cluster's Redis)
    max_size: int | None = None
    #: answer blob GETs with a redirect to a presigned URL of the bucket
    redirect: bool = False
    #: how long such a URL stays good
    redirect_ttl: float = 600.0


@frozen
class CacheConfig:
    directory: str
    tag_ttl: float = 60.0
    #: evict least recently used content beyond this many bytes
    max_size: int | None = None
    #: and while the file system has less free space than this
    min_free: int | None = None
    #: the largest blob taken from an upstream that does not say its size
    max_blob_size: int = 64 * 1024**3
    #: ``None``: the local file system only (``backend = local``)
    s3: S3Config | None = None


@frozen
class ClusterConfig:
    """The ``[cluster]`` section: several nodes acting as one cache."""

    #: ``redis://host:port/db``, without credentials
    redis: str
    #: the URL other nodes use to reach this one
    advertise: str
    redis_password: Secret | None = None
    #: how long a download lease lasts without renewal
    lease_ttl: float = 5.0
    #: how long a Redis command may take before the node works alone
    redis_timeout: float = 1.0


#: What ``[access] forwarded_header`` may name, the default first.
FORWARDED_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


@frozen
class AccessConfig:
    """The ``[access]`` section."""

    #: client networks that may pull without credentials
    anonymous: tuple[Network, ...]
    htpasswd: str | None = None
    #: peers whose forwarding header (``forwarded_header``) and
    #: ``X-Forwarded-Proto`` are believed
    trusted_proxies: tuple[Network, ...] = ()
    #: lifetime of the tokens ``/token`` issues
    token_ttl: float = 300.0
    #: the one header naming the client that the trusted proxies set, in
    #: lower case: one of :data:`FORWARDED_HEADERS`; the others are ignored
    forwarded_header: str = field(
        default=FORWARDED_HEADERS[0], validator=in_(FORWARDED_HEADERS)
    )


EVERYONE: tuple[Network, ...] = (
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("::/0"),
)


@frozen
class Config:
    path: str
    server: ServerConfig
    cache: CacheConfig
    upstreams: dict[str, UpstreamConfig]
    namespaces: tuple[NamespaceConfig, ...]
    #: ``None``: no ``[access]`` section, everyone may pull
    access: AccessConfig | None = None
    #: ``None``: no ``[cluster]`` section, the node works alone
    cluster: ClusterConfig | None = None
    #: the file's text as it was read: what worker processes run (inline
    #: secrets included, hence out of every ``repr``)
    text: str = field(default="", repr=False, eq=False)

    @property
    def default_namespace(self) -> NamespaceConfig:
        return next(ns for ns in self.namespaces if ns.default)


#: What SIGHUP takes from the file read again (each namespace's); any
#: other change waits for a restart.
RELOADED = frozenset({"keep_warm", "keep_warm_interval"})


def restart_needed(old: Config, new: Config) -> list[str]:
    """
    Each ``[section] key`` (or whole ``[section]`` added or removed) that
    differs from *old*, the configuration running, to *new*, the file
    read again, and that SIGHUP does not apply (all but :data:`RELOADED`).
    """
    found: list[str] = []

    def compare(section: str, a: Any, b: Any, skip: frozenset[str]) -> None:
        if a is None or b is None:
            if (a is None) != (b is None):
                found.append(f"[{section}]")
            return
        found.extend(
            f"[{section}] {f.name}"
            for f in fields(type(a))
            if f.eq and f.name not in skip and getattr(a, f.name) != getattr(b, f.name)
        )

    for section in ("server", "cache", "access", "cluster"):
        compare(section, getattr(old, section), getattr(new, section), frozenset())
    for name in sorted(old.upstreams.keys() | new.upstreams.keys()):
        compare(
            f"upstream:{name}",
            old.upstreams.get(name),
            new.upstreams.get(name),
            frozenset(),
        )
    olds = {n.name: n for n in old.namespaces}
    news = {n.name: n for n in new.namespaces}
    for name in sorted(olds.keys() | news.keys()):
        compare(f"namespace:{name}", olds.get(name), news.get(name), RELOADED)
    return found
