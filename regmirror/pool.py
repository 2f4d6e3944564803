"""
The ordered upstreams of one namespace, tried in turn until one answers.

Content addressed by digest may come from any upstream (it verifies
itself), so it is asked of the upstreams in their configured order; what a
tag points at is asked of the origin first.
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import define, frozen
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from regmirror.errors import (
    Denied,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    UpstreamBadGateway,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from regmirror.reference import (
    MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    Digest,
    manifest_media_type,
    parse_digest,
)
from regmirror.upstream import (
    Upstream,
    UpstreamFailure,
    _drain,
    header,
    read_body,
    retry_after,
)

MANIFEST_ACCEPT = ", ".join(MANIFEST_TYPES)


@frozen
class Manifest:
    """A manifest's bytes with its media type and digest."""

    digest: Digest
    media_type: str
    body: bytes


@frozen
class TagAnswer:
    """What a tag points at; the manifest too when it had to be fetched."""

    digest: Digest
    upstream: str
    manifest: Manifest | None = None


class NotFoundAnywhere(Exception):
    """Every upstream asked answered 404."""


@define(eq=False)
class UpstreamPool:
    """
    :ivar namespace: the namespace's name, for log lines.
    :ivar upstreams: in the order to try them for content by digest.
    :ivar origin: the upstream that decides what a tag points at.
    """

    namespace: str
    upstreams: Sequence[Upstream]
    origin: Upstream
    log = Logger()

    @property
    def mirrors(self) -> list[Upstream]:
        """The upstreams other than the origin, in order."""
        return [u for u in self.upstreams if u is not self.origin]

    async def ask(
        self,
        upstream: Upstream,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
    ) -> IResponse:
        """
        Send one request to one upstream.

        :return: a 2xx response, its body unread.
        :raises UpstreamFailure: for any other answer, or none (logged unless
            it is a 404, which is an answer, not a fault).
        """
        waiting = upstream.backing_off()
        if waiting is not None:
            raise UpstreamFailure(
                upstream.name,
                "backoff",
                f"rate limited for another {int(waiting)}s",
                status=429,
                retry_after=waiting,
            )
        try:
            response = await upstream.request(method, path, headers, query=query)
        except UpstreamFailure as failure:
            self._skip(failure)
            raise
        if 200 <= response.code < 300:
            return response
        await _drain(response)
        refused = UpstreamFailure(
            upstream.name,
            "status",
            f"answered {response.code}",
            status=response.code,
            retry_after=retry_after(response),
        )
        if response.code != 404:
            self._skip(refused)
        raise refused

    async def first_answer(
        self,
        order: Sequence[Upstream],
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
    ) -> tuple[Upstream, IResponse]:
        """
        Send the request to each upstream in *order* until one answers with
        a 2xx.

        :raises NotFoundAnywhere: when every upstream answered 404.
        :raises RegistryError: describing the failures otherwise.
        """
        failures: list[UpstreamFailure] = []
        for upstream in order:
            try:
                return upstream, await self.ask(upstream, method, path, headers, query)
            except UpstreamFailure as failure:
                failures.append(failure)
        raise summarise(self.namespace, failures)

    def _skip(self, failure: UpstreamFailure) -> None:
        self.log.warn(
            "{namespace}: skipping upstream {upstream}: {detail}",
            namespace=self.namespace,
            upstream=failure.upstream,
            detail=failure.detail,
        )

    async def open_blob(
        self, repository: str, digest: Digest
    ) -> tuple[Upstream, IResponse]:
        """A GET response for a blob, its body unread."""
        return await self.first_answer(
            self.upstreams, "GET", f"{repository}/blobs/{digest}"
        )

    async def blob_size(self, repository: str, digest: Digest) -> int | None:
        """The size of a blob as an upstream reports it (HEAD)."""
        _, response = await self.first_answer(
            self.upstreams, "HEAD", f"{repository}/blobs/{digest}"
        )
        await _drain(response)
        length = header(response, "Content-Length")
        return int(length) if length and length.isdigit() else None

    async def manifest(self, repository: str, digest: Digest) -> Manifest:
        """A manifest by digest, from the first upstream with a correct copy."""
        path = f"{repository}/manifests/{digest}"
        failures: list[UpstreamFailure] = []
        for upstream in self.upstreams:
            try:
                response = await self.ask(
                    upstream, "GET", path, {"Accept": MANIFEST_ACCEPT}
                )
                return await _read_manifest(upstream, response, digest)
            except UpstreamFailure as failure:
                failures.append(failure)
        raise summarise(self.namespace, failures)

    async def resolve_tag(
        self, repository: str, tag: str, order: Sequence[Upstream]
    ) -> TagAnswer:
        """
        What *tag* points at, asked of *order* in turn: HEAD first (Docker Hub
        does not count it against its pull limit), GET when the HEAD answer
        carries no usable digest.
        """
        path = f"{repository}/manifests/{tag}"
        accept = {"Accept": MANIFEST_ACCEPT}
        failures: list[UpstreamFailure] = []
        for upstream in order:
            try:
                response = await self.ask(upstream, "HEAD", path, accept)
                await _drain(response)
                announced = _digest_header(response)
                if announced is not None:
                    return TagAnswer(announced, upstream.name)
                response = await self.ask(upstream, "GET", path, accept)
                manifest = await _read_manifest(upstream, response, None)
                return TagAnswer(manifest.digest, upstream.name, manifest)
            except UpstreamFailure as failure:
                failures.append(failure)
        raise summarise(self.namespace, failures)


