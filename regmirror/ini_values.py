"""
One key's text into a value: durations, sizes, booleans, host names,
URLs, networks, endpoint strings; each raises ``ValueError`` with a line
that :mod:`regmirror.ini` puts after the file, section and key.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

from regmirror.config import EVERYONE, Network, WarmImage
from regmirror.errors import RegistryError
from regmirror.reference import split_tagged

T = TypeVar("T")

# [0-9], not \d: int() and float() take the digits of every script
# (``٢``, ``２``), which a configuration has no business holding.
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_DIGITS = re.compile(r"[0-9]+")
_SIZE_UNITS = {"b": 1, None: 1}
for _i, _p in enumerate("kmgt", start=1):
    _SIZE_UNITS[f"{_p}b"] = 1000**_i
    _SIZE_UNITS[f"{_p}ib"] = 1024**_i
_HOSTNAME = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
    r"(?::[0-9]{1,5})?"
)
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
    """A registry host name, optionally with a port (1 to 65535),
    lower-cased."""
    lowered = text.strip().lower()
    if not _is_hostname(lowered):
        raise ValueError(f"not a host name: {text!r}")
    return lowered


def _is_hostname(text: str) -> bool:
    """Is *text* a host name, with a port from 1 to 65535 if any?"""
    if _HOSTNAME.fullmatch(text) is None or len(text) > 253:
        return False
    port = text.partition(":")[2]
    return not port or 1 <= int(port) <= 65535


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


#: One segment of an upstream's path prefix: a repository path component
#: (the OCI grammar's) or a host name with an optional port.
_PREFIX_SEGMENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


def parse_registry_url(text: str) -> tuple[str, str]:
    """
    An upstream's ``url``: ``http(s)://host[:port]`` and an optional path,
    which is put before every repository name sent to it (a mirror that
    serves several registries by path: ``https://m.daocloud.io/ghcr.io``).

    Trailing slashes are dropped and percent-escapes decoded; each segment
    must be a repository path component or a host name (what a registry
    routes on), so the prefix needs no escaping and cannot step outside
    ``/v2/``.

    :return: ``(scheme://host[:port], prefix)``, the prefix without
        slashes at either end, empty when there is none.
    """
    parts = _split_url(text, ("http", "https"), "credentials do not belong in the URL")
    if parts.query or parts.fragment:
        hint = " (for ?ns= use the ns key)" if "ns=" in parts.query else ""
        raise ValueError(f"URL must have no query or fragment{hint}: {text!r}")
    root = f"{parts.scheme}://{parts.netloc.lower()}"
    path = parts.path.rstrip("/")
    if not path:
        return root, ""
    segments = [unquote(segment).lower() for segment in path[1:].split("/")]
    for segment in segments:
        if not (_PREFIX_SEGMENT.fullmatch(segment) or _is_hostname(segment)):
            raise ValueError(
                f"path segment {segment[:40]!r} is no repository name component "
                f"or host name: {text!r}"
            )
    if segments[0] == "v2":
        meant = "/".join([root, *segments[1:]])
        raise ValueError(
            "the path is put before repository names, after the /v2/ the "
            f"mirror adds: write {meant}, not {text!r}"
        )
    prefix = "/".join(segments)
    if len(prefix) > 200:
        raise ValueError(f"path prefix longer than 200 characters: {text[:60]!r}")
    return root, prefix


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


def covers_a_family(networks: tuple[Network, ...]) -> bool:
    """
    Do *networks* together hold every IPv4 address, or every IPv6 one
    (``0.0.0.0/0``, but also ``0.0.0.0/1 128.0.0.0/1``)?
    """
    v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    return any(n.prefixlen == 0 for n in ipaddress.collapse_addresses(v4)) or any(
        n.prefixlen == 0 for n in ipaddress.collapse_addresses(v6)
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


def words(text: str) -> tuple[str, ...]:
    """Words separated by white space."""
    return tuple(text.split())


_TAG_GLOB = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,128}")


def tag_glob(text: str) -> str:
    """A shell-style glob of tags (``v[0-9]*``, ``sha-*``): only what a tag
    may hold (letters, digits, ``_.-``) and ``* ? [ ] !``, its sets
    closed."""
    if _TAG_GLOB.fullmatch(text) is None or not _sets_closed(text):
        raise ValueError(f"not a tag pattern: {text[:40]!r} (use e.g. v[0-9]* sha-*)")
    return text


def _sets_closed(pattern: str) -> bool:
    """
    Is every ``[`` of *pattern* a set that ends (``]``) and holds
    something (``[]`` and ``[!]`` do not), with no ``]`` outside a set?
    :func:`fnmatch.fnmatchcase` takes an unclosed ``[`` as the character
    itself, which no name holds: a rule that silently matches nothing.
    """
    inside = None
    for character in pattern:
        if inside is not None:
            if character == "]" and inside not in ("", "!"):
                inside = None
            elif character == "[":
                return False
            else:
                inside += character
        elif character == "[":
            inside = ""
        elif character == "]":
            return False
    return inside is None


_REPOSITORY_GLOB = re.compile(r"[a-z0-9_.*?\[\]!/-]{1,255}")


def repository_glob(text: str) -> str:
    """A shell-style glob of repository names (``library/*``,
    ``*/*-debug``): only what a name may hold (lower-case letters, digits,
    ``_.-/``) and ``* ? [ ] !``, its sets closed, and no empty path
    component (``/library/*``, ``a//b``, ``app/``: no name matches)."""
    if (
        _REPOSITORY_GLOB.fullmatch(text) is None
        or not _sets_closed(text)
        or "" in text.split("/")
    ):
        raise ValueError(
            f"not a repository pattern: {text[:40]!r} (use e.g. library/* */*-debug)"
        )
    return text


_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")


def warm_image(text: str) -> WarmImage:
    """One image to keep warm: ``repository:tag`` with an optional
    ``@os/architecture[/variant]``."""
    reference, _, platform = text.partition("@")
    try:
        tagged = split_tagged(reference)
    except RegistryError as e:
        raise ValueError(f"{text[:80]!r}: {e.message}") from None
    if tagged is None:
        raise ValueError(f"not repository:tag[@os/arch]: {text[:80]!r}")
    repository, tag = tagged
    if platform and _PLATFORM.fullmatch(platform) is None:
        raise ValueError(
            f"not a platform: {platform[:40]!r} (use e.g. linux/amd64 linux/arm64/v8)"
        )
    return WarmImage(repository, tag, platform or None)


def list_of(convert: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    """A converter: each word by *convert*."""

    def parse(text: str) -> tuple[T, ...]:
        return tuple(convert(word) for word in text.split())

    return parse


def positive(convert: Callable[[str], float]) -> Callable[[str], float]:
    """A converter: *convert*, then refuse zero and below."""

    def parse(text: str) -> float:
        value = convert(text)
        if value <= 0:
            raise ValueError(f"must be greater than zero: {text!r}")
        return value

    return parse


def one_of(*choices: str) -> Callable[[str], str]:
    """A converter: one of *choices*, in any case."""

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}: {text!r}")
        return value

    return parse


def positive_int(text: str) -> int:
    """A whole number greater than zero, in ASCII digits."""
    stripped = text.strip()
    if not _DIGITS.fullmatch(stripped) or int(stripped) <= 0:
        raise ValueError(f"must be a whole number greater than zero: {text[:40]!r}")
    return int(stripped)


def whole_number(text: str) -> int:
    """A whole number, zero or more, in ASCII digits."""
    stripped = text.strip()
    if not _DIGITS.fullmatch(stripped):
        raise ValueError(f"must be a whole number, 0 or more: {text[:40]!r}")
    return int(stripped)


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_bucket(text: str) -> str:
    """An S3 bucket name: 3 to 63 lower-case letters, digits, dots, hyphens."""
    name = text.strip()
    if _BUCKET.fullmatch(name) is None or ".." in name:
        raise ValueError(
            f"not an S3 bucket name: {text!r} (3 to 63 of a-z, 0-9, '.', '-')"
        )
    return name


def parse_redis_url(text: str) -> str:
    """``redis://host[:port][/db]``; the password goes in ``redis_password``."""
    parts = _split_url(
        text, ("redis",), "no credentials in the URL: use redis_password_file"
    )
    if parts.query or parts.fragment or not re.fullmatch(r"/?|/[0-9]{1,2}", parts.path):
        raise ValueError(f"URL must name only host, port and database: {text!r}")
    return text.strip()


def existing_file(base: str) -> Callable[[str], str]:
    """A converter: a file name, relative to *base*, of a file that exists."""

    def path(text: str) -> str:
        resolved = os.path.join(base, text.strip())
        if not os.path.isfile(resolved):
            raise ValueError(f"no such file: {resolved}")
        return resolved

    return path
