"""
The ordered upstreams of one namespace, tried in turn until one answers.

Content addressed by digest may come from any upstream (it verifies
itself), so it is asked of the upstreams in their configured order; what a
tag points at is asked of the origin first.
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from regmirror.config import DEFAULT_ORIGIN_RETRY
from regmirror.errors import (
    AccessRefused,
    Denied,
    RegistryError,
    TooManyRequests,
    UpstreamBadGateway,
    UpstreamRefusedCredentials,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from regmirror.metrics import Metrics
from regmirror.reference import (
    MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    Digest,
    is_immutable,
    manifest_media_type,
    parse_digest,
)
from regmirror.responses import header
from regmirror.stale import StaleAnswer, StaleMirrors
from regmirror.upstream import Upstream, UpstreamFailure, retry_after

MANIFEST_ACCEPT = ", ".join(MANIFEST_TYPES)


@frozen
class Manifest:
    """A manifest's bytes with its media type and digest."""

    digest: Digest
    media_type: str
    body: bytes
    #: the upstream it was read from, for the access log (empty otherwise)
    source: str = field(default="", eq=False)


@frozen
class TagAnswer:
    """What a tag points at; the manifest too when it had to be fetched."""

    digest: Digest
    upstream: str
    manifest: Manifest | None = None


class NotFoundAnywhere(Exception):
    """Every upstream asked answered 404."""