def _digest_header(response: IResponse) -> Digest | None:
    """The response's ``Docker-Content-Digest``, if present and well-formed."""
    announced = header(response, "Docker-Content-Digest")
    if announced:
        try:
            return parse_digest(announced)
        except RegistryError:
            pass
    return None


async def _read_manifest(
    upstream: Upstream, response: IResponse, digest: Digest | None
) -> Manifest:
    """
    Read and check a manifest answer: size, media type, and the digest it
    was asked for (or the one the upstream announced).

    :raises UpstreamFailure: for an answer that is no correct manifest.
    """
    try:
        body = await read_body(response, MAX_MANIFEST_SIZE)
    except ValueError as e:
        raise UpstreamFailure(upstream.name, "invalid", str(e)) from None
    media_type = manifest_media_type(body, header(response, "Content-Type"))
    if media_type is None:
        raise UpstreamFailure(upstream.name, "invalid", "answer is not a manifest")
    if digest is None:
        digest = _digest_header(response)
    actual = Digest.of(body, digest.algorithm if digest else "sha256")
    if digest is not None and actual != digest:
        raise UpstreamFailure(
            upstream.name, "invalid", f"manifest is {actual}, not {digest}"
        )
    return Manifest(actual, media_type, body)


def summarise(namespace: str, failures: Sequence[UpstreamFailure]) -> Exception:
    """The error to give a client after every upstream failed."""
    if all(f.status == 404 for f in failures):
        return NotFoundAnywhere()
    limited = [f for f in failures if f.status == 429]
    if limited:
        waits = [f.retry_after for f in limited if f.retry_after is not None]
        headers = {"Retry-After": str(int(min(waits)))} if waits else {}
        return TooManyRequests(
            f"{namespace}: upstream pull limit reached, try again later", headers
        )
    if any(f.status == 401 for f in failures):
        return Unauthorized(f"{namespace}: the upstream registry refused access")
    if any(f.status == 403 for f in failures):
        return Denied(f"{namespace}: the upstream registry denied access")
    named = "; ".join(str(f) for f in failures)
    if failures and all(f.reason == "timeout" for f in failures):
        return UpstreamTimeout(f"{namespace}: upstreams timed out ({named})")
    if any(f.reason in ("status", "invalid") for f in failures):
        return UpstreamBadGateway(f"{namespace}: no usable answer upstream ({named})")
    return UpstreamUnavailable(f"{namespace}: no upstream reachable ({named})")
