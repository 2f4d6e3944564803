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
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlencode

import bcrypt
from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http
from twisted.web.server import Request

from regmirror.config import AccessConfig, Network
from regmirror.errors import Denied, RegistryError, TooManyRequests, Unauthorized
from regmirror.routing import Route

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
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


def contains(networks: Sequence[Network], address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def client_address(request: http.Request, trusted: Sequence[Network]) -> Address:
    """
    The client's address: the peer's, or, when the peer is a trusted proxy,
    the nearest address in its forwarding headers that is not a trusted
    proxy itself.
    """
    peer = ipaddress.ip_address(_peer_host(request))
    if not contains(trusted, peer):
        return peer
    chain = _forwarded_chain(request)
    for hop in reversed(chain):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a malformed hop: believe nothing beyond it
        if not contains(trusted, address):
            return address
    return peer


def _peer_host(request: http.Request) -> str:
    host: Any = request.getClientAddress()
    return str(getattr(host, "host", "0.0.0.0"))


def _forwarded_chain(request: http.Request) -> list[str]:
    """Addresses named by ``Forwarded`` (preferred) or ``X-Forwarded-For``."""
    forwarded = request.requestHeaders.getRawHeaders(b"forwarded") or []
    hops = []
    for value in forwarded:
        for element in value.decode("latin-1").split(","):
            for pair in element.split(";"):
                name, _, token = pair.strip().partition("=")
                if name.lower() == "for":
                    token = token.strip('"')
                    if token.startswith("["):
                        token = token[1:].split("]", 1)[0]
                    elif token.count(":") == 1:
                        token = token.split(":", 1)[0]
                    hops.append(token)
    if hops:
        return hops
    for value in request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []:
        hops += [hop.strip() for hop in value.decode("latin-1").split(",")]
    return hops


@define(eq=False)
class Htpasswd:
    """
    Users and bcrypt hashes from an htpasswd file, read again whenever the
    file changes.  Entries with other hash schemes are ignored (logged).
    """

    path: str
    _stamp: tuple[float, int] | None = None
    _users: dict[str, bytes] = field(factory=dict)
    log = Logger()

    def hash_for(self, user: str) -> bytes | None:
        self._reload()
        return self._users.get(user)

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


@define(eq=False)
class Gate:
    """
    Decides whether a request may pull, per namespace.

    :ivar namespaces: a namespace's own ``anonymous`` networks, which only
        narrow the section's.
    :ivar run_in_thread: bcrypt is slow on purpose: it runs off the reactor.
    """

    config: AccessConfig
    clock: IReactorTime
    run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]]
    namespaces: dict[str, tuple[Network, ...]] = field(factory=dict)
    #: the token signing key (default: this process's own)
    key: bytes = field(factory=lambda: os.urandom(32))
    tokens: Tokens = field(init=False)
    _htpasswd: Htpasswd | None = field(init=False)
    _failures: dict[Address, deque[float]] = field(factory=dict)
    _verified: dict[tuple[str, str], float] = field(factory=dict)
    log = Logger()

    def __attrs_post_init__(self) -> None:
        self.tokens = Tokens(self.clock, self.config.token_ttl, self.key)
        self._htpasswd = (
            Htpasswd(self.config.htpasswd) if self.config.htpasswd else None
        )

    def anonymous_allowed(self, address: Address, namespace: str | None) -> bool:
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
        self, address: Address, user: str | None, routes: Iterable[Route]
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
        address = client_address(request, self.config.trusted_proxies)
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

    async def login(self, address: Address, basic: str) -> str | None:
        """Check Basic credentials; the user, or ``None`` (counted per address)."""
        self._throttle(address)
        try:
            user, _, password = (
                base64.b64decode(basic, validate=True).decode("utf-8").partition(":")
            )
        except (ValueError, binascii.Error, UnicodeDecodeError):
            user, password = "", ""
        hashed = self._htpasswd.hash_for(user) if self._htpasswd and user else None
        key = (user, hashlib.sha256(f"{user}\0{password}".encode()).hexdigest())
        if hashed is not None and self._verified.get(key, 0) > self.clock.seconds():
            return user
        secret = password.encode("utf-8")
        # bcrypt reads 72 bytes at most (bcrypt 5 raises beyond): a longer
        # password cannot be the one hashed, whatever its first 72 bytes.
        good = (
            hashed is not None
            and len(secret) <= BCRYPT_MAX_PASSWORD
            and bool(await self.run_in_thread(lambda: bcrypt.checkpw(secret, hashed)))
        )
        if good:
            self._verified[key] = self.clock.seconds() + VERIFIED_FOR
            return user
        self._failures.setdefault(address, deque()).append(self.clock.seconds())
        self.log.warn(
            "failed login for user {user!r} from {address}",
            user=user[:64],
            address=str(address),
        )
        return None

    def _throttle(self, address: Address) -> None:
        recent = self._failures.get(address)
        if recent is None:
            return
        now = self.clock.seconds()
        while recent and recent[0] <= now - LOGIN_WINDOW:
            recent.popleft()
        if not recent:
            del self._failures[address]
        elif len(recent) >= LOGIN_FAILURES:
            wait = int(recent[0] + LOGIN_WINDOW - now) + 1
            raise TooManyRequests(
                "too many failed logins from this address; try again later",
                {"Retry-After": str(wait)},
            )

    def _challenge(
        self,
        request: Request,
        address: Address,
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
        scheme = _scheme(request, self.config.trusted_proxies)
        host = _text(request.getHeader(b"host")) or "localhost"
        realm = f"{scheme}://{host}/token"
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


def _scheme(request: Request, trusted: Sequence[Network]) -> str:
    if request.isSecure():
        return "https"
    peer = ipaddress.ip_address(_peer_host(request))
    forwarded = _text(request.getHeader(b"x-forwarded-proto"))
    if forwarded in ("http", "https") and contains(trusted, peer):
        return forwarded
    return "http"
