"""
A small registry written with twisted.web, for faults that real registries
will not produce on demand: wrong bytes, held-open bodies, errors on cue.
It records every request it sees.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeRegistry(Resource):
    """
    Serves ``/v2/<name>/(manifests|blobs|tags|referrers)/...`` from dicts.

    :ivar requests: ``(method, path)`` of every request, in order.
    :ivar blobs: digest → bytes.
    :ivar manifests: digest → (media type, bytes).
    :ivar tags: ``(name, tag)`` → digest.
    :ivar corrupt: digests whose bytes are served altered (same length).
    :ivar hold: digests whose body is sent only up to this many bytes and
        then held open; :meth:`release` finishes them.
    :ivar fault: when set, called with each request; a non-None return is
        answered as ``(status, body)`` instead.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str]] = []
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[str, bytes]] = {}
        self.tags: dict[tuple[str, str], str] = {}
        self.corrupt: set[str] = set()
        self.hold: dict[str, int] = {}
        self.held: list[tuple[Request, bytes]] = []
        #: digests served without a Content-Length (chunked), to a HEAD too
        self.unsized: set[str] = set()
        #: digest → the Content-Length a HEAD of it says (another than its
        #: size: a broken upstream)
        self.head_size: dict[str, int] = {}
        #: the Range header of every blob request that had one
        self.ranges: list[str] = []
        #: digests whose body breaks off after this many bytes
        self.drop: dict[str, int] = {}
        #: digests whose every GET body, ranged or not, breaks off after
        #: this many bytes of it (a congested mirror)
        self.flaky: dict[str, int] = {}
        #: answer every blob GET whole (200), whatever its Range header
        self.ignore_range = False
        #: ``(digest, first byte)`` → n: the next ranged GET of the blob
        #: from that byte breaks off after n bytes of its body (once)
        self.break_range: dict[tuple[str, int], int] = {}
        #: ``(digest, first byte)`` → n: ranged GETs of the blob from that
        #: byte send n bytes of their body and are held (:meth:`release`)
        self.hold_range: dict[tuple[str, int], int] = {}
        #: when set, blobs are served with this Content-Type
        self.blob_type = "application/octet-stream"
        self.fault: Callable[[Request], tuple[int, bytes] | None] | None = None
        self.link: str | None = None
        #: when set, blobs answer with a redirect to ``<redirect>/cdn/<digest>``
        self.redirect: str | None = None
        #: when set, /v2/ paths want ``Authorization: Bearer <token>``
        self.token: str | None = None
        #: ``(path, Authorization header)`` of every request
        self.authorizations: list[tuple[str, str | None]] = []
        #: where the Bearer challenge sends clients for a token
        self.realm = "http://auth.test/token"
        #: when set, the token endpoint wants this ``Authorization`` header
        self.token_credentials: str | None = None
        #: when set, /v2/ paths want this ``Authorization: Basic ...`` value
        self.basic: str | None = None
        #: ``(limit, remaining)`` sent as RateLimit-* headers on manifests
        self.quota: tuple[int, int] | None = None
        #: when true, requests are recorded and never answered (an
        #: upstream that accepts and then says nothing)
        self.silent = False

    # -- content ------------------------------------------------------------

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(
        self, name: str, tag: str | None, document: dict[str, Any], media_type: str
    ) -> tuple[str, bytes]:
        body = json.dumps(document).encode()
        digest = digest_of(body)
        self.manifests[digest] = (media_type, body)
        if tag is not None:
            self.tags[(name, tag)] = digest
        return digest, body

    def count(self, method: str, fragment: str) -> int:
        """How many requests of *method* had *fragment* in their path."""
        return sum(1 for m, p in self.requests if m == method and fragment in p)

    def cut(self) -> None:
        """Break the connection of every held body."""
        held, self.held = self.held, []
        for request, _ in held:
            request.loseConnection()

    def release(self) -> None:
        """Finish every held body."""
        held, self.held = self.held, []
        for request, rest in held:
            request.write(rest)
            request.finish()

    # -- HTTP ---------------------------------------------------------------

    def render(self, request: Request) -> Any:
        method = request.method.decode()
        path = request.path.decode()
        self.requests.append((method, path))
        authorization = request.getHeader("Authorization")
        self.authorizations.append((path, authorization))
        if self.silent:
            return NOT_DONE_YET
        if path == "/token":
            if self.token_credentials not in (None, authorization):
                request.setResponseCode(401)
                return b'{"details":"bad credentials"}'
            request.setHeader("Content-Type", "application/json")
            return json.dumps({"token": self.token, "expires_in": 300}).encode()
        if path.startswith("/cdn/"):
            return self._blob(path[len("/cdn/") :], request)
        if self.token is not None and authorization != f"Bearer {self.token}":
            request.setResponseCode(401)
            request.setHeader(
                "WWW-Authenticate",
                f'Bearer realm="{self.realm}",service="fake",'
                'scope="repository:library/app:pull"',
            )
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}'
        if self.basic is not None and authorization != self.basic:
            request.setResponseCode(401)
            request.setHeader("WWW-Authenticate", 'Basic realm="fake"')
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"basic"}]}'
        if self.fault is not None:
            answer = self.fault(request)
            if answer is not None:
                request.setResponseCode(answer[0])
                return answer[1]
        parts = path.split("/")[2:]
        if len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
            return self._tags("/".join(parts[:-2]), request)
        if len(parts) < 3:
            return self._missing(request, "NOT_FOUND")
        name, kind, reference = "/".join(parts[:-2]), parts[-2], parts[-1]
        if kind == "manifests":
            return self._manifest(name, reference, request)
        if kind == "blobs":
            return self._blob(reference, request)
        return self._missing(request, "NOT_FOUND")

    def _missing(self, request: Request, code: str) -> bytes:
        request.setResponseCode(404)
        request.setHeader("Content-Type", "application/json")
        return json.dumps({"errors": [{"code": code, "message": "no"}]}).encode()

    def _manifest(self, name: str, reference: str, request: Request) -> Any:
        digest = reference if ":" in reference else self.tags.get((name, reference))
        if digest is None or digest not in self.manifests:
            return self._missing(request, "MANIFEST_UNKNOWN")
        media_type, body = self.manifests[digest]
        if self.quota is not None:
            request.setHeader("RateLimit-Limit", f"{self.quota[0]};w=21600")
            request.setHeader("RateLimit-Remaining", f"{self.quota[1]};w=21600")
        if digest in self.corrupt:
            body = body.replace(b"{", b" ", 1)
        request.setHeader("Content-Type", media_type)
        request.setHeader("Docker-Content-Digest", digest)
        request.setHeader("Content-Length", str(len(body)))
        return b"" if request.method == b"HEAD" else body

    def _blob(self, digest: str, request: Request) -> Any:
        data = self.blobs.get(digest)
        if data is None:
            return self._missing(request, "BLOB_UNKNOWN")
        if self.redirect is not None and not request.path.startswith(b"/cdn/"):
            request.setResponseCode(307)
            request.setHeader("Location", f"{self.redirect}/cdn/{digest}")
            return b""
        if digest in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        request.setHeader("Content-Type", self.blob_type)
        request.setHeader("Docker-Content-Digest", digest)
        if digest in self.unsized:
            if request.method == b"HEAD":
                return b""  # no length: twisted.web adds none to a HEAD
            split = self.hold.get(digest, len(data))
            for start in range(0, split, 1000):  # chunked, no length
                request.write(data[start : min(start + 1000, split)])
            if split < len(data):
                self.held.append((request, data[split:]))
                return NOT_DONE_YET
            request.finish()
            return NOT_DONE_YET
        request.setHeader("Content-Length", str(len(data)))
        if request.method == b"HEAD":
            size = self.head_size.get(digest, len(data))
            request.setHeader("Content-Length", str(size))
            return b""
        wanted = request.getHeader("Range") or ""
        if wanted:
            self.ranges.append(wanted)
        elif digest in self.drop:
            request.write(data[: self.drop[digest]])
            request.loseConnection()
            return NOT_DONE_YET
        bounds = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
        ranged = bounds is not None and not self.ignore_range
        if bounds is not None and ranged:
            start = int(bounds.group(1))
            last = int(bounds.group(2) or len(data) - 1)
            request.setResponseCode(206)
            request.setHeader("Content-Range", f"bytes {start}-{last}/{len(data)}")
            request.setHeader("Content-Length", str(last + 1 - start))
            data = data[start : last + 1]
            cut = self.break_range.pop((digest, start), None)
            if cut is not None:
                request.write(data[:cut])
                request.loseConnection()
                return NOT_DONE_YET
            if (digest, start) in self.hold_range:
                split = self.hold_range[(digest, start)]
                request.write(data[:split])
                self.held.append((request, data[split:]))
                return NOT_DONE_YET
        if digest in self.flaky:
            request.write(data[: self.flaky[digest]])
            request.loseConnection()
            return NOT_DONE_YET
        if ranged:
            return data
        if digest in self.hold:
            split = self.hold[digest]
            request.write(data[:split])
            self.held.append((request, data[split:]))
            return NOT_DONE_YET
        return data

    def _tags(self, name: str, request: Request) -> bytes:
        tags = sorted(t for (n, t) in self.tags if n == name)
        if not tags:
            return self._missing(request, "NAME_UNKNOWN")
        if self.link is not None:
            request.setHeader("Link", self.link)
        request.setHeader("Content-Type", "application/json")
        return json.dumps({"name": name, "tags": tags}).encode()
