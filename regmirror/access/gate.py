"""
:class:`Gate`: whether a request may pull what the router decided, and
the challenge it gets when it may not.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlencode

import bcrypt
from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http
from twisted.web.server import Request

from regmirror.access.clients import (
    Client,
    client_address,
    client_scheme,
    contains,
    valid_host,
)
from regmirror.access.htpasswd import BCRYPT_MAX_PASSWORD, Htpasswd
from regmirror.access.logins import FailedLogins
from regmirror.access.tokens import SERVICE, Grant, Tokens
from regmirror.config import AccessConfig, Network, Secret
from regmirror.errors import Denied, RegistryError, Unauthorized
from regmirror.passthrough import Credentials, unseal
from regmirror.routing import Route

#: A verified user/password pair is not re-hashed with bcrypt for this long.
VERIFIED_FOR = 60.0
#: At most this many verified pairs are remembered.
VERIFIED_MAX = 1024


@frozen
class Admission:
    """
    A request let through: who, for the access log, and the client's own
    credentials for the upstream in a ``credentials = passthrough``
    namespace (``None``: none of its own).
    """

    user: str
    credentials: Credentials | None = field(default=None, repr=False)


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
    key: bytes = field(factory=lambda: os.urandom(32), repr=False)
    logins: str | None = None
    #: the namespaces with ``credentials = passthrough``
    passthrough: frozenset[str] = frozenset()
    tokens: Tokens = field(init=False)
    _htpasswd: Htpasswd | None = field(init=False)
    _failed: FailedLogins = field(init=False)
    _verified: dict[tuple[str, str], float] = field(factory=dict, repr=False)
    #: the htpasswd file's reading the verified logins were checked against
    _generation: int = 0
    log = Logger()

    def __attrs_post_init__(self) -> None:
        self.tokens = Tokens(self.clock, self.config.token_ttl, self.key)
        self._htpasswd = (
            Htpasswd(self.config.htpasswd) if self.config.htpasswd else None
        )
        self._failed = FailedLogins(self.clock, self.logins)

    @property
    def has_users(self) -> bool:
        """Is there an htpasswd file of the mirror's own users?"""
        return self._htpasswd is not None

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
        return (await self.admit(request, route)).user

    async def admit(self, request: Request, route: Route | None) -> Admission:
        """
        See :meth:`check`; with the client's own upstream credentials when
        *route*'s namespace passes them through.  There, Basic credentials
        are the upstream's, not a user of the mirror's, and so is a bearer
        token that is not one of the mirror's; a token of the mirror's
        carries them sealed (:meth:`regmirror.http.token`).  The upstream
        judges them (:mod:`regmirror.passthrough`).  At the API root,
        while some namespace passes credentials through, a client that
        sends none is challenged, so that clients that have some send them
        (to ``/token``; one without gets an anonymous token there).
        """
        address = self.client(request)
        namespace = None if route is None else route.namespace.name
        scheme, _, credentials = (
            _text(request.getHeader(b"authorization")) or ""
        ).partition(" ")
        credentials = credentials.strip()
        if self.passthrough and (route is None or namespace in self.passthrough):
            own = self._own(scheme, credentials, route)
            if own is not None:
                self._failed.check(address)
                return Admission("passthrough", own)
            if route is None and not scheme:
                raise self._challenge(
                    request, address, None, "the upstream registry may want credentials"
                )
            if scheme.lower() == "basic":
                scheme = ""  # empty (Og==) or malformed: no credentials at all
        if self.anonymous_allowed(address, namespace):
            return Admission("anonymous")
        return Admission(await self._user(request, address, route, scheme, credentials))

    def _own(self, scheme: str, value: str, route: Route | None) -> Credentials | None:
        """The client's own upstream credentials in its Authorization, if any."""
        if scheme.lower() == "basic":
            return Credentials.from_basic(value)
        if scheme.lower() != "bearer" or not value:
            return None
        claims = self.tokens.verify(value)
        if claims is None:
            # Not the mirror's (ours are payload.signature, one dot): the
            # upstream's own token, a JWT or an opaque one.
            return None if value.count(".") == 1 else Credentials(None, Secret(value))
        sealed = claims.get("own")
        if not isinstance(sealed, str):
            return None
        if route is not None and (
            (route.namespace.name, route.repository) not in Tokens.grants(claims)
        ):
            return None
        return unseal(self.tokens.key, sealed)

    def refused(
        self, request: Request, route: Route, why: str, error: str | None = None
    ) -> RegistryError:
        """The challenge for a client the upstream refused (see :meth:`_challenge`)."""
        return self._challenge(request, self.client(request), route, why, error)

    def throttle(self, request: Request) -> None:
        """
        :raises TooManyRequests: when the client of *request* has failed
            to log in too often (before its own credentials are tried
            upstream, as before one of the mirror's users is).
        """
        self._failed.check(self.client(request))

    def failed_passthrough_login(self, request: Request) -> None:
        """
        A client's own credentials were refused by the upstream's token
        realm (a wrong password): counted as a failed login, like one of
        the mirror's own users.

        :raises TooManyRequests: when the client has failed too often.
        """
        address = self.client(request)
        self.log.warn(
            "failed login from {address}: the upstream refused the client's "
            "own credentials",
            address="unknown" if address is None else str(address),
        )
        self._failed.reserve(address)

    async def _user(
        self,
        request: Request,
        address: Client,
        route: Route | None,
        scheme: str,
        credentials: str,
    ) -> str:
        """The mirror's own rules: its tokens, its users (see :meth:`check`)."""
        namespace = None if route is None else route.namespace.name
        if scheme.lower() == "bearer" and credentials:
            claims = self.tokens.verify(credentials.strip())
            if claims is None:
                raise self._challenge(
                    request, address, route, "invalid or expired token", "invalid_token"
                )
            if route is None or (namespace, route.repository) in Tokens.grants(claims):
                return str(claims["sub"])
            # An anonymous token (what a client without credentials gets
            # at /token) names only what its address may pull anyway: its
            # holder needs credentials, not another token.
            why = (
                "credentials required"
                if Tokens.anonymous(claims)
                else "the token is not for this repository of this namespace"
            )
            raise self._challenge(request, address, route, why, "insufficient_scope")
        if scheme.lower() == "basic" and credentials:
            user = await self.login(address, credentials.strip())
            if user is not None:
                return user
            raise self._challenge(
                request, address, route, "wrong user name or password"
            )
        raise self._challenge(request, address, route, "credentials required")

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
            user, colon, password = (
                base64.b64decode(basic, validate=True).decode("utf-8").partition(":")
            )
        except (ValueError, binascii.Error, UnicodeDecodeError):
            user, colon, password = "", "", ""
        # Without a colon the value is no user name: likely a password
        # pasted alone, which must not reach the log as one.
        malformed = not colon
        if malformed:
            user, password = "", ""
        users = self._htpasswd
        hashed = users.hash_for(user) if users is not None and user else None
        if users is not None and users.generation != self._generation:
            # The file changed: what was verified against it is forgotten.
            self._verified.clear()
            self._generation = users.generation
        # The hash is part of the key: a login verified against a hash the
        # htpasswd file no longer has (a password changed) is not taken
        # for verified, in whichever process reads the file again.
        key = (
            user,
            hashlib.sha256(
                b"%s\0%s\0%s" % (user.encode(), password.encode(), hashed or b"")
            ).hexdigest(),
        )
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
        where = "unknown" if address is None else str(address)
        if malformed:
            self.log.warn(
                "failed login from {address}: malformed Basic credentials "
                "(not base64 of user:password)",
                address=where,
            )
        elif hashed is None:
            # A name no user has may be a password typed in the wrong
            # field: it is not written down either.
            self.log.warn(
                "failed login for a user name not in the htpasswd file "
                "({length} characters) from {address}",
                length=len(user),
                address=where,
            )
        else:
            self.log.warn(
                "failed login for user {user!r} from {address}",
                user=user[:64],
                address=where,
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
        own = self.passthrough and (
            route is None or route.namespace.name in self.passthrough
        )
        if self._htpasswd is None and not partly_open and not own:
            # No user to log in as: credentials could not help.
            return Denied("access denied: not open to this client's address")
        scheme = client_scheme(
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
