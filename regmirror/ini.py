"""
The INI configuration file read into :mod:`regmirror.config`'s frozen
values, a section at a time; every problem is a
:class:`~regmirror.config.ConfigError` naming the file, the section and
the key.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Callable, Iterable
from typing import TypeVar

from regmirror.config import (
    CREDENTIALS,
    DEFAULT_ACCESS_CHECK_TTL,
    DEFAULT_DENY,
    DEFAULT_KEEP_WARM_INTERVAL,
    DEFAULT_LISTEN,
    DEFAULT_ORIGIN_RETRY,
    DEFAULT_PREFETCH,
    DEFAULT_SEGMENT_MIN_SIZE,
    DEFAULT_SEGMENTS,
    EVERYONE,
    FORWARDED_HEADERS,
    MAX_PREFETCH,
    MAX_SEGMENTS,
    MIN_KEEP_WARM_INTERVAL,
    MIN_SEGMENT_MIN_SIZE,
    AccessConfig,
    CacheConfig,
    ClusterConfig,
    Config,
    ConfigError,
    NamespaceConfig,
    Network,
    S3Config,
    Secret,
    ServerConfig,
    UpstreamConfig,
)
from regmirror.ini_values import (
    covers_a_family,
    existing_file,
    list_of,
    one_of,
    parse_bool,
    parse_bucket,
    parse_deny,
    parse_duration,
    parse_hostname,
    parse_networks,
    parse_proxy_url,
    parse_redis_url,
    parse_registry_url,
    parse_size,
    parse_upstream_url,
    positive,
    positive_int,
    repository_glob,
    resolve_endpoint_paths,
    tag_glob,
    warm_image,
    whole_number,
    words,
)
from regmirror.repositories import refusal

T = TypeVar("T")
_SECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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


def load(path: str) -> Config:
    """
    Read and validate the configuration file at *path*.

    :raises ConfigError: for any problem, naming file, section and key.
    """
    path = os.path.abspath(path)
    return parse(read(path), path)


def read(path: str) -> str:
    """
    The text of the configuration file at *path*.

    :raises ConfigError: when it cannot be read, or is not UTF-8.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, None, f"not UTF-8 text: {e.reason}") from None


def parse(text: str, path: str) -> Config:
    """
    Validate *text*, the configuration file at *path* as it was read
    (relative paths resolve against *path*'s folder).

    :raises ConfigError: for any problem, naming file, section and key.
    """
    path = os.path.abspath(path)
    base = os.path.dirname(path)
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00")
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateOptionError as e:
        raise ConfigError(
            path, e.section, e.option, f"given twice (line {e.lineno})"
        ) from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError(
            path, e.section, None, f"section given twice (line {e.lineno})"
        ) from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(
            path, None, None, f"line {e.lineno}: text before the first [section]"
        ) from None
    except configparser.ParsingError as e:
        raise ConfigError(path, None, None, _unparsable(e)) from None
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
    _check_routed_upstreams(path, namespaces, upstreams)
    for ns in namespaces if access is None else ():
        if ns.anonymous is not None:
            # Without [access] everyone may pull: a namespace that says
            # otherwise would be open although its section says closed.
            raise ConfigError(
                path,
                f"namespace:{ns.name}",
                "anonymous",
                "needs an [access] section (without one everyone may pull)",
            )
    if cache.s3 is not None and cache.s3.max_size is not None and cluster is None:
        raise ConfigError(
            path,
            "cache",
            "s3_max_size",
            "needs a [cluster] section (the bucket's index lives in its Redis)",
        )
    return Config(
        path, server, cache, upstreams, namespaces, access, cluster, text=text
    )


def _unparsable(error: configparser.ParsingError) -> str:
    """
    Where the first line configparser could not read is, and what is wrong;
    not the line itself, which may be a secret pasted on a line of its own.
    """
    lineno = error.errors[0][0]
    message = (
        f"line {lineno} is not a [section], a key = value, an indented "
        "continuation or a comment"
    )
    if len(error.errors) > 1:
        message += f" (and {len(error.errors) - 1} more such lines)"
    return message


