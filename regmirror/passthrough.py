"""
Clients' own credentials for a namespace's upstreams (``[namespace:NAME]
credentials = passthrough``).

A client sends its credentials for the registry to the mirror: Basic on
each request (containerd's ``hosts.toml`` header), or once to the
mirror's ``/token``, which seals them into the token it issues
(:func:`seal`: AES-GCM under a key derived from the token key, so that
every worker process can open them and no disk holds them).  Here they
become an :class:`Identity`: the namespace's :class:`UpstreamPool` with
each upstream speaking for that client (its own bearer tokens, the
upstream's shared health), kept in a bounded table under a keyed hash of
the credentials, never the secret.

Cached content is served to an identity only once the upstream has
confirmed, with its credentials, that it may read the repository
(:meth:`Passthrough.confirm`: a ``HEAD`` with a freshly fetched token,
remembered for ``access_check_ttl``); which content belongs to which
repository is the repository's own vouching (:mod:`regmirror.vouches`,
per repository in such a namespace), shared by every identity.  Clients
without credentials of their own are an identity too (the configured
account, or none), checked the same way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections import OrderedDict

from attrs import define, evolve, field, frozen
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from regmirror._flight import SingleFlight
from regmirror.config import NamespaceConfig, Secret
from regmirror.errors import AccessRefused
from regmirror.pool import MANIFEST_ACCEPT, UpstreamPool, summarise
from regmirror.responses import header
from regmirror.upstream import Upstream, UpstreamFailure

#: At most this many clients' credentials (an upstream pool each) are kept
#: per process; the least recently used go first.
MAX_IDENTITIES = 1024
#: A client's credentials unused for this long are dropped from memory.
IDENTITY_IDLE = 600.0
#: At most this many (credentials, repository) confirmations are kept.
MAX_CONFIRMED = 10_000
#: What the identity of clients without credentials of their own is
#: keyed by (no keyed hash is ever this).
ANONYMOUS = "anonymous"


@frozen
class Credentials:
    """
    A client's own credentials for an upstream: a user and password, or
    (without a user) a bearer token of the upstream's.  Out of every
    ``repr`` and log line, the user name too (it may be a password typed
    in the wrong field).
    """

    username: str | None = field(repr=False)
    secret: Secret = field(repr=False)

    @classmethod
    def from_basic(cls, value: str) -> Credentials | None:
        """
        Basic credentials (the base64 of ``user:password``), or ``None``
        when they name nothing: malformed, or empty (``Og==``: what
        containers/image sends without any).
        """
        try:
            text = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        user, colon, password = text.partition(":")
        if not colon or not user or not password:
            return None
        return cls(user, Secret(password))

    def material(self) -> bytes:
        """What the keyed hash and the seal are of."""
        user = "" if self.username is None else self.username
        kind = b"bearer" if self.username is None else b"basic"
        return b"\0".join([kind, user.encode(), self.secret.reveal().encode()])


def _seal_key(token_key: bytes) -> bytes:
    return hmac.new(token_key, b"regmirror passthrough seal", hashlib.sha256).digest()


def seal(token_key: bytes, credentials: Credentials) -> str:
    """*credentials* encrypted and authenticated for a token of the mirror's."""
    nonce = os.urandom(12)
    plain = json.dumps(
        [credentials.username, credentials.secret.reveal()], separators=(",", ":")
    ).encode()
    sealed = AESGCM(_seal_key(token_key)).encrypt(nonce, plain, b"regmirror")
    return base64.urlsafe_b64encode(nonce + sealed).decode("ascii")


def unseal(token_key: bytes, text: str) -> Credentials | None:
    """What :func:`seal` sealed, or ``None`` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(text.encode("ascii"))
        plain = AESGCM(_seal_key(token_key)).decrypt(raw[:12], raw[12:], b"regmirror")
        username, secret = json.loads(plain)
    except (ValueError, TypeError, binascii.Error, InvalidTag, UnicodeError):
        return None
    if not isinstance(secret, str):
        return None
    if not (username is None or isinstance(username, str)):
        return None
    return Credentials(username, Secret(secret))


@frozen
class Identity:
    """
    Who asks, as the upstream sees them: *pool* speaks for them.

    :ivar key: a keyed hash of the namespace and the credentials (or
        ``anonymous``), what every table here is keyed by.
    """

    key: str
    #: its upstreams' configuration names the user: out of every ``repr``
    pool: UpstreamPool = field(repr=False)
    anonymous: bool = False

    @property
    def label(self) -> str:
        """For the access log: a short, keyed (so unguessable) fingerprint."""
        return "anonymous" if self.anonymous else f"passthrough:{self.key[:12]}"


class NotInRepository(Exception):
    """The upstream, asked with the identity's credentials, answered 404."""


