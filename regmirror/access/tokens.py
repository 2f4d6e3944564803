"""
The bearer tokens the mirror issues at ``/token`` and checks at ``/v2/``:
HMAC-SHA256 over their claims, with a key every process sharing the cache
folder shares.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Iterable
from typing import Any

from attrs import define, field
from twisted.internet.interfaces import IReactorTime

#: What a token lets its holder pull: a namespace's name and a repository
#: in it, as its upstreams name it (``library/`` added where it is).
Grant = tuple[str, str]

#: The ``service`` our tokens are for.
SERVICE = "regmirror"


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

    def issue(
        self, user: str | None, grants: Iterable[Grant], sealed: str | None = None
    ) -> tuple[str, float]:
        """
        A token for *user* (``None``: an anonymous client, ``sub`` then
        ``anonymous`` and ``anon`` true) to pull *grants*, and when it
        expires.  The claim is ``pull``, a list of ``[namespace,
        repository]`` pairs; tokens of the former format (``repositories``:
        bare names, no namespace) name no grant and open nothing.
        *sealed*: the client's own upstream credentials, sealed
        (:func:`regmirror.passthrough.seal`), as the ``own`` claim.
        """
        expires = self.clock.seconds() + self.ttl
        claims: dict[str, Any] = {
            "sub": "anonymous" if user is None else user,
            "exp": expires,
            "pull": [list(grant) for grant in sorted(set(grants))],
        }
        if user is None:
            claims["anon"] = True
        if sealed is not None:
            claims["own"] = sealed
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

    @property
    def key(self) -> bytes:
        """The signing key, from which the seal's key is derived."""
        return self._key

    @staticmethod
    def anonymous(claims: dict[str, Any]) -> bool:
        """Were verified *claims* issued to a client without credentials?"""
        return claims.get("anon") is True

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
