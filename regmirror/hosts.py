"""
Which hosts an upstream may send the mirror to: the deny list matched
against every spelling of an address, an upstream's own host, and the
registrable domain that may receive its credentials.  Names are compared
as written, never resolved.
"""

from __future__ import annotations

import ipaddress
import socket

from publicsuffixlist import PublicSuffixList

from regmirror.config import Network

_SUFFIXES = PublicSuffixList()


def is_denied(host: str, deny: tuple[Network | str, ...]) -> bool:
    """
    Is *host* (lower case, without a trailing dot) on *deny*: a listed
    name, or an address inside a listed network however it is spelled,
    including IPv4 addresses an IPv6 one leads to?
    """
    addresses = as_addresses(host)
    if not addresses:
        return host in deny
    inside = [e for a in addresses for e in embedded(a)]
    return any(
        not isinstance(entry, str) and address in entry
        for entry in deny
        for address in addresses + inside
    )


def same_host(host: str, own: str) -> bool:
    """
    Is *host* the one *own* names: the same name, or the same address
    however it is spelled (``localhost`` stands for ``127.0.0.1`` and
    ``::1``)?
    """
    own = own.lower().rstrip(".")
    if host == own:
        return True
    mine = {identity(a) for a in as_addresses(own)}
    return any(identity(a) in mine for a in as_addresses(host))


def same_site(host: str, other: str) -> bool:
    """
    Whether two hosts share a registrable domain (``auth.docker.io`` and
    ``registry-1.docker.io``); IP addresses and single labels only match
    themselves.
    """
    host, other = host.lower().rstrip("."), other.lower().rstrip(".")
    if host == other:
        return True
    if is_address(host) or is_address(other):
        return False
    mine = _SUFFIXES.privatesuffix(host)
    return mine is not None and mine == _SUFFIXES.privatesuffix(other)


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Loopback by definition, whatever a resolver is told (RFC 6761).
_LOCALHOST = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
#: IPv6 prefixes whose last 32 bits are an IPv4 address a connection may
#: end up at: IPv4-compatible (deprecated), IPv4-translated (SIIT,
#: RFC 2765), NAT64's well-known prefix and its local-use prefix
#: (RFC 8215: a translator's /96 anywhere in it).
_EMBEDDING = tuple(
    ipaddress.ip_network(prefix)
    for prefix in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48")
)


def as_addresses(host: str) -> list[Address]:
    """
    The addresses a host name written as an address stands for, however it
    is spelled: ``169.254.169.254``, ``2852039166``, ``0xa9fea9fe``,
    ``0251.0376.0251.0376``, ``169.254.43518`` (resolvers accept all of
    them), ``[::ffff:169.254.169.254]`` (also its IPv4 form); ``localhost``
    and names under it are ``127.0.0.1`` and ``::1``.  Empty for any other
    name.
    """
    if host == "localhost" or host.endswith(".localhost"):
        return list(_LOCALHOST)
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        try:
            return [ipaddress.IPv4Address(socket.inet_aton(host))]
        except OSError:
            return []
    mapped = getattr(address, "ipv4_mapped", None)
    return [address, mapped] if mapped is not None else [address]


def embedded(address: Address) -> list[Address]:
    """
    IPv4 addresses an IPv6 *address* leads to by way of a translator or a
    tunnel (IPv4-compatible, IPv4-translated, NAT64 well-known and
    local-use, 6to4, Teredo's client).
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found: list[Address] = []
    if any(address in prefix for prefix in _EMBEDDING):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.append(address.teredo[1])
    return found


def identity(address: Address) -> tuple[int, int]:
    """An address as a host to connect to: IPv4-mapped as IPv4, no zone."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address.version, int(address)
