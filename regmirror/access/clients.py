"""
Who a request comes from and how it reached us: the peer, or, behind a
trusted proxy, the one forwarding header that proxy sets (``[access]
forwarded_header``); a hop there that is not an address is a client
without one, which no network rule matches.  And what a ``Host`` header
may be.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any

from twisted.web import http
from twisted.web.server import Request

from regmirror.config import FORWARDED_HEADERS, Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Who a request comes from: an address, or ``None`` when the trusted
#: proxy named something else (``unknown``, an obfuscated ``_name``), which
#: no network rule matches.
Client = Address | None


def contains(networks: Sequence[Network], address: Client) -> bool:
    """Is *address* in one of *networks*?  A client without one never is."""
    if address is None:
        return False
    address = unmapped(address)
    return any(address in network for network in networks)


def unmapped(address: Address) -> Address:
    """
    An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``: an IPv4 client of a
    listener on ``::``) as the IPv4 address it is, for the log and the
    login throttle (which counts IPv6 clients by /64); any other as is.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def client_address(
    request: http.Request,
    trusted: Sequence[Network],
    header: str = FORWARDED_HEADERS[0],
) -> Client:
    """
    Who the request comes from: the peer, or, when the peer is a trusted
    proxy, the nearest hop named by *header* (one of
    :data:`~regmirror.config.FORWARDED_HEADERS`, the one that proxy sets;
    every other header is ignored) that is not a trusted proxy itself.  A
    hop that is not an address ends the search: the client has no address
    (``None``), and is never taken for the proxy.  Without *header*, or
    with trusted proxies only in it, the furthest of them.
    """
    peer = unmapped(ipaddress.ip_address(_peer_host(request)))
    if not contains(trusted, peer):
        return peer
    hops = [
        None if hop is None else unmapped(hop)
        for hop in forwarded_hops(request, header)
    ]
    for hop in reversed(hops):
        if hop is None or not contains(trusted, hop):
            return hop
    return hops[0] if hops else peer


def _peer_host(request: http.Request) -> str:
    host: Any = request.getClientAddress()
    return str(getattr(host, "host", "0.0.0.0"))


def _joined(request: http.Request, name: bytes) -> str:
    """Every line of a header, as one comma-separated list (RFC 9110 5.3)."""
    lines = request.requestHeaders.getRawHeaders(name) or []
    return ",".join(line.decode("latin-1") for line in lines)


def forwarded_hops(request: http.Request, header: str) -> list[Client]:
    """
    The hops *header* names, the nearest last: each an address, or
    ``None`` for one that is not (``unknown``, ``_hidden``, garbage, a
    ``Forwarded`` element without ``for``).  Empty list elements are
    skipped, as RFC 9110 asks.
    """
    text = _joined(request, header.encode("ascii"))
    if header == "forwarded":
        return [
            None if element is None else _node(element.get("for", ""))
            for element in _forwarded_elements(text)
        ]
    return [_node(hop) for hop in text.split(",") if hop.strip()]


#: A port in a node (RFC 7239 6): digits, or an obfuscated ``_name``.
_PORT = re.compile(r"[0-9]{1,5}|_[A-Za-z0-9._-]+")


def _node(text: str) -> Address | None:
    """
    The address in a node (RFC 7239 6: ``10.1.2.3``, ``10.1.2.3:4711``,
    ``[2001:db8::1]:4711``; X-Forwarded-For's bare ``2001:db8::1``), or
    ``None``.  Only the strict forms count: no octal, hex or short IPv4.
    """
    text = text.strip()
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[0] == ":" and _PORT.fullmatch(rest[1:]))):
            return None
        return _address(inside, 6)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return _address(host, 4) if _PORT.fullmatch(port) else None
    return _address(text, None)


def _address(text: str, version: int | None) -> Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if version is not None and address.version != version:
        return None
    return address


def _forwarded_elements(text: str) -> list[dict[str, str] | None]:
    """
    The elements of a ``Forwarded`` field (RFC 7239 4), each its
    parameters (names in lower case, quoted values unquoted), or ``None``
    when it is malformed: a pair without ``=``, a parameter twice, an
    unbalanced quote.  Commas and semicolons inside quotes separate
    nothing.
    """
    elements: list[dict[str, str] | None] = []
    for element in _split_unquoted(text, ","):
        if not element.strip():
            continue
        elements.append(_forwarded_pairs(element))
    return elements


def _forwarded_pairs(element: str) -> dict[str, str] | None:
    """The parameters of one ``Forwarded`` element, or ``None``."""
    parameters: dict[str, str] = {}
    for pair in _split_unquoted(element, ";"):
        if not pair.strip():
            continue
        name, equals, value = pair.partition("=")
        name = name.strip().lower()
        unquoted = _unquote(value.strip())
        if not equals or not name or unquoted is None or name in parameters:
            return None
        parameters[name] = unquoted
    return parameters


def _split_unquoted(text: str, separator: str) -> list[str]:
    """*text* split at each *separator* outside a quoted string."""
    parts, start, quoted, escaped = [], 0, False, False
    for index, character in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and character == "\\":
            escaped = True
        elif character == '"':
            quoted = not quoted
        elif character == separator and not quoted:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return parts


def _unquote(value: str) -> str | None:
    """A token as it is, a quoted string without its quotes; ``None`` for
    anything else (a quote that does not close, or one inside a token)."""
    if not value.startswith('"'):
        return None if '"' in value else value
    if len(value) < 2 or not value.endswith('"'):
        return None
    inner = value[1:-1]
    if re.search(r'(?<!\\)(?:\\\\)*"', inner):
        return None
    return re.sub(r"\\(.)", r"\1", inner)


#: ``host[:port]`` (RFC 3986 3.2.2, 3.2.3): a reg-name (which takes in
#: IPv4 addresses) or an IPv6 literal in brackets, then an optional port.
_HOST = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]"
    r"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2}){1,255})"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


def valid_host(text: str) -> bool:
    """
    Is *text* (a ``Host`` header) a ``host[:port]``?  What the challenge's
    realm is built from must be: a ``"`` would add parameters to it.
    """
    match = _HOST.fullmatch(text)
    if match is None:
        return False
    if match["port"] is not None and int(match["port"]) > 65535:
        return False
    return match["ipv6"] is None or _address(match["ipv6"], 6) is not None


def client_scheme(request: Request, trusted: Sequence[Network], header: str) -> str:
    """
    How the client reached us: https on a TLS listener, or as the trusted
    proxy in front says: the ``proto`` of its own (the last) ``Forwarded``
    element when *header* is ``forwarded``, else the right-most value of
    ``X-Forwarded-Proto`` (the one it added, when it appends).
    """
    if request.isSecure():
        return "https"
    if not contains(trusted, ipaddress.ip_address(_peer_host(request))):
        return "http"
    if header == "forwarded":
        elements = _forwarded_elements(_joined(request, b"forwarded"))
        said = (elements[-1] or {}).get("proto", "") if elements else ""
    else:
        values = _joined(request, b"x-forwarded-proto").split(",")
        said = next((v for v in reversed(values) if v.strip()), "")
    said = said.strip().lower()
    return said if said in ("http", "https") else "http"
