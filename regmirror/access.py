"""
Who may pull: anonymous clients by address, users from an htpasswd file
(Basic auth), and bearer tokens the mirror issues itself at ``/token``
after a Basic login (the registry token flow, so that ``docker login``
then ``docker pull`` work).

A token names the namespace of every repository it is good for, as the
router decided it when the token was asked for; a request is let through
with a token only for the namespace and repository the router decides for
that request.  The challenge a refused request gets names the namespace
the way the router reads it back at ``/token``: the realm is on the
request's own ``Host``, carries ``?ns=`` when the request was routed by
``ns``, and the scope names the repository as the request wrote it.

Client credentials are checked here and go no further: nothing a client
sends is ever forwarded upstream, and no password reaches a log line.

Who the client is, behind a trusted proxy, comes from the one forwarding
header that proxy sets (``[access] forwarded_header``); a hop there that
is not an address is a client without one, which no network rule
matches.  Failed logins are counted per client in a table of fixed size,
shared by every process using the cache folder.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlencode

import bcrypt
from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http
from twisted.web.server import Request

from regmirror.config import FORWARDED_HEADERS, AccessConfig, Network
from regmirror.errors import Denied, RegistryError, TooManyRequests, Unauthorized
from regmirror.routing import Route

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Who a request comes from: an address, or ``None`` when the trusted
#: proxy named something else (``unknown``, an obfuscated ``_name``), which
#: no network rule matches.
Client = Address | None
T = TypeVar("T")
#: What a token lets its holder pull: a namespace's name and a repository
#: in it, as its upstreams name it (``library/`` added where it is).
Grant = tuple[str, str]

#: The ``service`` our tokens are for.
SERVICE = "regmirror"
#: Failed logins allowed per client address within the window, then 429.
LOGIN_FAILURES = 5
LOGIN_WINDOW = 60.0
#: What ``htpasswd -B`` writes (bcrypt raises for anything else).
BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
#: The longest password bcrypt hashes, in bytes.
BCRYPT_MAX_PASSWORD = 72
#: A verified user/password pair is not re-hashed with bcrypt for this long.
VERIFIED_FOR = 60.0
#: At most this many verified pairs are remembered.
VERIFIED_MAX = 1024
#: What an unknown user's password is checked against, so that a login
#: costs one bcrypt check whether the user exists or not; its cost (``04``)
#: is replaced by the users' (:meth:`Htpasswd.stand_in`).  No password
#: matches it: it hashes 32 random bytes nobody kept.
STAND_IN_HASH = b"$2b$04$XdnCQnAZpWirTZnd0IwoE.4t96VZpYmeiE9cUmKukVqFHo8K3ofL."
#: The stand-in's cost when the htpasswd file has no users.
STAND_IN_COST = 10


def contains(networks: Sequence[Network], address: Client) -> bool:
    """Is *address* in one of *networks*?  A client without one never is."""
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


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
    peer = ipaddress.ip_address(_peer_host(request))
    if not contains(trusted, peer):
        return peer
    hops = forwarded_hops(request, header)
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


@define(eq=False)
class Htpasswd:
    """
    Users and bcrypt hashes from an htpasswd file, read again whenever the
    file changes.  Entries with other hash schemes are ignored (logged).
    """

    path: str
    _stamp: tuple[float, int] | None = None
    _users: dict[str, bytes] = field(factory=dict)
    _stand_in: bytes = b""
    log = Logger()

    def hash_for(self, user: str) -> bytes | None:
        self._reload()
        return self._users.get(user)

    def stand_in(self) -> bytes:
        """
        A hash no password matches, of the cost most users' hashes have
        (the higher one on a tie): what an unknown user's password is
        checked against, so that the check costs what a user's does.
        """
        self._reload()
        if not self._stand_in:
            costs = Counter(int(hashed[4:6]) for hashed in self._users.values())
            cost = max(costs, key=lambda c: (costs[c], c), default=STAND_IN_COST)
            self._stand_in = b"%s%02d%s" % (STAND_IN_HASH[:4], cost, STAND_IN_HASH[6:])
        return self._stand_in

    def _reload(self) -> None:
        try:
            status = os.stat(self.path)
        except OSError as e:
            self.log.error(
                "cannot read htpasswd file {path}: {why}",
                path=self.path,
                why=e.strerror,
            )
            self._users = {}
            self._stand_in = b""
            self._stamp = None
            return
        stamp = (status.st_mtime, status.st_size)
        if stamp == self._stamp:
            return
        users = {}
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                user, colon, hashed = line.partition(":")
                if not colon or not BCRYPT_HASH.fullmatch(hashed):
                    self.log.warn(
                        "{path} line {number}: not a bcrypt entry, ignored",
                        path=self.path,
                        number=number,
                    )
                    continue
                users[user] = hashed.encode("ascii")
        self._users = users
        self._stand_in = b""
        self._stamp = stamp
        self.log.info(
            "loaded {count} users from {path}", count=len(users), path=self.path
        )


@define(eq=False)
class Tokens:
    """
    Short-lived tokens signed with HMAC-SHA256.  The key is shared by every
    process using the same cache (see :func:`shared_key`): a token issued
    by one worker is good at the others.
    """

    clock: IReactorTime
    ttl: float
    _key: bytes = field(factory=lambda: os.urandom(32))

    def issue(self, user: str, grants: Iterable[Grant]) -> tuple[str, float]:
        """
        A token for *user* to pull *grants*, and when it expires.  The
        claim is ``pull``, a list of ``[namespace, repository]`` pairs;
        tokens of the former format (``repositories``: bare names, no
        namespace) name no grant and open nothing.
        """
        expires = self.clock.seconds() + self.ttl
        claims = {
            "sub": user,
            "exp": expires,
            "pull": [list(grant) for grant in sorted(set(grants))],
        }
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}", expires

    @staticmethod
    def grants(claims: dict[str, Any]) -> frozenset[Grant]:
        """What verified *claims* let their holder pull."""
        pulls = claims.get("pull")
        if not isinstance(pulls, list):
            return frozenset()
        return frozenset(
            (pair[0], pair[1])
            for pair in pulls
            if isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(part, str) for part in pair)
        )

    def verify(self, token: str) -> dict[str, Any] | None:
        payload, _, signature = token.partition(".")
        if not (payload.isascii() and signature.isascii()):
            return None
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            claims: dict[str, Any] = json.loads(
                base64.urlsafe_b64decode(payload + "==")
            )
        except (ValueError, binascii.Error):
            return None
        if float(claims.get("exp", 0)) <= self.clock.seconds():
            return None
        return claims

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())


def shared_key(path: str) -> bytes:
    """
    The token key kept in *path* (mode 0600), created at first use; every
    process sharing it gets the same key, and tokens survive restarts.
    """
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) == 32:
            return key
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(temporary, path)  # only the first process wins
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)
    with open(path, "rb") as f:
        return f.read()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


#: One client's record in the failed-login table: a tag naming the client
#: (16 bytes of a hash, zeros when free), how many times follow, and the
#: times of its last :data:`LOGIN_FAILURES` failed logins.
_ENTRY = struct.Struct(f"<16sI{LOGIN_FAILURES}d")
#: The table: sets of ways; a client has its entry in one set, picked by
#: its hash.  4,096 clients failing at once are tracked; beyond that the
#: client whose last failure is oldest in a set gives way, which gains an
#: attacker nothing that the addresses causing it did not already give.
LOGIN_SETS, LOGIN_WAYS = 512, 8
_SET_SIZE = _ENTRY.size * LOGIN_WAYS
#: The size of the table, in memory or in its file.
LOGIN_TABLE_SIZE = _SET_SIZE * LOGIN_SETS
_FREE = bytes(16)

_Entries = list[tuple[bytes, list[float]]]


def _login_key(client: Client) -> bytes:
    """
    What failed logins are counted by: an IPv4 address, the /64 network of
    an IPv6 address (any host holds a whole /64), or, for every client
    without an address, one shared key.
    """
    if client is None:
        return b"?"
    if isinstance(client, ipaddress.IPv6Address):
        if client.ipv4_mapped is None:
            return b"6" + client.packed[:8]
        client = client.ipv4_mapped
    return b"4" + client.packed


@define(eq=False)
class FailedLogins:
    """
    Recent failed logins per client, counted by every process using the
    cache folder (``workers``): a table of fixed size in the file *path*,
    each change under an exclusive ``flock``; in memory when *path* is
    ``None`` (or cannot be used: then each process counts its own, as it
    logs).  A login is counted when it starts, before bcrypt answers, so
    that logins sent at once cannot all start before the first failure is
    counted; a right password gives its attempt back (:meth:`release`).
    """

    clock: IReactorTime
    path: str | None = None
    _table: bytearray = field(init=False)
    log = Logger()

    def __attrs_post_init__(self) -> None:
        self._table = bytearray(0 if self.path else LOGIN_TABLE_SIZE)

    def check(self, client: Client) -> None:
        """:raises TooManyRequests: when *client* has failed too often."""
        now = self.clock.seconds()
        tag, index = _locate(client)

        def check(entries: _Entries) -> None:
            for entry_tag, times in entries:
                if entry_tag == tag:
                    _refuse_beyond_limit(_recent(times, now), now)

        self._change(index, check)

    def reserve(self, client: Client) -> float:
        """
        Count a login of *client* starting now, as failed unless released.

        :return: its time, for :meth:`release`.
        :raises TooManyRequests: when *client* has failed too often.
        """
        now = self.clock.seconds()
        tag, index = _locate(client)

        def reserve(entries: _Entries) -> float:
            recents = [_recent(times, now) for _, times in entries]
            found = [way for way, (entry, _) in enumerate(entries) if entry == tag]
            if found:
                way = found[0]
                _refuse_beyond_limit(recents[way], now)
            else:
                # The client whose last failure is the oldest gives way.
                way = min(
                    range(len(entries)), key=lambda w: recents[w][-1:] or [-1e300]
                )
                recents[way] = []
            entries[way] = (tag, [*recents[way], now])
            return now

        return self._change(index, reserve)

    def release(self, client: Client, stamp: float) -> None:
        """Forget the login of *client* counted at *stamp*: it succeeded."""
        now = self.clock.seconds()
        tag, index = _locate(client)

        def release(entries: _Entries) -> None:
            for way, (entry, times) in enumerate(entries):
                if entry == tag:
                    recent = _recent(times, now)
                    if stamp in recent:
                        recent.remove(stamp)
                    entries[way] = (tag if recent else _FREE, recent)

        self._change(index, release)

    def _change(self, index: int, change: Callable[[_Entries], T]) -> T:
        """*change* the entries of set *index*; kept unless it raises."""
        offset = index * _SET_SIZE
        if self.path is not None:
            try:
                return self._change_file(self.path, offset, change)
            except OSError as e:
                self.log.error(
                    "cannot use {path} ({why}): failed logins are counted"
                    " by each process alone",
                    path=self.path,
                    why=e.strerror,
                )
                self.path = None
                self._table = bytearray(LOGIN_TABLE_SIZE)
        before = bytes(self._table[offset : offset + _SET_SIZE])
        entries = _unpack(before)
        outcome = change(entries)
        self._table[offset : offset + _SET_SIZE] = _pack(entries)
        return outcome

    @staticmethod
    def _change_file(path: str, offset: int, change: Callable[[_Entries], T]) -> T:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            before = os.pread(fd, _SET_SIZE, offset).ljust(_SET_SIZE, b"\0")
            entries = _unpack(before)
            outcome = change(entries)
            after = _pack(entries)
            if after != before:
                os.pwrite(fd, after, offset)
            return outcome
        finally:
            os.close(fd)  # which releases the lock


def _locate(client: Client) -> tuple[bytes, int]:
    """The tag of *client*'s entry and the index of its set."""
    digest = hashlib.sha256(b"regmirror failed logins\0" + _login_key(client)).digest()
    return digest[:16], int.from_bytes(digest[16:20], "little") % LOGIN_SETS