def _server(reader: _Reader, base: str) -> ServerConfig:
    if "listen" in reader.values and not reader.values["listen"].strip():
        # Not the default (every interface's port 5000): whoever wrote the
        # key meant something else.
        raise reader.error(
            "listen", "is empty: name at least one endpoint, e.g. tcp:5000"
        )
    listen: tuple[str, ...] = tuple(
        resolve_endpoint_paths(desc, base)
        for desc in reader.get("listen", words, DEFAULT_LISTEN)
    )
    metrics_listen: tuple[str, ...] = tuple(
        resolve_endpoint_paths(desc, base)
        for desc in reader.get("metrics_listen", words, tuple[str, ...]())
    )
    workers = reader.get("workers", positive_int, 1)
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
    backend = reader.get("backend", one_of("local", "s3"), "local")
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
        addressing=reader.get("s3_addressing", one_of("path", "virtual"), "path"),
        max_size=reader.get("s3_max_size", parse_size, None),
        redirect=reader.get("redirect", parse_bool, False),
        redirect_ttl=reader.get("redirect_ttl", positive(parse_duration), 600.0),
    )


def _cluster(reader: _Reader, base: str) -> ClusterConfig:
    positive_duration = positive(parse_duration)
    cluster = ClusterConfig(
        redis=reader.get("redis", parse_redis_url, required=True),
        advertise=reader.get("advertise", parse_upstream_url, required=True),
        redis_password=_secret(reader, "redis_password", base),
        lease_ttl=reader.get("lease_ttl", positive_duration, 5.0),
        redis_timeout=reader.get("redis_timeout", positive_duration, 1.0),
    )
    reader.finish()
    return cluster


def _access(reader: _Reader, base: str) -> AccessConfig:
    path = existing_file(base)

    trusted: tuple[Network, ...] = reader.get("trusted_proxies", parse_networks, ())
    if covers_a_family(trusted):
        raise reader.error(
            "trusted_proxies",
            "trusts every peer's forwarding header, so any client chooses its "
            "address: list only the proxies in front",
        )
    access = AccessConfig(
        anonymous=reader.get("anonymous", parse_networks, EVERYONE),
        htpasswd=reader.get("htpasswd", path, None),
        trusted_proxies=trusted,
        token_ttl=reader.get("token_ttl", positive(parse_duration), 300.0),
        forwarded_header=reader.get(
            "forwarded_header", one_of(*FORWARDED_HEADERS), FORWARDED_HEADERS[0]
        ),
    )
    reader.finish()
    return access


