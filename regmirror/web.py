"""
The HTTP face: twisted.web resources for the pull side of the OCI
distribution API, OCI error bodies, ``Range``, and a listener wrapper that
answers a TLS handshake on a plain-HTTP port at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from regmirror import nodes
from regmirror._sendfile import SocketSender
from regmirror.access import Gate, valid_host
from regmirror.cluster import CoordinatorDown
from regmirror.errors import (
    BadRequest,
    BlobUnknown,
    Denied,
    ManifestUnknown,
    NameUnknown,
    NotFound,
    PaginationInvalid,
    RangeInvalid,
    RegistryError,
    Unauthorized,
    Unsupported,
    UpstreamBadGateway,
    UpstreamUnavailable,
)
from regmirror.fetch import Fetcher
from regmirror.http.channel import _PlainOnly
from regmirror.http.resource import ReadOnlyResource
from regmirror.metrics import Metrics
from regmirror.pool import Manifest, NotFoundAnywhere, UpstreamPool
from regmirror.readers import BlobSource, Relay, SpoolReader
from regmirror.reference import (
    INDEX_TYPES,
    OCI_INDEX,
    Digest,
    accepted_types,
    load_json,
    parse_api_path,
    parse_digest,
    parse_reference,
    referrers_tag,
    validate_tag,
)
from regmirror.routing import Route, Router
from regmirror.upstream import Upstream, UpstreamFailure, header

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """
    Interpret a ``Range`` header for a body of *size* bytes.

    :return: ``(start, end)`` with *end* exclusive, or ``None`` to send the
        whole body (no header, a malformed one, or several ranges, all of
        which RFC 9110 lets a server ignore).
    :raises RangeInvalid: when the single range cannot be satisfied.
    """
    if value is None:
        return None
    match = _RANGE.fullmatch(value.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    unsatisfiable = RangeInvalid(
        f"range {value[:80]} cannot be satisfied", _unsatisfied(size)
    )
    if not first:
        # A suffix: the last N bytes.
        length = _number(last)
        if length == 0 or size == 0:
            raise unsatisfiable
        return max(0, size - length), size
    start = _number(first)
    if last and _order(last) < _order(first):
        return None
    if start >= size:
        raise unsatisfiable
    end = size if not last else min(_number(last) + 1, size)
    return start, end


def _order(digits: str) -> tuple[int, str]:
    """Sorts digit strings by value, however long, without converting them."""
    significant = digits.lstrip("0")
    return len(significant), significant


def _number(digits: str) -> int:
    """A byte position; absurdly long ones are merely "very large"."""
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= 18 else 10**18


def _unsatisfied(size: int) -> dict[str, str]:
    return {"Content-Range": f"bytes */{size}"}


def _query(request: Request, name: str) -> str | None:
    values: list[bytes] | None = request.args.get(name.encode("ascii"))
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


def route_request(router: Router, request: Request, name: str) -> Route:
    """
    The route of a request for repository *name*, from its ``ns`` parameter
    and ``Host`` header: the one decision of a request's namespace, for a
    pull and for a token (``/token`` routes each scope's name with its own
    ``ns`` and ``Host``, which a client takes from our challenge's realm).

    :raises BadRequest: for ``ns`` given more than once.
    """
    return router.route(name, ns=_ns(request), host=_text_header(request, "Host"))


def _ns(request: Request) -> str | None:
    """
    The ``ns`` parameter.

    :raises BadRequest: when given more than once: which one counts would
        depend on who reads it (a proxy in front, or us).
    """
    values = request.args.get(b"ns") or []
    if len(values) > 1:
        raise BadRequest(f"{len(values)} ns parameters; one allowed")
    return _query(request, "ns")


def _text_header(request: Request, name: str) -> str | None:
    """
    A request header read whole: a list-based field (``Accept``, ``Range``)
    sent on several lines means the lines joined with ", " (RFC 9110
    5.3).  ``getHeader`` would keep only the last line: dockerd sends each
    ``Accept`` type on a line of its own, in an order that changes.
    """
    # By bytes: a str name makes Twisted decode the value as UTF-8, which
    # any client can make fail.
    lines = request.requestHeaders.getRawHeaders(name.lower().encode("ascii"))
    if not lines:
        return None
    return ", ".join(line.decode("latin-1") for line in lines)


#: Fields that may appear once only (RFC 9110 5.3, RFC 9112 3.2 for
#: ``Host``): which of several lines counts would depend on who reads them
#: (a proxy in front may take the first, Twisted's ``getHeader`` the last).
_SINGLETONS = (b"host", b"authorization")


def _refuse_malformed_head(request: Request) -> None:
    """
    :raises BadRequest: when a field that may appear once appears more
        often, or the ``Host`` is no ``host[:port]`` (RFC 9112 3.2: 400),
        before anything reads it: routing, and the challenge's realm.
    """
    for name in _SINGLETONS:
        lines = request.requestHeaders.getRawHeaders(name) or []
        if len(lines) > 1:
            raise BadRequest(f"{len(lines)} {name.decode()} header lines; one allowed")
    host = request.requestHeaders.getRawHeaders(b"host")
    if host and not valid_host(host[0].decode("latin-1")):
        raise BadRequest("the Host header is not a host[:port]")


def break_connection(request: Request) -> None:
    """
    Drop the client's connection mid-response, so that it sees an error
    rather than a short body it could take for complete.
    """
    transport: Any = request.channel.transport if request.channel else None
    if transport is not None:
        transport.abortConnection()


def sendfile_transport(request: Request) -> Any:
    """
    The TCP transport under a request whose body may go out with
    ``sendfile``, or ``None`` to write it through twisted.web as usual:
    under TLS, or anything else but a plain HTTP/1.x connection whose
    response has a length and whose transport is ready to take more.
    """
    channel = request.channel
    if (
        not isinstance(channel, HTTPChannel)
        or request.method != b"GET"
        or request.clientproto not in (b"HTTP/1.0", b"HTTP/1.1")
        or not request.responseHeaders.hasHeader(b"Content-Length")
        or request.startedWriting
    ):
        return None
    transport: Any = channel.transport
    while isinstance(transport, _PlainOnly):
        transport = transport.transport
    # TLS wraps the protocol (another transport in between) or, after
    # startTLS, says so on the TCP transport itself.
    if (
        type(transport) is not tcp.Server
        or getattr(transport, "TLS", True)
        or not transport.connected
        or transport.disconnecting
        or transport.producer is not channel
        or not transport.streamingProducer
        or transport.producerPaused
    ):
        return None
    return transport


def write_error(request: Request, error: RegistryError) -> None:
    """Answer with *error* as an OCI error body (headers only for HEAD)."""
    body = error.body()
    request.setResponseCode(error.status)
    request.setHeader("Content-Type", "application/json")
    request.setHeader("Content-Length", str(len(body)))
    for name, value in error.headers.items():
        request.setHeader(name, value)
    request.write(body)
    request.finish()


def _write_body(
    request: Request, content_type: str, body: bytes, status: int = 200
) -> None:
    request.setResponseCode(status)
    request.setHeader("Content-Type", content_type)
    request.setHeader("Content-Length", str(len(body)))
    request.write(body)
    request.finish()


#: Where the other nodes of a cluster fetch blobs (see :mod:`regmirror.nodes`).
CLUSTER_BLOBS = b"/" + nodes.PATH + b"/blobs/"


class RegistryAPI(Resource):
    """
    Everything under ``/v2/``, one leaf resource: repository names contain
    ``/``, so the raw request path is parsed here, never a decoded one.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        router: Router,
        fetcher: Fetcher,
        clock: IReactorTime,
        metrics: Metrics | None = None,
        gate: Gate | None = None,
    ) -> None:
        super().__init__()
        self._gate = gate
        self._router = router
        self._fetcher = fetcher
        self._clock = clock
        self._metrics = metrics or fetcher.metrics

    def render(self, request: Request) -> Any:
        d = Deferred.fromCoroutine(self._respond(request))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    async def _respond(self, request: Request) -> None:
        request.setHeader(*API_VERSION)
        labels: dict[str, Any] = {
            "namespace": "",
            "endpoint": "other",
            "started": self._clock.seconds(),
        }
        setattr(request, "regmirror", labels)  # noqa: B010 (for the access log)
        try:
            await self._handle(request, labels)
        except RegistryError as error:
            if not request.startedWriting:
                write_error(request, error)
            elif not request.finished:
                break_connection(request)
        except CancelledError:
            pass  # the client went away
        except Exception:
            self.log.failure(
                "cannot answer {method} {path}",
                method=request.method,
                path=request.path,
            )
            if not request.startedWriting:
                write_error(request, RegistryError("internal error"))
            elif not request.finished:
                break_connection(request)
        finally:
            self._metrics.requests.labels(
                labels["namespace"],
                labels["endpoint"],
                request.method.decode("ascii", "replace"),
                str(request.code),
            ).inc()

    async def _handle(self, request: Request, labels: dict[str, str]) -> None:
        _refuse_malformed_head(request)
        if request.method not in (b"GET", b"HEAD"):
            raise Unsupported(
                "this mirror is read-only: only GET and HEAD are allowed",
                {"Allow": "GET, HEAD"},
            )
        if request.path.startswith(CLUSTER_BLOBS):
            labels["endpoint"] = "cluster"
            await self._peer_blob(request, request.path[len(CLUSTER_BLOBS) :])
            return
        api = parse_api_path(request.path)
        labels["endpoint"] = api.endpoint
        if api.endpoint == "base":
            if self._gate is not None:
                labels["user"] = await self._gate.check(request, None)
            _write_body(request, "application/json", b"{}")
            return
        route = route_request(self._router, request, api.name)
        request.setHeader("OCI-Namespace", route.namespace.name)
        labels["namespace"] = route.namespace.name
        if self._gate is not None:
            labels["user"] = await self._gate.check(request, route)
        if api.endpoint == "manifests":
            await self._manifest(request, route, api.reference)
        elif api.endpoint == "blobs":
            await self._blob(request, route, parse_digest(api.reference))
        elif api.endpoint == "tags":
            await self._tags(request, route)
        elif api.endpoint == "referrers":
            await self._referrers(request, route, parse_digest(api.reference))
        else:
            raise NotFound("not a registry API endpoint")

    # -- manifests ----------------------------------------------------------

    async def _manifest(self, request: Request, route: Route, text: str) -> None:
        reference = parse_reference(text)
        pool = route.pool
        if isinstance(reference, Digest):
            digest = reference
        else:
            answer = await self._fetcher.resolve_tag(pool, route.repository, reference)
            digest = answer.digest
            source = (
                "origin" if answer.upstream == pool.origin.name else answer.upstream
            )
            request.setHeader("Regmirror-Tag-Source", source)
        manifest = await self._fetcher.manifest(pool, route.repository, digest)
        accepted = accepted_types(_text_header(request, "Accept"))
        if accepted is not None and manifest.media_type not in accepted:
            manifest = await self._negotiate(route, manifest, accepted, reference)
        request.setHeader("Docker-Content-Digest", str(manifest.digest))
        request.setHeader("ETag", f'"{manifest.digest}"')
        _write_body(request, manifest.media_type, manifest.body)

    async def _negotiate(
        self,
        route: Route,
        manifest: Manifest,
        accepted: frozenset[str],
        reference: str | Digest,
    ) -> Manifest:
        """
        The manifest to answer with when the client does not name this one's
        type.  A single image manifest is served anyway, as registries do
        (clients check the type themselves).  So is an index when the client
        accepts the other index type: an OCI index and a Docker manifest
        list have the same shape, and answering with one platform's image
        instead would give the client an image the tag does not name, maybe
        not its platform.  Only a client that accepts no index type at all,
        asking by tag, gets the index's linux/amd64 image, as registries do
        for clients that predate indexes; by digest it gets 404.
        """
        if manifest.media_type not in INDEX_TYPES or accepted & INDEX_TYPES:
            return manifest
        unacceptable = ManifestUnknown(
            f"the manifest is {manifest.media_type}, and the request's Accept "
            "header names no index type"
        )
        if isinstance(reference, Digest):
            raise unacceptable
        try:
            entries = load_json(manifest.body).get("manifests", [])
            chosen = next(
                entry
                for entry in entries
                if entry.get("platform", {}).get("os") == "linux"
                and entry.get("platform", {}).get("architecture") == "amd64"
            )
            digest = parse_digest(chosen["digest"])
        except (
            ValueError,
            AttributeError,
            StopIteration,
            KeyError,
            TypeError,
            RegistryError,
        ):
            raise unacceptable from None
        child = await self._fetcher.manifest(route.pool, route.repository, digest)
        if child.media_type in INDEX_TYPES:
            raise unacceptable
        # An image manifest, like any other, whatever type the client named
        # (an OCI image for a client that names only Docker's, say).
        return child

    # -- blobs --------------------------------------------------------------

    async def _blob(self, request: Request, route: Route, digest: Digest) -> None:
        request.setHeader("Docker-Content-Digest", str(digest))
        request.setHeader("ETag", f'"{digest}"')
        request.setHeader("Accept-Ranges", "bytes")
        request.setHeader("Content-Type", "application/octet-stream")
        if request.method == b"HEAD":
            size = await self._fetcher.blob_size(route.pool, route.repository, digest)
            if size is not None:
                request.setHeader("Content-Length", str(size))
            request.finish()
            return
        location = await self._fetcher.redirect(digest)
        if location is not None:
            labels: dict[str, Any] = getattr(request, "regmirror", {})
            labels["cache"] = "redirect"
            request.setResponseCode(307)
            request.setHeader("Location", location)
            request.setHeader("Content-Length", "0")
            request.finish()
            return
        source = await self._fetcher.blob(route.pool, route.repository, digest)
        await self._serve(request, source, digest)

    async def _peer_blob(self, request: Request, reference: bytes) -> None:
        """
        A blob for another node of the cluster: only what this node has
        or downloads itself (``Fetcher.local_blob``), for a request that
        carries the digest's token under the cluster's key.
        """
        coordinator = self._fetcher.coordinator
        if coordinator is None:
            raise NotFound("this node is not in a cluster")
        digest = parse_digest(reference.decode("ascii", "replace"))
        try:
            key = await coordinator.peer_key()
        except CoordinatorDown:
            raise UpstreamUnavailable("the cluster's Redis is down") from None
        given = request.requestHeaders.getRawHeaders(nodes.AUTH_HEADER) or []
        # One token, on one line: a second line is no honest node's.
        if not nodes.authorized(key, digest, given[0] if len(given) == 1 else None):
            raise Denied("not a node of this cluster")
        source = await self._fetcher.local_blob(digest)
        if source is None:
            raise BlobUnknown(f"this node is not downloading {digest}")
        request.setHeader("Docker-Content-Digest", str(digest))
        request.setHeader("Content-Type", "application/octet-stream")
        await self._serve(request, source, digest)

    async def _serve(
        self, request: Request, source: BlobSource, digest: Digest
    ) -> None:
        """Stream a blob source, whole or the requested range."""
        labels: dict[str, Any] = getattr(request, "regmirror", {})
        if source.download is not None:
            labels["cache"], labels["upstream"] = "miss", source.download.source
        else:
            labels["cache"] = "relay" if source.relay is not None else "hit"
        if source.relay is not None:
            await self._relay(request, source, digest)
            return
        start, end = 0, source.size
        if source.size is not None:
            wanted = parse_range(_text_header(request, "Range"), source.size)
            if wanted is not None:
                start, end = wanted
                request.setResponseCode(206)
                request.setHeader(
                    "Content-Range", f"bytes {start}-{end - 1}/{source.size}"
                )
            request.setHeader("Content-Length", str((end or 0) - start))
        served = self._metrics.served_bytes.labels(
            "cache" if source.download is None else "download"
        )
        reader: SpoolReader | SocketSender
        transport = sendfile_transport(request)
        if transport is not None and end is not None:
            kernel = self._metrics.sendfile_bytes

            def sent(size: int) -> None:
                served.inc(size)
                kernel.inc(size)
                request.sentLength += size

            reader = SocketSender(source, transport, start, end, sent)
            request.write(b"")  # the head, into the transport's buffer
        else:
            reader = SpoolReader(source, request, self._clock, start, end, served.inc)
        store = self._fetcher.store
        store.acquire(digest)
        reader.begin()
        try:
            await self._deliver(request, reader.done, digest, reader.stopProducing)
        finally:
            store.release(digest)

    async def _relay(
        self, request: Request, source: BlobSource, digest: Digest
    ) -> None:
        """Stream a blob straight from upstream (the cache cannot take it)."""
        assert source.relay is not None
        if source.size is not None:
            request.setHeader("Content-Length", str(source.size))
        relay = Relay(request, digest, self._metrics.served_bytes.labels("relay").inc)
        request.write(b"")  # the headers go now; the body follows as it comes
        source.relay.deliverBody(relay)
        await self._deliver(request, relay.done, digest)

    async def _deliver(
        self,
        request: Request,
        done: Deferred[None],
        digest: Digest,
        stop: Callable[[], object] | None = None,
    ) -> None:
        """
        Wait for a body to be sent, then finish; if it failed, break the
        connection so that the client cannot take a short body for whole.
        """
        try:
            await done
        except CancelledError:
            if stop is not None:
                stop()
            raise
        except Exception as e:
            self.log.warn(
                "breaking the response for {digest}: {why}",
                digest=str(digest),
                why=str(e),
            )
            break_connection(request)
            return
        request.finish()

    # -- pass-through -------------------------------------------------------

    async def _tags(self, request: Request, route: Route) -> None:
        query: dict[str, str] = {}
        n = _query(request, "n")
        if n is not None:
            if not n.isdigit():
                raise PaginationInvalid(f"n must be a number, not {n[:20]!r}")
            query["n"] = n
        last = _query(request, "last")
        if last is not None:
            query["last"] = validate_tag(last)
        pool = route.pool
        order = [pool.origin, *pool.mirrors]
        try:
            upstream, response = await pool.first_answer(
                order, "GET", f"{route.repository}/tags/list", query=query
            )
        except NotFoundAnywhere:
            raise NameUnknown(f"repository {route.client_name} is unknown") from None
        body = await _read(upstream, response)
        link = header(response, "Link")
        if link:
            target = re.match(r"\s*<([^>]*)>", link)
            if target is not None:
                params = parse_qs(urlsplit(target.group(1)).query)
                following = {k: v[0] for k, v in params.items() if k in ("n", "last")}
                request.setHeader("Link", _next_link(request, route, following))
        elif n is not None or last is not None:
            # Some registries (distribution 2.8 among them) ignore n and
            # last: paginate their full list here, as the spec describes
            # (n is optional with last).
            limit = None if n is None else int(n)
            body, following_last = _paginate(body, limit, last)
            if n is not None and following_last is not None:
                following = {"n": n, "last": following_last}
                request.setHeader("Link", _next_link(request, route, following))
        _write_body(request, "application/json", body)

    async def _referrers(self, request: Request, route: Route, digest: Digest) -> None:
        """
        The referrers of *digest*, as a registry with the referrers API
        answers: from the upstream's API when it has one, else from the
        referrers tag schema; an empty index when there are none, never 404.
        Filtered by ``artifactType`` here when the upstream did not.
        """
        artifact_type = _query(request, "artifactType")
        query = {} if artifact_type is None else {"artifactType": artifact_type}
        answer = await _referrers_api(
            route.pool, f"{route.repository}/referrers/{digest}", query
        )
        if answer is None:
            # No referrers API (404 is what a registry without it answers):
            # the referrers tag schema.
            entries = await self._tagged_referrers(request, route, digest)
        else:
            upstream, response = answer
            body = await _read(upstream, response)
            entries = _index_entries(body, f"upstream {upstream.name}'s referrers")
            applied = header(response, "OCI-Filters-Applied") or ""
            filters = {f.strip().lower() for f in applied.split(",")}
            if artifact_type is None or "artifacttype" in filters:
                if applied:
                    request.setHeader("OCI-Filters-Applied", applied)
                _write_body(request, OCI_INDEX, body)
                return
        if artifact_type is not None:
            entries = [e for e in entries if e.get("artifactType") == artifact_type]
            request.setHeader("OCI-Filters-Applied", "artifactType")
        document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        body = json.dumps(document, separators=(",", ":")).encode("utf-8")
        _write_body(request, OCI_INDEX, body)

    async def _tagged_referrers(
        self, request: Request, route: Route, digest: Digest
    ) -> list[dict[str, Any]]:
        """
        The entries of the index under *digest*'s referrers tag; none when
        the tag does not exist.  The tag is resolved like any other (the
        origin decides, ``tag_ttl``, the policy for an unreachable origin);
        the index it names is content like any other.
        """
        tag = referrers_tag(digest)
        try:
            answer = await self._fetcher.resolve_tag(route.pool, route.repository, tag)
        except ManifestUnknown:
            return []
        source = (
            "origin" if answer.upstream == route.pool.origin.name else answer.upstream
        )
        request.setHeader("Regmirror-Tag-Source", source)
        what = f"the referrers tag {tag}"
        try:
            index = await self._fetcher.manifest(
                route.pool, route.repository, answer.digest
            )
        except ManifestUnknown:
            raise UpstreamBadGateway(
                f"{what} names {answer.digest}, which no upstream has"
            ) from None
        if index.media_type not in INDEX_TYPES:
            raise UpstreamBadGateway(f"{what} names a {index.media_type}, not an index")
        return _index_entries(index.body, what)