class OriginUnreachable(Exception):
    """
    The origin gave no answer about a tag.

    :ivar error: what to tell a client if nothing else will do.
    :ivar answers: what the mirrors not known to be stale said (asked only
        with ``origin_unreachable = freshest``).
    :ivar not_found: every mirror asked said the tag does not exist.
    """

    def __init__(
        self, error: Exception, answers: list[TagAnswer], not_found: bool = False
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.answers = answers
        self.not_found = not_found


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
    #: what to do about a tag when the origin is unreachable:
    #: ``freshest``, ``cache`` or ``fail``
    origin_unreachable: str = "freshest"
    #: cached tag answers older than this are not used in that case
    max_stale: float = 7 * 86400.0
    #: how long the origin's answer for a tag is reused here; ``None``:
    #: the cache's ``tag_ttl``
    tag_ttl: float | None = None
    #: tags matching one of these globs are asked of the origin once
    immutable_tags: tuple[str, ...] = ()
    #: after the origin failed to answer about a tag, how long it is not
    #: asked about that tag again (0: asked at every pull)
    origin_retry: float = DEFAULT_ORIGIN_RETRY
    #: past ``tag_ttl``, for how long more the last answer the origin gave
    #: is served at once while the origin is asked behind it (0: off)
    stale_while_revalidate: float = 0.0
    #: (mirror, repository) → its last answer that differed from the origin,
    #: at most :data:`MAX_STALE`; with a folder, every process's
    stale: StaleMirrors = field(factory=StaleMirrors)
    #: how many stale answers each mirror gave
    stale_counts: dict[str, int] = field(factory=dict)
    metrics: Metrics = field(factory=Metrics)
    #: content is vouched for per repository, not for the whole namespace
    #: (a namespace with ``allow`` or ``deny``: :mod:`regmirror.repositories`)
    per_repository: bool = False
    #: a 401 or 403 is the upstream's answer about a client's credentials,
    #: not a fault of the upstream's (``credentials = passthrough``, where
    #: clients choose the credentials): it leaves the breaker closed
    refusals_answer: bool = False
    log = Logger()

    def voucher(self, repository: str) -> str:
        """
        Who must vouch for content served through *repository*
        (:mod:`regmirror.vouches`): the namespace, or with
        ``per_repository`` the namespace's *repository*
        (``docker.io library/app``).
        """
        if self.per_repository:
            return f"{self.namespace} {repository}"
        return self.namespace

    def immutable(self, tag: str) -> bool:
        """Does *tag* match one of the namespace's ``immutable_tags``?"""
        return is_immutable(self.immutable_tags, tag)

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
        heed_breaker: bool = True,
    ) -> IResponse:
        """
        Send one request to one upstream (unless its breaker is open and
        *heed_breaker*).

        :return: a 2xx response, its body unread; the caller says whether
            it was usable (:meth:`answered`, or :meth:`failed` with an
            ``invalid`` failure), for the upstream's health.
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
        if heed_breaker and not upstream.breaker.allow():
            raise UpstreamFailure(upstream.name, "down", "marked down, not asked")
        try:
            response = await upstream.request(method, path, headers, query=query)
        except UpstreamFailure as failure:
            self.failed(upstream, failure)
            raise
        except BaseException:
            upstream.breaker.abandoned()
            raise
        if 200 <= response.code < 300:
            # Healthy only once the caller found the answer usable
            # (:meth:`answered`): a 2xx of garbage counts as failing.
            return response
        if response.code == 404:
            self.answered(upstream)
        await upstream.drain(response)
        refused = UpstreamFailure(
            upstream.name,
            "status",
            f"answered {response.code}",
            status=response.code,
            retry_after=retry_after(response),
        )
        # A 401 to the configured account sent as Basic refuses the account
        # (a wrong password): the upstream's to fix, not the repository's.
        refused.credentials_refused = response.code == 401 and upstream.sends_basic
        if response.code == 429:
            upstream.breaker.abandoned()  # its own back-off covers it
        elif response.code != 404:
            self.failed(upstream, refused)
        raise refused

    def answered(self, upstream: Upstream) -> None:
        """The upstream gave a real answer: it is healthy."""
        if upstream.breaker.succeeded():
            self.log.info("upstream {upstream} is back", upstream=upstream.name)

    def invalid(
        self, upstream: Upstream, detail: str, status: int | None = None
    ) -> UpstreamFailure:
        """
        The upstream's 2xx was unusable (a page, no manifest, not the
        digest asked for): counted against its health like a 5xx.

        :return: the failure, to raise or to summarise.
        """
        failure = UpstreamFailure(upstream.name, "invalid", detail, status=status)
        self.failed(upstream, failure)
        return failure

    def failed(self, upstream: Upstream, failure: UpstreamFailure) -> None:
        """Count a failure against the upstream's health, and log it."""
        if failure.status in (401, 403) and (
            self.refusals_answer or not failure.credentials_refused
        ):
            # It answered, about the request: the client's credentials
            # (passthrough), or a repository the mirror's may not read,
            # private or missing (Docker Hub answers 401 for both).  Counted
            # as failures, a few names that do not exist marked the upstream
            # down for every client.  A token realm refusing the mirror's own
            # account is the upstream's to fix, and counts.
            self.answered(upstream)
            return
        self._skip(failure)
        self.metrics.upstream_errors.labels(upstream.name, failure.reason).inc()
        breaker = upstream.breaker
        if failure.reason == "broken":
            opened = breaker.broke()
        else:
            opened = breaker.failed(failure.reason in ("connect", "timeout"))
        if opened is not None:
            self.log.warn(
                "upstream {upstream} marked down for {seconds}s",
                upstream=upstream.name,
                seconds=int(opened),
            )

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

        The caller says whether the answer was usable (see :meth:`ask`).

        :raises NotFoundAnywhere: when every upstream answered 404.
        :raises RegistryError: describing the failures otherwise.
        """
        failures: list[UpstreamFailure] = []
        for upstream in order:
            try:
                return upstream, await self.ask(upstream, method, path, headers, query)
            except UpstreamFailure as failure:
                failures.append(failure)
        raise summarise(self.namespace, failures, self.refusals_answer)

    def _skip(self, failure: UpstreamFailure) -> None:
        self.log.warn(
            "{namespace}: skipping upstream {upstream}: {detail}",
            namespace=self.namespace,
            upstream=failure.upstream,
            detail=failure.detail,
        )

    async def open_blob(
        self,
        repository: str,
        digest: Digest,
        offset: int = 0,
        order: Sequence[Upstream] | None = None,
        last_resort: bool = False,
        end: int | None = None,
    ) -> tuple[Upstream, IResponse]:
        """
        A GET response for a blob, its body unread, from the first upstream
        of *order* (default: all, in order) with a plausible answer.  From
        *offset* on, when given: the answer is then a 206 starting there, or
        a 200 with the whole blob, whose first *offset* bytes the caller
        skips.  With *last_resort*, the upstreams of *order* skipped because
        their breaker is open are asked after all others failed (a download
        under way: better a request to an upstream marked down than a
        client's broken stream).  With *end*, only the bytes before it are
        asked for (a segment, :mod:`regmirror._segments`): the answer is a
        206 for exactly ``offset`` to ``end``, or a 200 with the whole blob
        from an upstream that ignores ``Range``.
        """
        path = f"{repository}/blobs/{digest}"
        headers = {"Range": f"bytes={offset}-"} if offset else None
        if end is not None:
            headers = {"Range": f"bytes={offset}-{end - 1}"}
        failures: list[UpstreamFailure] = []
        down: list[Upstream] = []
        for upstream in self.upstreams if order is None else order:
            try:
                return upstream, await self._blob_answer(
                    upstream, path, headers, offset, end
                )
            except UpstreamFailure as failure:
                failures.append(failure)
                if failure.reason == "down":
                    down.append(upstream)
        for upstream in down if last_resort else []:
            self.log.info(
                "{namespace}: asking upstream {upstream}, marked down, for the "
                "rest of {digest}: no other can give it",
                namespace=self.namespace,
                upstream=upstream.name,
                digest=str(digest),
            )
            try:
                return upstream, await self._blob_answer(
                    upstream, path, headers, offset, end, heed_breaker=False
                )
            except UpstreamFailure as failure:
                failures.append(failure)
        raise summarise(self.namespace, failures, self.refusals_answer)

    async def _blob_answer(
        self,
        upstream: Upstream,
        path: str,
        headers: dict[str, str] | None,
        offset: int,
        end: int | None = None,
        heed_breaker: bool = True,
    ) -> IResponse:
        """One upstream's answer to a blob GET, if plausible."""
        response = await self.ask(
            upstream, "GET", path, headers, heed_breaker=heed_breaker
        )
        problem = _blob_problem(response, offset, end)
        if problem is None:
            self.answered(upstream)
            return response
        await upstream.drain(response)
        raise self.invalid(upstream, problem)

    async def blob_size(
        self, repository: str, digest: Digest, known: int | None = None
    ) -> int:
        """
        The size of a blob as an upstream says it has it (HEAD): from the
        first upstream whose answer is a registry's answer for *digest*
        (see :func:`_head_problem`; *known*: the size the mirror knows).
        Any other 2xx (a page, no length, another length or digest, a 204
        or 206) is no answer: it counts against that upstream's health
        and, asked of every upstream, as if it said 404, so that it never
        makes a namespace vouch for content.

        :raises NotFoundAnywhere: when no upstream has it.
        """
        expected = known
        if expected is None and digest == Digest.of(b"", digest.algorithm):
            expected = 0
        path = f"{repository}/blobs/{digest}"
        failures: list[UpstreamFailure] = []
        for upstream in self.upstreams:
            try:
                response = await self.ask(upstream, "HEAD", path)
            except UpstreamFailure as failure:
                failures.append(failure)
                continue
            await upstream.drain(response)
            problem = _head_problem(response, digest, expected)
            if problem is None:
                self.answered(upstream)
                return int(header(response, "Content-Length") or "")
            failures.append(self._not_confirmed(upstream, digest, problem))
        raise summarise(self.namespace, failures, self.refusals_answer)

    async def confirm_manifest(self, repository: str, manifest: Manifest) -> None:
        """
        Does an upstream have *manifest* (HEAD)?  Only a registry's answer
        for it counts: 200, a manifest media type, the manifest's length,
        its digest if the answer names one (see :meth:`blob_size`).

        :raises NotFoundAnywhere: when no upstream has it.
        """
        path = f"{repository}/manifests/{manifest.digest}"
        failures: list[UpstreamFailure] = []
        for upstream in self.upstreams:
            try:
                response = await self.ask(
                    upstream, "HEAD", path, {"Accept": MANIFEST_ACCEPT}
                )
            except UpstreamFailure as failure:
                failures.append(failure)
                continue
            await upstream.drain(response)
            problem = _head_problem(
                response, manifest.digest, len(manifest.body), manifest=True
            )
            if problem is None:
                self.answered(upstream)
                return
            failures.append(self._not_confirmed(upstream, manifest.digest, problem))
        raise summarise(self.namespace, failures, self.refusals_answer)

    def _not_confirmed(
        self, upstream: Upstream, digest: Digest, problem: str
    ) -> UpstreamFailure:
        """A HEAD answer that is no registry's answer for *digest*: counted
        as invalid, and as a 404 for the client (it does not vouch)."""
        self.log.info(
            "{namespace}: upstream {upstream} does not vouch for {digest}: {problem}",
            namespace=self.namespace,
            upstream=upstream.name,
            digest=str(digest),
            problem=problem,
        )
        return self.invalid(upstream, f"{problem} for {digest}", status=404)

    async def manifest(self, repository: str, digest: Digest) -> Manifest:
        """A manifest by digest, from the first upstream with a correct copy."""
        failures: list[UpstreamFailure] = []
        for upstream in self.upstreams:
            try:
                return await self.ask_manifest(
                    upstream, repository, str(digest), digest
                )
            except UpstreamFailure as failure:
                failures.append(failure)
        raise summarise(self.namespace, failures, self.refusals_answer)

    async def ask_manifest(
        self,
        upstream: Upstream,
        repository: str,
        reference: str,
        digest: Digest | None,
    ) -> Manifest:
        """
        GET one manifest from one upstream and check it: an answer that is no
        manifest, or not the one asked for, counts against its health.
        """
        path = f"{repository}/manifests/{reference}"
        response = await self.ask(upstream, "GET", path, {"Accept": MANIFEST_ACCEPT})
        try:
            manifest = await _read_manifest(upstream, response, digest)
        except UpstreamFailure as failure:
            self.failed(upstream, failure)
            raise
        self.answered(upstream)
        return manifest

    async def ask_tag(self, upstream: Upstream, repository: str, tag: str) -> TagAnswer:
        """
        What *tag* points at according to one upstream: HEAD first (Docker
        Hub does not count it against its pull limit), GET when the HEAD
        answer carries no usable digest.
        """
        path = f"{repository}/manifests/{tag}"
        response = await self.ask(upstream, "HEAD", path, {"Accept": MANIFEST_ACCEPT})
        await upstream.drain(response)
        if _is_page(response):
            raise self.invalid(upstream, "answered a tag's HEAD with an HTML page")
        # A registry's answer, if perhaps without the digest: healthy (a
        # probe's answer, which lets the GET below through).
        self.answered(upstream)
        announced = _digest_header(response)
        if announced is not None:
            return TagAnswer(announced, upstream.name)
        manifest = await self.ask_manifest(upstream, repository, tag, None)
        return TagAnswer(manifest.digest, upstream.name, manifest)

    async def resolve_tag(self, repository: str, tag: str) -> TagAnswer:
        """
        What *tag* points at: the origin decides.  The mirrors are asked at
        the same time, without waiting for them: a mirror whose answer
        differs from the origin's is recorded as stale for the repository.

        :raises NotFoundAnywhere: when the origin says the tag does not exist.
        :raises OriginUnreachable: carrying the mirrors' answers, when the
            origin gave none (with ``origin_unreachable = freshest``: the
            other policies use no mirror's answer, which is not awaited).
        """
        asked = [
            (mirror, Deferred.fromCoroutine(self.ask_tag(mirror, repository, tag)))
            for mirror in self.mirrors
        ]
        try:
            answer = await self.ask_tag(self.origin, repository, tag)
        except UpstreamFailure as failure:
            if failure.status == 404 or self.origin_unreachable != "freshest":
                for _, pending in asked:
                    pending.addErrback(lambda _: None)
                if failure.status == 404:
                    raise NotFoundAnywhere() from None
                raise OriginUnreachable(
                    summarise(self.namespace, [failure], self.refusals_answer), []
                ) from None
            raise await self._without_origin(repository, failure, asked) from None
        for _, pending in asked:
            pending.addCallbacks(
                self._compare, lambda _: None, (repository, tag, answer)
            )
        return answer

    async def _without_origin(
        self,
        repository: str,
        failure: UpstreamFailure,
        asked: list[tuple[Upstream, Deferred[TagAnswer]]],
    ) -> OriginUnreachable:
        """
        The mirrors' answers, once the origin gave none: those of mirrors
        not known to be stale (by any process sharing the record), and
        whether every mirror said the tag does not exist.
        """
        answers: list[TagAnswer] = []
        failures = [failure]
        not_found = bool(asked)
        for mirror, pending in asked:
            try:
                mirror_answer = await pending
            except UpstreamFailure as theirs:
                if theirs.status != 404:
                    not_found = False
                    failures.append(theirs)
                continue
            except Exception as unexpected:  # no answer, like a failure
                not_found = False
                failures.append(
                    UpstreamFailure(mirror.name, "invalid", str(unexpected))
                )
                continue
            not_found = False
            if (mirror.name, repository) not in self.stale:
                answers.append(mirror_answer)
        return OriginUnreachable(
            summarise(self.namespace, failures, self.refusals_answer),
            answers,
            not_found,
        )

    def _compare(
        self, theirs: TagAnswer, repository: str, tag: str, ours: TagAnswer
    ) -> None:
        """Record whether a mirror agrees with the origin about a tag."""
        key = (theirs.upstream, repository)
        if theirs.digest == ours.digest:
            if self.stale.pop(key, None) is not None:
                self.log.info(
                    "{namespace}: mirror {mirror} caught up on {repository}",
                    namespace=self.namespace,
                    mirror=theirs.upstream,
                    repository=repository,
                )
            return
        self.stale[key] = StaleAnswer(
            tag, theirs.digest, ours.digest, self.origin.clock.seconds()
        )
        self.stale_counts[theirs.upstream] = (
            self.stale_counts.get(theirs.upstream, 0) + 1
        )
        self.metrics.stale.labels(self.namespace, theirs.upstream).inc()
        self.log.warn(
            "{namespace}: stale mirror {mirror}: {repository}:{tag} is {theirs} "
            "there, {ours} at the origin {origin}; its tag answers are not used",
            namespace=self.namespace,
            mirror=theirs.upstream,
            repository=repository,
            tag=tag,
            theirs=str(theirs.digest),
            ours=str(ours.digest),
            origin=ours.upstream,
        )


def _is_page(response: IResponse) -> bool:
    """Is the answer typed as a web page (a portal's, a site's fallback)?"""
    return "html" in (header(response, "Content-Type") or "").lower()


def _head_problem(
    response: IResponse, digest: Digest, size: int | None, manifest: bool = False
) -> str | None:
    """
    What makes a HEAD answer no registry's answer for *digest*, if
    anything: not a 200; a page (or, for a *manifest*, no manifest media
    type); a ``Content-Length`` that is not *size* (without one, not a
    positive length); a ``Docker-Content-Digest`` that names another.
    """
    if response.code != 200:
        return f"answered {response.code}"
    content_type = (header(response, "Content-Type") or "").split(";", 1)[0]
    content_type = content_type.strip().lower()
    if manifest and content_type not in MANIFEST_TYPES:
        return f"answered {content_type[:80] or 'no type'!r}, not a manifest"
    if _is_page(response):
        return "answered with an HTML page"
    text = header(response, "Content-Length") or ""
    length = int(text) if text.isascii() and text.isdigit() else None
    if length is None or (length != size if size is not None else length <= 0):
        wanted = "a size" if size is None else f"size {size}"
        return f"answered length {text[:20] or 'none'!r}, not {wanted}"
    announced = header(response, "Docker-Content-Digest")
    if announced is not None and announced.strip() != str(digest):
        return f"answered digest {announced[:80]!r}"
    return None


def _blob_problem(
    response: IResponse, offset: int, end: int | None = None
) -> str | None:
    """What is wrong with a blob answer, if anything."""
    if _is_page(response):
        return "answered with an HTML page instead of a blob"
    if end is not None and response.code == 206:
        content_range = header(response, "Content-Range") or ""
        wanted = f"bytes {offset}-{end - 1}/"
        if not content_range.startswith(wanted) or response.length != end - offset:
            return f"answered range {content_range!r} for bytes {offset}-{end - 1}"
    elif offset and response.code == 206:
        content_range = header(response, "Content-Range") or ""
        if not content_range.startswith(f"bytes {offset}-"):
            return f"answered range {content_range!r} for bytes {offset}-"
    elif response.code != 200:
        return f"answered {response.code} for a blob"
    return None


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
        body = await upstream.read(response, MAX_MANIFEST_SIZE)
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
    return Manifest(actual, media_type, body, upstream.name)


def summarise(
    namespace: str, failures: Sequence[UpstreamFailure], clients_own: bool = False
) -> Exception:
    """
    The error to give a client after every upstream failed.  With
    *clients_own* (the upstreams were asked with the client's own
    credentials), a 401 or 403 is the upstream's answer about the client:
    :class:`AccessRefused`, which reaches it as its own refusal.
    """
    if all(f.status == 404 for f in failures):
        return NotFoundAnywhere()
    refusals = [f for f in failures if f.status in (401, 403)]
    if clients_own and refusals:
        return AccessRefused(
            401 if any(f.status == 401 for f in refusals) else 403,
            any(f.credentials_refused for f in refusals),
        )
    limited = [f for f in failures if f.status == 429]
    if limited:
        waits = [f.retry_after for f in limited if f.retry_after is not None]
        headers = {"Retry-After": str(int(min(waits)))} if waits else {}
        return TooManyRequests(
            f"{namespace}: upstream pull limit reached, try again later", headers
        )
    refused = sorted({f.upstream for f in failures if f.status == 401})
    if refused:
        return UpstreamRefusedCredentials(
            f"{namespace}: upstream {', '.join(refused)} refused the mirror's "
            "credentials (401): the mirror's configuration must give it some "
            "that it accepts"
        )
    if any(f.status == 403 for f in failures):
        return Denied(f"{namespace}: the upstream registry denied access")
    named = "; ".join(str(f) for f in failures)
    if failures and all(f.reason == "timeout" for f in failures):
        return UpstreamTimeout(f"{namespace}: upstreams timed out ({named})")
    if any(f.reason in ("status", "invalid") for f in failures):
        return UpstreamBadGateway(f"{namespace}: no usable answer upstream ({named})")
    return UpstreamUnavailable(f"{namespace}: no upstream reachable ({named})")
