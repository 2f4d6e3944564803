"""
``/v2/``: the pull side of the OCI distribution API as one leaf resource
(repository names contain ``/``, so the raw request path is parsed here,
never a decoded one): dispatch, the access check, the namespace's
repository rules (:mod:`regmirror.repositories`), manifests; blobs go to
:mod:`regmirror.http.blobs`, lists to :mod:`regmirror.http.listing`.
"""

from __future__ import annotations

from typing import Any

from attrs import evolve
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from regmirror.access.gate import Admission, Gate
from regmirror.errors import (
    AccessRefused,
    BlobUnknown,
    Denied,
    ManifestUnknown,
    NotFound,
    RegistryError,
    Unsupported,
)
from regmirror.fetch import Fetcher
from regmirror.http import listing
from regmirror.http.blobs import CLUSTER_BLOBS, BlobEndpoint
from regmirror.http.errors import break_connection, write_error
from regmirror.http.request import (
    RequestInfo,
    refuse_malformed_head,
    route_request,
    start_info,
    text_header,
    write_body,
)
from regmirror.metrics import Metrics
from regmirror.passthrough import Identity, NotInRepository, Passthrough
from regmirror.pool import Manifest
from regmirror.reference import (
    INDEX_TYPES,
    ApiPath,
    Digest,
    accepted_types,
    load_json,
    parse_api_path,
    parse_digest,
    parse_reference,
)
from regmirror.repositories import check as check_repository
from regmirror.routing import Route, Router

__all__ = ["API_VERSION", "RegistryAPI"]

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")


#: The methods the API serves (anything else is 405).
SERVED = (b"GET", b"HEAD")