def _upstream(reader: _Reader, name: str, base: str) -> UpstreamConfig:
    positive_duration = positive(parse_duration)

    path = existing_file(base)

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
    segments = reader.get("segments", positive_int, DEFAULT_SEGMENTS)
    if segments > MAX_SEGMENTS:
        raise reader.error("segments", f"at most {MAX_SEGMENTS}")
    segment_min_size = reader.get(
        "segment_min_size", parse_size, DEFAULT_SEGMENT_MIN_SIZE
    )
    if segment_min_size < MIN_SEGMENT_MIN_SIZE:
        raise reader.error("segment_min_size", "at least 1MiB")
    url, prefix = reader.get("url", parse_registry_url, required=True)
    upstream = UpstreamConfig(
        name=name,
        url=url,
        connect_timeout=reader.get("connect_timeout", positive_duration, 10.0),
        response_timeout=reader.get("response_timeout", positive_duration, 30.0),
        idle_timeout=reader.get("idle_timeout", positive_duration, 60.0),
        username=username.strip() if username else None,
        password=password,
        token=token,
        token_realms=reader.get("token_realms", list_of(parse_hostname), ()),
        ca_file=reader.get("ca_file", path, None),
        client_cert=client_cert,
        client_key=client_key,
        insecure=reader.get("insecure", parse_bool, False),
        proxy=reader.get("proxy", parse_proxy_url, None),
        breaker_failures=reader.get("breaker_failures", positive_int, 3),
        breaker_backoff=reader.get("breaker_backoff", positive_duration, 30.0),
        segments=segments,
        segment_min_size=segment_min_size,
        prefix=prefix,
        ns=reader.get("ns", parse_hostname, None),
    )
    named = [s for s in prefix.split("/") if "." in s or ":" in s or s == "localhost"]
    if upstream.ns is not None and named and named[-1] != upstream.ns:
        # A mirror that routes by ns first would serve ns's registry.
        raise reader.error(
            "ns",
            f"{upstream.ns} is another registry than the path's {named[-1]}: name one",
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
    listed = reader.get("upstreams", words, required=True)
    for upstream in listed:
        if upstream not in upstreams:
            raise reader.error("upstreams", f"no [upstream:{upstream}] section")
    if len(set(listed)) != len(listed):
        raise reader.error("upstreams", "an upstream is listed twice")
    origin = reader.get("origin", str, listed[-1]).strip()
    if origin not in listed:
        raise reader.error("origin", f"{origin!r} is not in this namespace's upstreams")
    aliases: tuple[str, ...] = reader.get("aliases", list_of(parse_hostname), ())
    prefetch = reader.get("prefetch", whole_number, DEFAULT_PREFETCH)
    if prefetch > MAX_PREFETCH:
        raise reader.error("prefetch", f"at most {MAX_PREFETCH}")
    namespace = NamespaceConfig(
        name=name,
        upstreams=listed,
        origin=origin,
        default=reader.get("default", parse_bool, False),
        aliases=aliases,
        hosts=reader.get("hosts", list_of(parse_hostname), tuple[str, ...]()),
        library=reader.get("library", parse_bool, "docker.io" in (name, *aliases)),
        origin_unreachable=reader.get(
            "origin_unreachable", one_of("freshest", "cache", "fail"), "freshest"
        ),
        max_stale=reader.get("max_stale", parse_duration, 7 * 86400.0),
        anonymous=reader.get("anonymous", parse_networks, None),
        prefetch=prefetch,
        tag_ttl=reader.get("tag_ttl", parse_duration, None),
        immutable_tags=reader.get("immutable_tags", list_of(tag_glob), ()),
        origin_retry=reader.get("origin_retry", parse_duration, DEFAULT_ORIGIN_RETRY),
        stale_while_revalidate=reader.get(
            "stale_while_revalidate", parse_duration, 0.0
        ),
        allow=reader.get("allow", list_of(repository_glob), ()),
        deny=reader.get("deny", list_of(repository_glob), ()),
        keep_warm=reader.get("keep_warm", list_of(warm_image), ()),
        keep_warm_interval=reader.get(
            "keep_warm_interval", positive(parse_duration), DEFAULT_KEEP_WARM_INTERVAL
        ),
        credentials=reader.get("credentials", one_of(*CREDENTIALS), "upstream"),
        access_check_ttl=reader.get(
            "access_check_ttl", parse_duration, DEFAULT_ACCESS_CHECK_TTL
        ),
        access_check_offline=reader.get("access_check_offline", parse_duration, 0.0),
    )
    if namespace.library:
        for key in ("allow", "deny"):
            for pattern in getattr(namespace, key):
                if "/" not in pattern and not set("*?[") & set(pattern):
                    raise reader.error(
                        key,
                        f"{pattern} never matches: one-word names are read as "
                        f"library/{pattern} here",
                    )
    if namespace.keep_warm_interval < MIN_KEEP_WARM_INTERVAL:
        raise reader.error(
            "keep_warm_interval", f"at least {MIN_KEEP_WARM_INTERVAL:g}s"
        )
    for image in namespace.keep_warm:
        if image.repository.split("/")[0] in (name, *aliases):
            raise reader.error(
                "keep_warm",
                f"{image}: name it within the namespace, without "
                f"{image.repository.split('/')[0]}/",
            )
        # Kept warm is fetched upstream: never a repository the rules refuse.
        repository = image.repository
        if namespace.library and "/" not in repository:
            repository = f"library/{repository}"
        why = refusal(namespace, repository)
        if why is not None:
            raise reader.error("keep_warm", f"{image}: {why}")
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
        first = next(iter(namespaces)).name
        raise ConfigError(
            path,
            f"namespace:{first}",
            "default",
            "no namespace has default = true (the one that serves bare names "
            "and Docker's registry-mirrors): set it here or in another",
        )
    if len(defaults) > 1:
        raise ConfigError(
            path,
            f"namespace:{defaults[1]}",
            "default",
            f"only one namespace may be the default (also {defaults[0]})",
        )


def _check_routed_upstreams(
    path: str,
    namespaces: Iterable[NamespaceConfig],
    upstreams: dict[str, UpstreamConfig],
) -> None:
    """
    An upstream reached through a path prefix or ``ns`` is one registry of
    a mirror of several: in a second namespace it would answer that
    namespace's tags and vouch for its content with the first registry's.
    """
    used: dict[tuple[str, str, str | None], str] = {}
    for ns in namespaces:
        for name in ns.upstreams:
            upstream = upstreams[name]
            if not upstream.prefix and upstream.ns is None:
                continue
            # By where its requests go, not its section's name: two sections
            # with the same URL and ns are the same registry.
            where = (upstream.url, upstream.prefix, upstream.ns)
            if where in used and used[where] != ns.name:
                routed = (
                    f"path prefix {upstream.prefix}"
                    if upstream.prefix
                    else f"ns = {upstream.ns}"
                )
                raise ConfigError(
                    path,
                    f"namespace:{ns.name}",
                    "upstreams",
                    f"[upstream:{name}] ({routed}) serves "
                    f"[namespace:{used[where]}]; give this namespace an "
                    "[upstream:NAME] of its own",
                )
            used[where] = ns.name
