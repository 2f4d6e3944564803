"""
The INI configuration file, read into frozen values.

The format's stable core is described in ``shared/CONFIG.md`` and README.rst.
Every error is a :class:`ConfigError` whose text is one line naming the file,
the section and the key.
"""

from __future__ import annotations

import configparser
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit

from attrs import field, frozen
from attrs.validators import in_

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""


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


DEFAULT_LISTEN: tuple[str, ...] = ("tcp:5000",)


#: Where an upstream's redirects and token realms may never send the mirror
#: (its own host excepted): the mirror's own machine (loopback, "this
#: host"), the networks around it (RFC 1918, unique local and site-local
#: IPv6, the shared address space of RFC 6598), link-local addresses (cloud
#: metadata services live there: 169.254.169.254, fd00:ec2::254,
#: 100.100.100.200 are all inside) and the names of metadata services.
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
            "::/128",
            "::1/128",
            "fc00::/7",
            "fe80::/10",
            "fec0::/10",
        )
    ),
    "metadata.google.internal",
    "metadata",
)


def parse_deny(text: str) -> tuple[Network | str, ...]:
    """Addresses, CIDRs and host names, or ``none``."""
    if text.split() == ["none"]:
        return ()
    denied: list[Network | str] = []
    for word in text.split():
        try:
            denied.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            denied.append(parse_hostname(word))
    return tuple(denied)


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


def parse_networks(text: str) -> tuple[Network, ...]:
    """``any``, ``none``, or addresses and CIDRs separated by white space."""
    words = text.split()
    if words == ["any"]:
        return EVERYONE
    if words == ["none"]:
        return ()
    try:
        return tuple(ipaddress.ip_network(word, strict=False) for word in words)
    except ValueError as e:
        raise ValueError(f"use any, none, or addresses and CIDRs: {e}") from None


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

    @property
    def default_namespace(self) -> NamespaceConfig:
        return next(ns for ns in self.namespaces if ns.default)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, None: 1}
for _i, _p in enumerate("kmgt", start=1):
    _SIZE_UNITS[f"{_p}b"] = 1000**_i
    _SIZE_UNITS[f"{_p}ib"] = 1024**_i
_HOSTNAME = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
    r"(?::[0-9]{1,5})?"
)
_SECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Keywords of Twisted's ssl:/tls: endpoint strings that name files.
_ENDPOINT_FILE_KEYS = frozenset(
    {"privateKey", "certKey", "extraCertChain", "caCertsDir", "dhParameters"}
)


def parse_duration(text: str) -> float:
    """``90s``, ``5m``, ``2h``, ``7d``, ``250ms``; a bare number is seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 5m, 2h, 7d)")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"duration out of range: {text[:40]!r}")
    return seconds


def parse_size(text: str) -> int:
    """``512MiB``, ``50GiB``, ``1TB``; a bare number is bytes."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 50GiB, 1TB)")
    unit = match.group(2).lower() if match.group(2) else None
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def parse_hostname(text: str) -> str:
    """A registry host name, optionally with a port, lower-cased."""
    lowered = text.strip().lower()
    if _HOSTNAME.fullmatch(lowered) is None or len(lowered) > 253:
        raise ValueError(f"not a host name: {text!r}")
    return lowered