class RegistryAPI(Resource):
    """
    Everything under ``/v2/`` (and ``/_cluster/blobs/`` for the other
    nodes), one leaf resource.
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
        passthrough: Passthrough | None = None,
    ) -> None:
        super().__init__()
        self._gate = gate
        self._passthrough = passthrough
        self._router = router
        self._fetcher = fetcher
        self._clock = clock
        self._metrics = metrics or fetcher.metrics
        self._blobs = BlobEndpoint(fetcher, clock, self._metrics)

    def render(self, request: Request) -> Any:
        d = Deferred.fromCoroutine(self._respond(request))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    async def _respond(self, request: Request) -> None:
        request.setHeader(*API_VERSION)
        info = start_info(request, self._clock.seconds())
        try:
            await self._handle(request, info)
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
                info.namespace,
                info.endpoint,
                # Clients choose methods: a label of fixed values.
                request.method.decode() if request.method in SERVED else "other",
                str(request.code),
            ).inc()

    async def _handle(self, request: Request, info: RequestInfo) -> None:
        refuse_malformed_head(request)
        if request.method not in SERVED:
            raise Unsupported(
                "this mirror is read-only: only GET and HEAD are allowed",
                {"Allow": "GET, HEAD"},
            )
        if request.path.startswith(CLUSTER_BLOBS):
            info.endpoint = "cluster"
            reference = request.path[len(CLUSTER_BLOBS) :]
            await self._blobs.peer_blob(request, info, reference)
            return
        api = parse_api_path(request.path)
        info.endpoint = api.endpoint
        if api.endpoint == "base":
            if self._gate is not None:
                info.user = await self._gate.check(request, None)
            write_body(request, "application/json", b"{}")
            return
        route = route_request(self._router, request, api.name)
        request.setHeader("OCI-Namespace", route.namespace.name)
        info.namespace = route.namespace.name
        admission = None
        if self._gate is not None:
            admission = await self._gate.admit(request, route)
            info.user = admission.user
        # After the gate (a client it turns away learns nothing of the
        # rules), before anything is asked of the cache or an upstream.
        check_repository(route.namespace, route.repository)
        if route.namespace.passthrough and self._passthrough is not None:
            route, identity = await self._speaking_for(
                request, info, route, api, admission
            )
            try:
                await self._endpoint(request, info, route, api)
            except AccessRefused as refused:
                # Refused upstream after the check passed (access revoked
                # within access_check_ttl): the client's answer, and its
                # next request is checked afresh.
                self._passthrough.forget(identity, route.namespace, route.repository)
                raise self._refusal(request, route, identity, refused) from None
            return
        await self._endpoint(request, info, route, api)

    async def _endpoint(
        self, request: Request, info: RequestInfo, route: Route, api: ApiPath
    ) -> None:
        """Answer *api* for *route*, once the client may ask it."""
        if api.endpoint == "manifests":
            await self._manifest(request, info, route, api.reference)
        elif api.endpoint == "blobs":
            digest = parse_digest(api.reference)
            await self._blobs.blob(request, info, route, digest)
        elif api.endpoint == "tags":
            await listing.tags(request, route)
        elif api.endpoint == "referrers":
            digest = parse_digest(api.reference)
            await listing.referrers(request, route, digest, self._fetcher)
        else:
            raise NotFound("not a registry API endpoint")

    # -- credentials passed through -------------------------------------------

    async def _speaking_for(
        self,
        request: Request,
        info: RequestInfo,
        route: Route,
        api: ApiPath,
        admission: Admission | None,
    ) -> tuple[Route, Identity]:
        """
        *route* with its pool speaking for the client (its own credentials,
        or the configured ones), once the upstream confirmed, with them,
        that the client may read the repository (:mod:`regmirror.passthrough`):
        nothing cached is served before.  A tag list is asked upstream with
        the credentials anyway.
        """
        assert self._passthrough is not None
        own = None if admission is None else admission.credentials
        identity = self._passthrough.identity(
            route.pool, own, route.namespace.access_check_ttl
        )
        if own is not None:
            info.user = identity.label
        spoken = evolve(route, pool=identity.pool)
        if api.endpoint == "tags":
            return spoken, identity
        if api.endpoint == "blobs":
            path = f"{route.repository}/blobs/{parse_digest(api.reference)}"
        elif api.endpoint == "referrers":
            path = f"{route.repository}/manifests/{parse_digest(api.reference)}"
        else:
            path = f"{route.repository}/manifests/{parse_reference(api.reference)}"
        try:
            await self._passthrough.confirm(
                identity, route.namespace, route.repository, path
            )
        except AccessRefused as refused:
            raise self._refusal(request, route, identity, refused) from None
        except NotInRepository:
            if api.endpoint == "blobs":
                raise BlobUnknown(f"blob {api.reference} is unknown upstream") from None
            raise ManifestUnknown(f"{api.reference} is unknown upstream") from None
        return spoken, identity

    def _refusal(
        self, request: Request, route: Route, identity: Identity, refused: AccessRefused
    ) -> RegistryError:
        """The upstream's refusal as the client's answer: a 403 as ``DENIED``,
        a 401 as a challenge (a wrong password counted as a failed login)."""
        where = f"{route.namespace.name}: {route.client_name}"
        if refused.status == 403 or self._gate is None:
            return Denied(f"{where}: the upstream registry denied access")
        if identity.anonymous:
            return self._gate.refused(
                request, route, f"{where}: the upstream registry wants credentials"
            )
        if refused.credentials_refused:
            self._gate.failed_passthrough_login(request)
            why = "the upstream registry refused these credentials"
            error = "invalid_token"
        else:
            why = "these credentials may not read it upstream"
            error = "insufficient_scope"
        return self._gate.refused(request, route, f"{where}: {why}", error)

    # -- manifests ----------------------------------------------------------

    async def _manifest(
        self, request: Request, info: RequestInfo, route: Route, text: str
    ) -> None:
        reference = parse_reference(text)
        pool = route.pool
        if isinstance(reference, Digest):
            digest = reference
        else:
            answer = await self._fetcher.resolve_tag(pool, route.repository, reference)
            digest = answer.digest
            source = listing.tag_source(route, answer.upstream)
            request.setHeader("Regmirror-Tag-Source", source)
        # A digest the namespace's tag named is one it vouches for.
        found = await self._fetcher.find_manifest(
            pool, route.repository, digest, named=not isinstance(reference, Digest)
        )
        info.cache, info.upstream = found.cache, found.source
        manifest = found.manifest
        accepted = accepted_types(text_header(request, "Accept"))
        if accepted is not None and manifest.media_type not in accepted:
            manifest = await self._negotiate(route, manifest, accepted, reference)
        request.setHeader("Docker-Content-Digest", str(manifest.digest))
        request.setHeader("ETag", f'"{manifest.digest}"')
        write_body(request, manifest.media_type, manifest.body)
        if request.method == b"GET":
            # Not for a HEAD: clients send one to see whether a tag moved,
            # and then pull nothing when it did not.
            self._fetcher.pull_ahead(
                pool, route.repository, manifest, route.namespace.prefetch
            )

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