async def _referrers_api(
    pool: UpstreamPool, path: str, query: dict[str, str]
) -> tuple[Upstream, IResponse] | None:
    """
    An answer of the referrers API at *path*, or ``None`` when there is
    none to have.  The list changes as artifacts are pushed, so like a tag
    it is the origin's; the mirrors' APIs are asked, in order, only when the
    origin gives no answer at all (a 404 is an answer: it has no such API).

    :raises RegistryError: when no upstream answered.
    """
    try:
        return pool.origin, await pool.ask(pool.origin, "GET", path, query=query)
    except UpstreamFailure as failure:
        if failure.status == 404:
            return None
    try:
        return await pool.first_answer(pool.mirrors, "GET", path, query=query)
    except NotFoundAnywhere:
        # The referrers tag, then, under the policy for an unreachable origin.
        return None


def _index_entries(body: bytes, what: str) -> list[dict[str, Any]]:
    """
    The descriptors listed by an index document.

    :raises UpstreamBadGateway: when *body* (named *what*) is no index.
    """
    document = load_json(body)
    entries = document.get("manifests") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise UpstreamBadGateway(f"{what} is not an image index")
    return [entry for entry in entries if isinstance(entry, dict)]


async def _read(upstream: Upstream, response: IResponse) -> bytes:
    try:
        return await upstream.read(response)
    except ValueError as e:
        raise UpstreamBadGateway(f"upstream {upstream.name}: {e}") from None