def _recent(times: Iterable[float], now: float) -> list[float]:
    """The failure times within the window; none from the future beyond it
    (a clock set back), none that is no number."""
    return sorted(t for t in times if now - LOGIN_WINDOW < t <= now + LOGIN_WINDOW)


def _refuse_beyond_limit(recent: list[float], now: float) -> None:
    if len(recent) >= LOGIN_FAILURES:
        wait = min(max(int(recent[-LOGIN_FAILURES] + LOGIN_WINDOW - now) + 1, 1), 61)
        raise TooManyRequests(
            "too many failed logins from this address; try again later",
            {"Retry-After": str(wait)},
        )


def _unpack(data: bytes) -> _Entries:
    return [
        (tag, list(times[:count])) for tag, count, *times in _ENTRY.iter_unpack(data)
    ]


def _pack(entries: _Entries) -> bytes:
    packed = []
    for tag, times in entries:
        kept = times[-LOGIN_FAILURES:]
        padding = [0.0] * (LOGIN_FAILURES - len(kept))
        packed.append(_ENTRY.pack(tag, len(kept), *kept, *padding))
    return b"".join(packed)


@define(eq=False)
class Gate:
    """
    Decides whether a request may pull, per namespace.

    :ivar namespaces: a namespace's own ``anonymous`` networks, which only
        narrow the section's.
    :ivar run_in_thread: bcrypt is slow on purpose: it runs off the reactor.
    :ivar logins: the file where every process sharing the cache folder
        counts failed logins (``None``: this process counts its own).
    """

    config: AccessConfig
    clock: IReactorTime
    run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]]
    namespaces: dict[str, tuple[Network, ...]] = field(factory=dict)
    #: the token signing key (default: this process's own)
    key: bytes = field(factory=lambda: os.urandom(32))
    logins: str | None = None
    tokens: Tokens = field(init=False)
    _htpasswd: Htpasswd | None = field(init=False)
    _failed: FailedLogins = field(init=False)
    _verified: dict[tuple[str, str], float] = field(factory=dict)
    log = Logger()

    def __attrs_post_init__(self) -> None:
        self.tokens = Tokens(self.clock, self.config.token_ttl, self.key)
        self._htpasswd = (
            Htpasswd(self.config.htpasswd) if self.config.htpasswd else None
        )
        self._failed = FailedLogins(self.clock, self.logins)

    def client(self, request: http.Request) -> Client:
        """Who *request* comes from, by the proxies' one forwarding header."""
        return client_address(
            request, self.config.trusted_proxies, self.config.forwarded_header
        )

    def anonymous_allowed(self, address: Client, namespace: str | None) -> bool:
        """
        May *address* pull *namespace* without credentials?  ``None`` (the
        API root, which clients ping before deciding whether to log in):
        only when every namespace allows it, so that a client is challenged
        whenever some namespace needs credentials.
        """
        if not contains(self.config.anonymous, address):
            return False
        narrowers = (
            self.namespaces.values()
            if namespace is None
            else [self.namespaces.get(namespace)]
        )
        return all(n is None or contains(n, address) for n in narrowers)

    def grantable(
        self, address: Client, user: str | None, routes: Iterable[Route]
    ) -> list[Grant]:
        """
        What a token for *routes* (each decided by the router from the token
        request, as for a pull) may grant: every one to a *user*, to an
        anonymous client (``None``) those its address may pull anyway.
        """
        return [
            (route.namespace.name, route.repository)
            for route in routes
            if user is not None or self.anonymous_allowed(address, route.namespace.name)
        ]

    async def check(self, request: Request, route: Route | None) -> str:
        """
        May this request pull what the router decided, *route* (``None``:
        the API root)?  A token must name the route's namespace and
        repository.

        :return: who: ``"anonymous"`` or the user name.
        :raises Unauthorized: with a challenge, when credentials could help.
        :raises Denied: when they could not.
        """
        address = self.client(request)
        namespace = None if route is None else route.namespace.name
        if self.anonymous_allowed(address, namespace):
            return "anonymous"
        scheme, _, credentials = (
            _text(request.getHeader(b"authorization")) or ""
        ).partition(" ")
        if scheme.lower() == "bearer" and credentials:
            claims = self.tokens.verify(credentials.strip())
            if claims is None:
                raise self._challenge(
                    request, address, route, "invalid or expired token", "invalid_token"
                )
            if route is None or (namespace, route.repository) in Tokens.grants(claims):
                return str(claims["sub"])
            raise self._challenge(
                request,
                address,
                route,
                "the token is not for this repository of this namespace",
                "insufficient_scope",
            )
        if scheme.lower() == "basic" and credentials:
            user = await self.login(address, credentials.strip())
            if user is not None:
                return user
            raise self._challenge(
                request, address, route, "wrong user name or password"
            )
        raise self._challenge(request, address, route, "authentication required")

    async def login(self, address: Client, basic: str) -> str | None:
        """
        Check Basic credentials; the user, or ``None`` (counted per client).

        Every check costs one bcrypt run, whether the user exists or not and
        whatever the password's length (against :meth:`Htpasswd.stand_in`
        when there is no hash to check), so that no stopwatch tells which
        user names exist.

        :raises TooManyRequests: when *address* has failed too often.
        """
        try:
            user, _, password = (
                base64.b64decode(basic, validate=True).decode("utf-8").partition(":")
            )
        except (ValueError, binascii.Error, UnicodeDecodeError):
            user, password = "", ""
        users = self._htpasswd
        hashed = users.hash_for(user) if users is not None and user else None
        key = (user, hashlib.sha256(f"{user}\0{password}".encode()).hexdigest())
        if hashed is not None and self._verified.get(key, 0) > self.clock.seconds():
            self._failed.check(address)
            return user
        attempt = self._failed.reserve(address)
        secret = password.encode("utf-8")
        # bcrypt reads 72 bytes at most (bcrypt 5 raises beyond): a longer
        # password cannot be the one hashed, whatever its first 72 bytes.
        usable = hashed is not None and len(secret) <= BCRYPT_MAX_PASSWORD
        good = False
        if users is not None:
            against = hashed if usable and hashed is not None else users.stand_in()
            checked = secret[:BCRYPT_MAX_PASSWORD]
            matched = await self.run_in_thread(lambda: bcrypt.checkpw(checked, against))
            good = usable and bool(matched)
        if good:
            self._failed.release(address, attempt)
            self._remember(key)
            return user
        self.log.warn(
            "failed login for user {user!r} from {address}",
            user=user[:64],
            address="unknown" if address is None else str(address),
        )
        return None

    def _remember(self, key: tuple[str, str]) -> None:
        """Remember a verified pair, at most :data:`VERIFIED_MAX` of them."""
        now = self.clock.seconds()
        if len(self._verified) >= VERIFIED_MAX:
            for stale in [k for k, until in self._verified.items() if until <= now]:
                del self._verified[stale]
        while len(self._verified) >= VERIFIED_MAX:
            del self._verified[next(iter(self._verified))]
        self._verified.pop(key, None)
        self._verified[key] = now + VERIFIED_FOR

    def _challenge(
        self,
        request: Request,
        address: Client,
        route: Route | None,
        why: str,
        error: str | None = None,
    ) -> RegistryError:
        """
        A 401 with a Bearer challenge when a token could help: a user could
        log in, or (at the API root) the address may pull some namespaces
        anonymously and gets an anonymous token for them.  Else 403.

        What the client sends to the realm routes to *route*'s namespace
        again: the realm is on this request's ``Host``, has ``?ns=`` (the
        namespace's own name) when ``ns`` chose the route, and the scope is
        the name as this request wrote it.  *error* (RFC 6750) tells why a
        token was refused; containerd then asks the realm again.
        """
        partly_open = route is None and contains(self.config.anonymous, address)
        if self._htpasswd is None and not partly_open:
            return Denied(f"access denied: {why}")
        scheme = _scheme(
            request, self.config.trusted_proxies, self.config.forwarded_header
        )
        # The API refuses a Host that is no host[:port] before this; should
        # one come here all the same, it is not echoed.
        host = _text(request.getHeader(b"host")) or "localhost"
        realm = f"{scheme}://{host if valid_host(host) else 'localhost'}/token"
        if route is not None and route.via == "ns":
            realm += "?" + urlencode({"ns": route.namespace.name})
        challenge = f'Bearer realm="{realm}",service="{SERVICE}"'
        if route is not None:
            challenge += f',scope="repository:{route.client_name}:pull"'
        if error is not None:
            challenge += f',error="{error}"'
        return Unauthorized(why, {"WWW-Authenticate": challenge})


def _text(value: bytes | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.decode("latin-1")


def _scheme(request: Request, trusted: Sequence[Network], header: str) -> str:
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