def speaking_for(
    upstream: Upstream,
    credentials: Credentials | None,
    token_lifetime: float | None = None,
) -> Upstream:
    """
    *upstream* speaking for a client: its own credentials (``None``: the
    configured ones) and its own bearer tokens, reused at most
    *token_lifetime* (``access_check_ttl``: an upstream token issued
    before a revocation must not stretch it, as for a tag list, which is
    asked with them), the upstream's health shared (a refusal is no fault
    of the upstream's: see :attr:`UpstreamPool.refusals_answer`).
    """
    config = upstream.config
    if credentials is not None:
        bearer = credentials.username is None
        config = evolve(
            config,
            username=credentials.username,
            password=None if bearer else credentials.secret,
            token=credentials.secret if bearer else None,
        )
    clone = Upstream(
        config,
        upstream.agent,
        upstream.clock,
        deny=upstream.deny,
        token_lifetime=token_lifetime,
    )
    clone.breaker = upstream.breaker
    return clone


@define(eq=False)
class Passthrough:
    """
    The identities of one process, and what the upstreams confirmed for
    them.  With ``workers``, each process keeps its own (a client landing
    on another process is checked again there).
    """

    clock: IReactorTime
    #: keys the hashes that name credentials in every table
    _key: bytes = field(factory=lambda: os.urandom(32), repr=False)
    #: identity key → (identity, last used)
    _identities: OrderedDict[str, tuple[Identity, float]] = field(
        factory=OrderedDict, repr=False
    )
    #: (identity key, "namespace repository") → when the upstream said yes
    _confirmed: OrderedDict[tuple[str, str], float] = field(factory=OrderedDict)
    _checks: SingleFlight[tuple[str, str], None] = field(factory=SingleFlight)
    log = Logger()

    def __len__(self) -> int:
        return len(self._identities)

    def identity(
        self,
        pool: UpstreamPool,
        credentials: Credentials | None,
        token_lifetime: float | None = None,
    ) -> Identity:
        """Who *credentials* (``None``: a client without its own) are in
        *pool*'s namespace; their upstream tokens reused at most
        *token_lifetime* (the namespace's ``access_check_ttl``)."""
        if credentials is None:
            return Identity(f"{ANONYMOUS} {pool.namespace}", pool, anonymous=True)
        key = hmac.new(
            self._key,
            pool.namespace.encode() + b"\0" + credentials.material(),
            hashlib.sha256,
        ).hexdigest()
        now = self.clock.seconds()
        found = self._identities.pop(key, None)
        if found is not None and now - found[1] < IDENTITY_IDLE:
            identity = found[0]
        else:
            clones = [
                speaking_for(u, credentials, token_lifetime) for u in pool.upstreams
            ]
            origin = clones[list(pool.upstreams).index(pool.origin)]
            clone = evolve(pool, upstreams=clones, origin=origin)
            identity = Identity(key, clone, anonymous=False)
        self._identities[key] = (identity, now)
        while len(self._identities) > MAX_IDENTITIES or (
            self._identities
            and now - next(iter(self._identities.values()))[1] >= IDENTITY_IDLE
        ):
            self._identities.popitem(last=False)
        return identity

    def confirmed(self, identity: Identity, namespace: str, repository: str) -> bool:
        """Did the upstream say *identity* may read *repository* within the
        namespace's ``access_check_ttl``?  (For tests and the status.)"""
        return (identity.key, f"{namespace} {repository}") in self._confirmed

    def forget(
        self, identity: Identity, namespace: NamespaceConfig, repository: str
    ) -> None:
        """The upstream refused *identity* *repository* after all: ask again
        at its next request."""
        self._confirmed.pop((identity.key, f"{namespace.name} {repository}"), None)

    async def verify(self, identity: Identity, namespace: NamespaceConfig) -> None:
        """
        Make sure the upstream takes *identity*'s credentials at all (for
        ``/token``, so that ``docker login`` tells the truth): a ``GET`` of
        its API root at the origin with them, through a token fetched
        afresh from its realm, believed for ``access_check_ttl``.  An
        upstream that cannot be asked is no answer: the credentials pass
        (the upstream judges them again at every pull's check).

        :raises AccessRefused: the upstream or its realm refused them.
        """
        key = (identity.key, f"{namespace.name} ")  # no repository: a login
        if self._believed(key, namespace):
            return

        async def check() -> None:
            pool = identity.pool
            asking = speaking_for(pool.origin, None)
            try:
                response = await pool.ask(asking, "GET", "")
            except UpstreamFailure as failure:
                if failure.status in (401, 403) or failure.credentials_refused:
                    self._confirmed.pop(key, None)
                    raise AccessRefused(401, True) from None
                self.log.info(
                    "{namespace}: upstream {upstream} cannot check {who}'s "
                    "credentials ({why}); left to the pulls' checks",
                    namespace=namespace.name,
                    upstream=pool.origin.name,
                    who=identity.label,
                    why=failure.detail,
                )
                return
            await asking.drain(response)
            pool.answered(asking)
            self._remember(key)

        await self._checks.run(key, check)

    def _believed(self, key: tuple[str, str], namespace: NamespaceConfig) -> bool:
        """Did the upstream say yes about *key* within the namespace's
        ``access_check_ttl`` (kept as the newest, then)?"""
        at = self._confirmed.get(key)
        if at is None or self.clock.seconds() - at >= namespace.access_check_ttl:
            return False
        self._confirmed.move_to_end(key)
        return True

    def _remember(self, key: tuple[str, str]) -> None:
        self._confirmed.pop(key, None)
        self._confirmed[key] = self.clock.seconds()
        while len(self._confirmed) > MAX_CONFIRMED:
            self._confirmed.popitem(last=False)

    async def confirm(
        self,
        identity: Identity,
        namespace: NamespaceConfig,
        repository: str,
        path: str,
    ) -> None:
        """
        Make sure the upstream lets *identity* read *repository*: believed
        for ``access_check_ttl`` once it said so, else asked (a ``HEAD`` of
        *path*, the manifest or blob asked for, at the origin, with a token
        fetched afresh, so that a revoked access ends with the interval,
        whatever the upstream's tokens' lifetime).  One check at a time per
        identity and repository.

        :raises AccessRefused: the upstream refused (401, 403).
        :raises NotInRepository: it answered 404.
        :raises RegistryError: it could not be asked, and *identity* was
            not confirmed within ``access_check_offline``.
        """
        key = (identity.key, f"{namespace.name} {repository}")
        if self._believed(key, namespace):
            return
        await self._checks.run(key, lambda: self._check(identity, namespace, key, path))

    async def _check(
        self,
        identity: Identity,
        namespace: NamespaceConfig,
        key: tuple[str, str],
        path: str,
    ) -> None:
        pool = identity.pool
        origin = pool.origin
        asking = speaking_for(origin, None)  # its credentials, no tokens yet
        try:
            response = await pool.ask(asking, "HEAD", path, {"Accept": MANIFEST_ACCEPT})
        except UpstreamFailure as failure:
            if failure.status in (401, 403):
                self._confirmed.pop(key, None)
                self.log.info(
                    "{namespace}: upstream {upstream} refused {who} {repository} "
                    "({status})",
                    namespace=namespace.name,
                    upstream=origin.name,
                    who=identity.label,
                    repository=key[1].partition(" ")[2],
                    status=failure.status,
                )
                raise AccessRefused(
                    failure.status, failure.credentials_refused
                ) from None
            if failure.status == 404:
                raise NotInRepository() from None
            at = self._confirmed.get(key)
            if (
                at is not None
                and self.clock.seconds() - at < namespace.access_check_offline
            ):
                self.log.info(
                    "{namespace}: upstream {upstream} cannot be asked ({why}); "
                    "{who} was confirmed for {repository} within "
                    "access_check_offline",
                    namespace=namespace.name,
                    upstream=origin.name,
                    why=failure.detail,
                    who=identity.label,
                    repository=key[1].partition(" ")[2],
                )
                return
            raise summarise(namespace.name, [failure]) from None
        await asking.drain(response)
        page = "html" in (header(response, "Content-Type") or "")
        if response.code != 200 or page:
            why = f"answered {response.code} to an access check"
            raise summarise(namespace.name, [pool.invalid(asking, why)])
        pool.answered(asking)
        self._remember(key)
