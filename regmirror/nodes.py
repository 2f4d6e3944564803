"""
The other nodes of a cluster, as a source of blobs.

While one node downloads a blob (it holds the digest's lease in Redis),
the others fetch it from that node's ``/_cluster/blobs/<digest>``, which
serves only what the node has or is downloading itself: it never starts a
download and never contacts an upstream, so it is no proxy.  Requests
carry an HMAC of the digest under the cluster's key (kept in Redis), so a
client cannot use the endpoint to bypass access control, and the key
itself never crosses the network.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from attrs import define
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from regmirror.reference import Digest
from regmirror.responses import discard

#: The path prefix of the node-to-node blob endpoint.
PATH = b"_cluster"
#: The request header that carries the HMAC.
AUTH_HEADER = b"regmirror-cluster-auth"


class PeerUnavailable(Exception):
    """The other node did not give the blob; the message says why."""


def token(key: bytes, digest: Digest) -> str:
    """What a node sends to another to fetch *digest*."""
    return hmac.new(key, str(digest).encode("ascii"), hashlib.sha256).hexdigest()


def authorized(key: bytes, digest: Digest, given: bytes | None) -> bool:
    """Whether *given* is the token for *digest* under *key*."""
    if given is None:
        return False
    return hmac.compare_digest(token(key, digest).encode("ascii"), given.strip())


@define
class Peers:
    """Fetches blobs from the other nodes of the cluster."""

    agent: IAgent
    clock: IReactorTime
    #: how long a node may take to start answering
    timeout: float = 10.0

    async def open_blob(
        self, url: str, key: bytes, digest: Digest, offset: int = 0
    ) -> IResponse:
        """
        The blob's bytes from *offset* on, from the node advertised at *url*.

        :raises PeerUnavailable: for anything but a 200 or 206 answer.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PeerUnavailable(f"not a node URL: {url[:100]!r}")
        target = f"{url.rstrip('/')}/{PATH.decode()}/blobs/{digest}"
        headers = Headers(
            {
                AUTH_HEADER: [token(key, digest).encode("ascii")],
                b"accept-encoding": [b"identity"],
            }
        )
        if offset:
            headers.setRawHeaders(b"range", [f"bytes={offset}-".encode("ascii")])
        d = self.agent.request(b"GET", target.encode("ascii"), headers, None)
        d.addTimeout(self.timeout, self.clock)
        try:
            response: IResponse = await d
        except (CancelledError, TimeoutError):
            raise PeerUnavailable(
                f"{url} did not answer within {self.timeout:g}s"
            ) from None
        except Exception as e:
            raise PeerUnavailable(f"{url}: {e.__class__.__name__}") from None
        if response.code in (200, 206):
            return response
        discard(response)
        raise PeerUnavailable(f"{url} answered {response.code}")