def _next_link(request: Request, route: Route, query: dict[str, str]) -> str:
    """
    A ``Link`` to the next page of tags on this mirror, with the name the
    client used (upstream names lack our namespace prefix).
    """
    ns = _query(request, "ns")
    if ns is not None:
        query = {**query, "ns": ns}
    return f'</v2/{route.client_name}/tags/list?{urlencode(query)}>; rel="next"'


def _paginate(body: bytes, n: int | None, last: str | None) -> tuple[bytes, str | None]:
    """
    Cut a full tag list to the page after *last* (all of it without) of at
    most *n* tags (no limit without).

    :return: the page's body, and the ``last`` of the next page if any.
    """
    try:
        document = load_json(body)
        tags = sorted(str(t) for t in document.get("tags") or [])
    except (ValueError, AttributeError, TypeError):
        return body, None
    if last is not None:
        tags = [t for t in tags if t > last]
    if n is None:
        document["tags"] = tags
        return json.dumps(document).encode("utf-8"), None
    more = len(tags) > n
    document["tags"] = tags[:n]
    following = tags[n - 1] if more and n > 0 else None
    return json.dumps(document).encode("utf-8"), following


class TokenResource(ReadOnlyResource):
    """
    ``/token``: the registry token endpoint.  A Basic login gets a token for
    the repositories named in its ``scope`` parameters, an anonymous client
    one for those of them its address may pull anyway.  Each scope's name
    is routed with this request's ``ns`` and ``Host`` by the router that
    routes pulls, and the token names the namespace so decided: it is good
    for that namespace only, however the pull is routed.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, gate: Gate, router: Router) -> None:
        super().__init__()
        self._gate = gate
        self._router = router

    def render_GET(self, request: Request) -> Any:
        d = Deferred.fromCoroutine(self._issue(request))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    async def _issue(self, request: Request) -> None:
        gate = self._gate
        try:
            _refuse_malformed_head(request)
            _ns(request)
            address = gate.client(request)
            scheme, _, credentials = (
                _text_header(request, "Authorization") or ""
            ).partition(" ")
            routes = []
            for value in request.args.get(b"scope", []):
                for scope in value.decode("utf-8", "replace").split(" "):
                    kind, _, rest = scope.partition(":")
                    name, _, actions = rest.rpartition(":")
                    if kind == "repository" and "pull" in actions.split(","):
                        try:
                            routes.append(route_request(self._router, request, name))
                        except RegistryError:
                            continue  # a name no pull could use: no grant
            user: str | None = None
            if scheme.lower() == "basic" and credentials:
                user = await gate.login(address, credentials.strip())
                if user is None:
                    raise Unauthorized(
                        "wrong user name or password",
                        {"WWW-Authenticate": 'Basic realm="regmirror"'},
                    )
            # Anonymous clients (the Docker daemon through registry-mirrors)
            # get a token for what their address may pull anyway, as Docker
            # Hub gives anonymous tokens.
            grants = gate.grantable(address, user, routes)
            token, expires = gate.tokens.issue(user or "anonymous", grants)
        except RegistryError as error:
            if not request.finished:
                write_error(request, error)
            return
        except CancelledError:
            return  # the client went away
        except Exception:
            self.log.failure("cannot issue a token")
            if not request.finished:
                write_error(request, RegistryError("internal error"))
            return
        body = json.dumps(
            {
                "token": token,
                "access_token": token,
                "expires_in": int(gate.config.token_ttl),
                "issued_at": datetime.fromtimestamp(
                    expires - gate.config.token_ttl, UTC
                ).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        ).encode()
        request.setHeader("Content-Type", "application/json")
        request.setHeader("Cache-Control", "no-store")
        request.write(body)
        request.finish()


class NotFoundResource(ReadOnlyResource):
    """Anything outside ``/v2/``: an OCI error, not an HTML page."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        error = NotFound("not a registry API path")
        request.setResponseCode(error.status)
        request.setHeader("Content-Type", "application/json")
        return error.body()


class Health(ReadOnlyResource):
    """
    A probe: 200 ``ok`` when *check* finds nothing wrong, else 503 with the
    problems, one per line.  What *degraded* finds follows ``ok`` (still
    200): the node serves, less well.
    """

    isLeaf = True

    def __init__(
        self,
        check: Callable[[], list[str]],
        degraded: Callable[[], list[str]] = list,
    ) -> None:
        super().__init__()
        self._check = check
        self._degraded = degraded

    def render_GET(self, request: Request) -> bytes:
        problems = self._check()
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        request.setHeader("Cache-Control", "no-store")
        if problems:
            request.setResponseCode(503)
            return "".join(f"{problem}\n" for problem in problems).encode("utf-8")
        notes = self._degraded()
        if notes:
            return "".join(f"ok, degraded: {note}\n" for note in notes).encode("utf-8")
        return b"ok\n"

    render_HEAD = render_GET


class Root(Resource):
    """``/v2/`` and whatever else the service mounts beside it."""

    def __init__(
        self, api: RegistryAPI, children: dict[bytes, Resource] | None = None
    ) -> None:
        super().__init__()
        self.putChild(b"v2", api)
        for name, child in (children or {}).items():
            self.putChild(name, child)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFoundResource()