def _split_url(text: str, schemes: tuple[str, ...], credentials: str) -> SplitResult:
    """
    The parts of a URL with one of *schemes*, a host, a valid port and no
    credentials (*credentials* says where they go instead).
    """
    if any(c.isspace() for c in text.strip()):
        raise ValueError(f"URL contains white space: {text!r}")
    parts = urlsplit(text.strip())
    if parts.scheme not in schemes:
        starts = " or ".join(f"{scheme}://" for scheme in schemes)
        raise ValueError(f"URL must start with {starts}: {text!r}")
    if not parts.hostname:
        raise ValueError(f"URL has no host: {text!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(credentials)
    try:
        parts.port  # noqa: B018  (raises for a bad port)
    except ValueError:
        raise ValueError(f"URL has a bad port: {text!r}") from None
    return parts


def parse_upstream_url(text: str) -> str:
    """An ``http(s)://host[:port]`` URL with no path, query or credentials."""
    parts = _split_url(text, ("http", "https"), "credentials do not belong in the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"URL must name only scheme, host and port: {text!r}")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def parse_proxy_url(text: str) -> str:
    """An ``http://host:port`` outbound proxy."""
    url = parse_upstream_url(text)
    if not url.startswith("http://"):
        raise ValueError(f"only http:// proxies are supported: {text!r}")
    return url


def resolve_endpoint_paths(description: str, base: str) -> str:
    """
    Make the file names in a Twisted endpoint string absolute, relative to
    *base*, so that ``certKey=cert.pem`` means the file next to the config.
    """
    pieces = re.split(r"(?<!\\):", description)
    for index, piece in enumerate(pieces[1:], start=1):
        key, equals, value = piece.partition("=")
        if equals and key in _ENDPOINT_FILE_KEYS and value:
            path = value.replace("\\:", ":")
            if not os.path.isabs(path):
                path = os.path.join(base, path)
            pieces[index] = f"{key}={path.replace(':', chr(92) + ':')}"
    return ":".join(pieces)


class _Reader:
    """Reads one section's keys, turning every problem into a ConfigError."""

    def __init__(self, path: str, parser: configparser.ConfigParser, section: str):
        self.path = path
        self.section = section
        self.values = dict(parser.items(section))
        self.used: set[str] = set()
        self.finished = False

    def error(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(self.path, self.section, key, message)

    def get(
        self,
        key: str,
        convert: Callable[[str], T],
        default: T | None = None,
        required: bool = False,
    ) -> T:
        # A key read after finish() would be refused as unknown first.
        assert not self.finished, f"[{self.section}] {key} read after finish()"
        self.used.add(key)
        raw = self.values.get(key)
        if raw is None or raw.strip() == "":
            if required:
                raise self.error(key, "is required")
            return default  # type: ignore[return-value]
        try:
            return convert(raw)
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def reject(self, key: str, message: str) -> None:
        if key in self.values:
            raise self.error(key, message)

    def finish(self) -> None:
        self.finished = True
        for key in self.values:
            if key not in self.used:
                raise self.error(key, "unknown key")


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _list_of(convert: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    def parse(text: str) -> tuple[T, ...]:
        return tuple(convert(word) for word in text.split())

    return parse


def _positive(convert: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = convert(text)
        if value <= 0:
            raise ValueError(f"must be greater than zero: {text!r}")
        return value

    return parse


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}: {text!r}")
        return value

    return parse


def _positive_int(text: str) -> int:
    stripped = text.strip()
    if not stripped.isdigit() or int(stripped) <= 0:
        raise ValueError(f"must be a whole number greater than zero: {text[:40]!r}")
    return int(stripped)


def load(path: str) -> Config:
    """
    Read and validate the configuration file at *path*.

    :raises ConfigError: for any problem, naming file, section and key.
    """
    path = os.path.abspath(path)
    base = os.path.dirname(path)
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, None, f"not UTF-8 text: {e.reason}") from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(path, e.section, e.option, "given twice") from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError(path, e.section, None, "section given twice") from None
    except configparser.Error as e:
        message = str(e).splitlines()[0]
        raise ConfigError(path, None, None, message) from None

    upstreams: dict[str, UpstreamConfig] = {}
    namespace_sections: list[tuple[str, _Reader]] = []
    server = ServerConfig()
    cache: CacheConfig | None = None
    access: AccessConfig | None = None
    cluster: ClusterConfig | None = None

    for section in parser.sections():
        kind, colon, name = section.partition(":")
        reader = _Reader(path, parser, section)
        if colon and kind in ("upstream", "namespace"):
            if kind == "upstream" and _SECTION_NAME.fullmatch(name) is None:
                raise reader.error(None, f"bad upstream name {name!r}")
            if kind == "upstream":
                upstreams[name] = _upstream(reader, name, base)
            else:
                namespace_sections.append((name, reader))
        elif section == "server":
            server = _server(reader, base)
        elif section == "cache":
            cache = _cache(reader, base)
        elif section == "access":
            access = _access(reader, base)
        elif section == "cluster":
            cluster = _cluster(reader, base)
        else:
            raise reader.error(None, "unknown section")

    if cache is None:
        raise ConfigError(path, "cache", "directory", "is required")
    namespaces = tuple(
        _namespace(reader, name, upstreams) for name, reader in namespace_sections
    )
    _check_namespaces(path, namespaces)
    if cache.s3 is not None and cache.s3.max_size is not None and cluster is None:
        raise ConfigError(
            path,
            "cache",
            "s3_max_size",
            "needs a [cluster] section (the bucket's index lives in its Redis)",
        )
    return Config(path, server, cache, upstreams, namespaces, access, cluster)


def _server(reader: _Reader, base: str) -> ServerConfig:
    listen: tuple[str, ...] = tuple(
        resolve_endpoint_paths(desc, base)
        for desc in reader.get("listen", _words, DEFAULT_LISTEN)
    )
    metrics_listen: tuple[str, ...] = tuple(
        resolve_endpoint_paths(desc, base)
        for desc in reader.get("metrics_listen", _words, tuple[str, ...]())
    )
    workers = reader.get("workers", _positive_int, 1)
    if workers > 64:
        raise reader.error("workers", "at most 64")
    deny_hosts = reader.get("deny_hosts", parse_deny, DEFAULT_DENY)
    reader.finish()
    return ServerConfig(
        listen=listen,
        workers=workers,
        metrics_listen=metrics_listen,
        deny_hosts=deny_hosts,
    )


def _cache(reader: _Reader, base: str) -> CacheConfig:
    directory = reader.get("directory", str, required=True).strip()
    directory = os.path.normpath(os.path.join(base, directory))
    tag_ttl = reader.get("tag_ttl", parse_duration, 60.0)
    max_size = reader.get("max_size", parse_size, None)
    min_free = reader.get("min_free", parse_size, None)
    max_blob_size = reader.get("max_blob_size", parse_size, 64 * 1024**3)
    backend = reader.get("backend", _one_of("local", "s3"), "local")
    s3 = _s3(reader, base) if backend == "s3" else None
    if s3 is None:
        for key in reader.values:
            if key.startswith("s3_") or key in ("redirect", "redirect_ttl"):
                raise reader.error(key, "needs backend = s3")
    reader.finish()
    return CacheConfig(
        directory=directory,
        tag_ttl=tag_ttl,
        max_size=max_size,
        min_free=min_free,
        max_blob_size=max_blob_size,
        s3=s3,
    )


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_bucket(text: str) -> str:
    """An S3 bucket name: 3 to 63 lower-case letters, digits, dots, hyphens."""
    name = text.strip()
    if _BUCKET.fullmatch(name) is None or ".." in name:
        raise ValueError(
            f"not an S3 bucket name: {text!r} (3 to 63 of a-z, 0-9, '.', '-')"
        )
    return name


def _s3(reader: _Reader, base: str) -> S3Config:
    access_key = _secret(reader, "s3_access_key", base)
    secret_key = _secret(reader, "s3_secret_key", base)
    if access_key is None:
        raise reader.error(
            "s3_access_key_file", "is required (or s3_access_key_env, s3_access_key)"
        )
    if secret_key is None:
        raise reader.error(
            "s3_secret_key_file", "is required (or s3_secret_key_env, s3_secret_key)"
        )
    return S3Config(
        endpoint=reader.get("s3_endpoint", parse_upstream_url, required=True),
        bucket=reader.get("s3_bucket", parse_bucket, required=True),
        region=reader.get("s3_region", str, "us-east-1").strip(),
        access_key=access_key,
        secret_key=secret_key,
        addressing=reader.get("s3_addressing", _one_of("path", "virtual"), "path"),
        max_size=reader.get("s3_max_size", parse_size, None),
        redirect=reader.get("redirect", parse_bool, False),
        redirect_ttl=reader.get("redirect_ttl", _positive(parse_duration), 600.0),
    )


def parse_redis_url(text: str) -> str:
    """``redis://host[:port][/db]``; the password goes in ``redis_password``."""
    parts = _split_url(
        text, ("redis",), "no credentials in the URL: use redis_password_file"
    )
    if parts.query or parts.fragment or not re.fullmatch(r"/?|/\d{1,2}", parts.path):
        raise ValueError(f"URL must name only host, port and database: {text!r}")
    return text.strip()


def _cluster(reader: _Reader, base: str) -> ClusterConfig:
    positive = _positive(parse_duration)
    cluster = ClusterConfig(
        redis=reader.get("redis", parse_redis_url, required=True),
        advertise=reader.get("advertise", parse_upstream_url, required=True),
        redis_password=_secret(reader, "redis_password", base),
        lease_ttl=reader.get("lease_ttl", positive, 5.0),
        redis_timeout=reader.get("redis_timeout", positive, 1.0),
    )
    reader.finish()
    return cluster


def _existing_file(base: str) -> Callable[[str], str]:
    """A converter: a file name, relative to *base*, of a file that exists."""

    def path(text: str) -> str:
        resolved = os.path.join(base, text.strip())
        if not os.path.isfile(resolved):
            raise ValueError(f"no such file: {resolved}")
        return resolved

    return path


def _access(reader: _Reader, base: str) -> AccessConfig:
    path = _existing_file(base)

    access = AccessConfig(
        anonymous=reader.get("anonymous", parse_networks, EVERYONE),
        htpasswd=reader.get("htpasswd", path, None),
        trusted_proxies=reader.get("trusted_proxies", parse_networks, ()),
        token_ttl=reader.get("token_ttl", _positive(parse_duration), 300.0),
        forwarded_header=reader.get(
            "forwarded_header", _one_of(*FORWARDED_HEADERS), FORWARDED_HEADERS[0]
        ),
    )
    reader.finish()
    return access


def _upstream(reader: _Reader, name: str, base: str) -> UpstreamConfig:
    positive = _positive(parse_duration)

    path = _existing_file(base)

    username = reader.get("username", str, None)
    password = _secret(reader, "password", base)
    token = _secret(reader, "token", base)
    if password is not None and not username:
        raise reader.error("password", "needs a username")
    if username and password is None:
        raise reader.error("username", "needs password, password_file or password_env")
    if token is not None and username:
        raise reader.error("token", "give either username and password, or token")
    client_cert = reader.get("client_cert", path, None)
    client_key = reader.get("client_key", path, None)
    if client_key is not None and client_cert is None:
        raise reader.error("client_key", "needs client_cert")
    upstream = UpstreamConfig(
        name=name,
        url=reader.get("url", parse_upstream_url, required=True),
        connect_timeout=reader.get("connect_timeout", positive, 10.0),
        response_timeout=reader.get("response_timeout", positive, 30.0),
        idle_timeout=reader.get("idle_timeout", positive, 60.0),
        username=username.strip() if username else None,
        password=password,
        token=token,
        token_realms=reader.get("token_realms", _list_of(parse_hostname), ()),
        ca_file=reader.get("ca_file", path, None),
        client_cert=client_cert,
        client_key=client_key,
        insecure=reader.get("insecure", parse_bool, False),
        proxy=reader.get("proxy", parse_proxy_url, None),
        breaker_failures=reader.get("breaker_failures", _positive_int, 3),
        breaker_backoff=reader.get("breaker_backoff", positive, 30.0),
    )
    reader.finish()
    return upstream


def _secret(reader: _Reader, key: str, base: str) -> Secret | None:
    """
    A secret given one of three ways: ``KEY`` inline, ``KEY_file`` (a path,
    e.g. a systemd credential or a mounted Kubernetes secret) or ``KEY_env``
    (the name of an environment variable).
    """
    given = [k for k in (key, f"{key}_file", f"{key}_env") if k in reader.values]
    if len(given) > 1:
        raise reader.error(given[1], f"give only one of {', '.join(given)}")
    if not given:
        return None
    chosen = given[0]
    raw = reader.get(chosen, str, required=True).strip()
    if chosen.endswith("_file"):
        location = os.path.join(base, raw)
        try:
            with open(location, encoding="utf-8") as f:
                value = f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise reader.error(chosen, f"cannot read {location}: {e}") from None
    elif chosen.endswith("_env"):
        value = os.environ.get(raw, "")
        if not value:
            raise reader.error(chosen, f"environment variable {raw} is not set")
    else:
        value = raw
    if not value:
        raise reader.error(chosen, "is empty")
    return Secret(value)


def _namespace(
    reader: _Reader, name: str, upstreams: dict[str, UpstreamConfig]
) -> NamespaceConfig:
    try:
        name = parse_hostname(name)
    except ValueError as e:
        raise reader.error(
            None, f"namespace must be a registry host name: {e}"
        ) from None
    listed = reader.get("upstreams", _words, required=True)
    for upstream in listed:
        if upstream not in upstreams:
            raise reader.error("upstreams", f"no [upstream:{upstream}] section")
    if len(set(listed)) != len(listed):
        raise reader.error("upstreams", "an upstream is listed twice")
    origin = reader.get("origin", str, listed[-1]).strip()
    if origin not in listed:
        raise reader.error("origin", f"{origin!r} is not in this namespace's upstreams")
    aliases: tuple[str, ...] = reader.get("aliases", _list_of(parse_hostname), ())
    namespace = NamespaceConfig(
        name=name,
        upstreams=listed,
        origin=origin,
        default=reader.get("default", parse_bool, False),
        aliases=aliases,
        hosts=reader.get("hosts", _list_of(parse_hostname), tuple[str, ...]()),
        library=reader.get("library", parse_bool, "docker.io" in (name, *aliases)),
        origin_unreachable=reader.get(
            "origin_unreachable", _one_of("freshest", "cache", "fail"), "freshest"
        ),
        max_stale=reader.get("max_stale", parse_duration, 7 * 86400.0),
        anonymous=reader.get("anonymous", parse_networks, None),
    )
    reader.finish()
    return namespace


def _check_namespaces(path: str, namespaces: Iterable[NamespaceConfig]) -> None:
    seen: dict[str, str] = {}
    hosts: dict[str, str] = {}
    defaults = []
    for ns in namespaces:
        section = f"namespace:{ns.name}"
        for alias in (ns.name, *ns.aliases):
            if alias in seen:
                raise ConfigError(
                    path,
                    section,
                    "aliases",
                    f"{alias!r} is also [namespace:{seen[alias]}]",
                )
            seen[alias] = ns.name
        for host in ns.hosts:
            if host in hosts:
                raise ConfigError(
                    path,
                    section,
                    "hosts",
                    f"{host!r} is also in [namespace:{hosts[host]}]",
                )
            hosts[host] = ns.name
        if ns.default:
            defaults.append(ns.name)
    if not seen:
        raise ConfigError(path, None, None, "no [namespace:NAME] section")
    if not defaults:
        raise ConfigError(path, None, None, "no namespace has default = true")
    if len(defaults) > 1:
        raise ConfigError(
            path,
            f"namespace:{defaults[1]}",
            "default",
            f"only one namespace may be the default (also {defaults[0]})",
        )
