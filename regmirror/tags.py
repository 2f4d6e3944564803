"""
What a tag points at.

The namespace's origin decides (:meth:`regmirror.pool.UpstreamPool.resolve_tag`,
which also notes mirrors that answer otherwise as stale); its answer is
reused for the namespace's ``tag_ttl``, recorded on disk, and, with
``[cluster]``, posted in Redis for the other nodes, which take it from
there while it is younger than ``tag_ttl`` instead of asking the origin
themselves (a :class:`Board`).  A tag matching the namespace's
``immutable_tags`` is asked of the origin once: its record on disk answers
from then on.  When the origin cannot be reached, the namespace's
``origin_unreachable`` policy decides among the answer on disk and those of
the mirrors not known to be stale; the failure is remembered for
``origin_retry`` by every process of the machine (:mod:`regmirror.failures`),
and the tag's pulls meanwhile get that policy's answer without asking the
origin.  Past ``tag_ttl``, for the namespace's ``stale_while_revalidate``
more, a tag is answered at once by its record on disk (``"revalidating"``)
while one check at the origin runs behind; an origin that says the tag is
gone takes its record away.
"""

from __future__ import annotations

import math
import os
from typing import Protocol, TypeVar

from attrs import Factory, define, field
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from regmirror._claims import Claims
from regmirror._flight import SingleFlight
from regmirror.blobs import Blobs
from regmirror.cluster import Coordinator, CoordinatorDown
from regmirror.errors import (
    AccessRefused,
    DownloadFailed,
    ManifestUnknown,
    RegistryError,
    UpstreamUnavailable,
)
from regmirror.failures import FailedCheck, FailedChecks
from regmirror.manifests import Manifests
from regmirror.metrics import Metrics
from regmirror.pool import NotFoundAnywhere, OriginUnreachable, TagAnswer, UpstreamPool
from regmirror.reference import (
    INDEX_TYPES,
    Digest,
    load_json,
    parse_digest,
    parse_timestamp,
)
from regmirror.responses import discard
from regmirror.store import Store, TagRecord

T = TypeVar("T")

#: Where a tag answer came from when it came from the cache.
CACHE = "cache"
#: Where a tag answer came from when another node asked the origin.
CLUSTER = "cluster"
#: Where a tag answer came from when the tag is immutable and the origin
#: answered for it before.
IMMUTABLE = "immutable"
#: Where a tag answer came from when it is the origin's last answer, past
#: ``tag_ttl`` but within ``stale_while_revalidate``, while the origin is
#: asked again behind it.
REVALIDATING = "revalidating"
#: How many tag answers are remembered in memory (each also on disk).
MAX_ANSWERS = 10_000

Key = tuple[str, str, str]


class Board(Protocol):
    """Where the nodes of a cluster post the origin's tag answers for
    each other."""

    async def read(
        self, namespace: str, repository: str, tag: str, ttl: float
    ) -> tuple[TagAnswer, float] | None:
        """Another node's answer from the origin and when the origin gave
        it, while younger than *ttl* (the namespace's ``tag_ttl``)."""

    async def post(
        self, namespace: str, repository: str, tag: str, digest: Digest, ttl: float
    ) -> None:
        """The origin's answer, given now, for the other nodes, for *ttl*."""


class NoBoard:
    """A node alone: every answer is its own."""

    async def read(
        self, namespace: str, repository: str, tag: str, ttl: float
    ) -> tuple[TagAnswer, float] | None:
        return None

    async def post(
        self, namespace: str, repository: str, tag: str, digest: Digest, ttl: float
    ) -> None:
        pass


@define(eq=False)
class RedisBoard:
    """The cluster's tag answers, in its Redis; with Redis down, none."""

    coordinator: Coordinator
    clock: IReactorTime

    async def read(
        self, namespace: str, repository: str, tag: str, ttl: float
    ) -> tuple[TagAnswer, float] | None:
        try:
            posted = await self.coordinator.tag(namespace, repository, tag)
        except CoordinatorDown:
            return None
        if posted is None or self.clock.seconds() - posted[1] >= ttl:
            return None
        return TagAnswer(posted[0], CLUSTER), posted[1]

    async def post(
        self, namespace: str, repository: str, tag: str, digest: Digest, ttl: float
    ) -> None:
        try:
            await self.coordinator.set_tag(
                namespace, repository, tag, digest, self.clock.seconds(), ttl
            )
        except CoordinatorDown:
            pass


@define(eq=False)
class Tags:
    """Resolves tags: the origin's answers, reused for ``ttl`` seconds
    (or the namespace's own ``tag_ttl``)."""

    store: Store
    clock: IReactorTime
    manifests: Manifests
    #: to read image configs, when the freshest of several images is chosen
    blobs: Blobs
    metrics: Metrics
    board: Board = field(factory=NoBoard)
    ttl: float = 60.0
    _answers: dict[Key, tuple[TagAnswer, float]] = field(factory=dict)
    #: tags whose check at the origin failed, until when they are not
    #: asked about: the machine's (``<cache>/failures/``)
    _failures: FailedChecks = field(
        default=Factory(
            lambda self: FailedChecks(os.path.join(self.store.root, "failures")),
            takes_self=True,
        )
    )
    _flight: SingleFlight[Key, TagAnswer] = field(factory=SingleFlight)
    #: which process of the machine checks a tag behind its answer
    _checking: Claims = field(
        default=Factory(
            lambda self: Claims(os.path.join(self.store.root, "revalidating")),
            takes_self=True,
        )
    )
    log = Logger()

    async def resolve(self, pool: UpstreamPool, repository: str, tag: str) -> TagAnswer:
        """
        What a tag points at.  The origin decides; its answer is reused for
        ``ttl`` and recorded on disk.  When the origin cannot be reached
        the namespace's policy applies: ``freshest`` takes the newest image
        among the cached answer (if younger than ``max_stale``) and the
        mirrors not known to be stale, ``cache`` only the cached answer,
        ``fail`` nothing.  A tag matching ``immutable_tags`` is answered
        by its record on disk, once there is one.  A failed check at the
        origin is not repeated for the namespace's ``origin_retry``, by
        any process of the machine: the tag's requests meanwhile get the
        policy's answer at once (the mirrors are not asked again; without
        an answer, the error that check ended with).  Past ``ttl``, for
        the namespace's ``stale_while_revalidate`` more (and outside such
        a window), the record on disk answers at once while one check at
        the origin runs behind, whose answer the next requests get.

        :return: the answer; its ``upstream`` says where it came from:
            an upstream's name, ``"cache"``, ``"cluster"``,
            ``"immutable"`` or ``"revalidating"``.
        :raises ManifestUnknown: when the origin says the tag does not exist.
        """
        key = (pool.namespace, repository, tag)
        failed = self._failures.known(key)
        if failed is not None and self._window_over(pool, key, failed):
            self._answers.pop(key, None)  # the answer given without it
            failed = None
        remembered = self._answers.get(key)
        if remembered is not None and self.clock.seconds() < remembered[1]:
            return remembered[0]
        ttl = self.ttl_for(pool)
        window = 0.0 if pool.immutable(tag) else pool.stale_while_revalidate
        record = None
        if ttl > 0 or window > 0 or pool.immutable(tag):
            record = self._read(pool, repository, tag)
        if record is not None:
            recorded = self._recorded(pool, repository, tag, ttl, record)
            if recorded is not None:
                return recorded
        if failed is None:
            # Another process's failed check, read only when the origin
            # would be asked.
            failed = self._failures.get(key)
            if failed is not None and self._window_over(pool, key, failed):
                failed = None
        if failed is not None:
            return await self._while_failing(pool, repository, tag, failed)
        if (
            record is not None
            and self.clock.seconds() - record.confirmed < ttl + window
        ):
            self._revalidate(pool, repository, tag)
            return TagAnswer(record.digest, REVALIDATING)
        return await self._flight.run(
            key, lambda: self._ask(pool, repository, tag, ttl)
        )

    def _window_over(self, pool: UpstreamPool, key: Key, failed: FailedCheck) -> bool:
        """Is *failed*'s ``origin_retry`` over (forgotten then)?  It ends
        early once the origin answered again (a recovery look, another
        request, another process: its failures were cleared)."""
        if (
            self.clock.seconds() < failed.until
            and pool.origin.breaker.health().closed_at <= failed.at
        ):
            return False
        self._failures.forget(key)
        return True

    async def _ask(
        self, pool: UpstreamPool, repository: str, tag: str, ttl: float
    ) -> TagAnswer:
        """The origin's answer (or another node's, with ``[cluster]``),
        recorded and remembered; the policy's when it gives none."""
        key = (pool.namespace, repository, tag)
        posted = None
        if ttl > 0:
            posted = await self.board.read(pool.namespace, repository, tag, ttl)
        if posted is not None:
            answer, confirmed = posted
            # Kept like our own answer, for when the origin is down.
            self._record(pool.namespace, repository, tag, answer.digest, confirmed)
            self._remember(key, answer, confirmed + ttl)
            return answer
        started = self.clock.seconds()
        try:
            answer = await pool.resolve_tag(repository, tag)
        except NotFoundAnywhere:
            raise self._gone(pool, key) from None
        except OriginUnreachable as unreachable:
            if isinstance(unreachable.error, AccessRefused):
                # The origin refused the client's own credentials: its
                # answer about the client, not the origin's failure (no
                # cached tag instead, nothing remembered for the others).
                raise unreachable.error from None
            self._failed(key, pool, unreachable.error)
            answer = await self._without_origin(pool, repository, tag, unreachable)
            # Reused while the origin is not asked again (with
            # origin_retry = 0, for tag_ttl as before).
            retry = pool.origin_retry if pool.origin_retry > 0 else ttl
            self._remember(key, answer, self.clock.seconds() + retry)
            return answer
        await self._confirmed(pool, key, answer, ttl, started)
        return answer

    def _gone(self, pool: UpstreamPool, key: Key) -> ManifestUnknown:
        """The origin says the tag does not exist: its record must answer
        no more (not while revalidating, not while the origin is
        unreachable).  The error to raise."""
        namespace, repository, tag = key
        self._answers.pop(key, None)
        self._failures.forget(key)
        if not pool.immutable(tag) and self.store.writable():
            try:
                self.store.remove_tag(namespace, repository, tag)
            except OSError as error:
                self.store.degrade(error)
        return ManifestUnknown(f"{repository}:{tag} is unknown upstream")

    async def _confirmed(
        self, pool: UpstreamPool, key: Key, answer: TagAnswer, ttl: float, since: float
    ) -> None:
        """Keep the origin's *answer*, asked at *since*: on disk, for the
        other nodes, in memory; a failed check's window over, for every
        process."""
        namespace, repository, tag = key
        self._failures.forget(key)
        self.metrics.tag_checks.labels(namespace).observe(self.clock.seconds() - since)
        if answer.manifest is not None:
            self.manifests.keep(answer.manifest)
        self._record(namespace, repository, tag, answer.digest)
        if ttl > 0:
            await self.board.post(namespace, repository, tag, answer.digest, ttl)
        self._remember(key, answer, self.clock.seconds() + ttl)

    def _revalidate(self, pool: UpstreamPool, repository: str, tag: str) -> None:
        """Ask the origin about a tag behind the answer given (once on the
        machine: the requests meanwhile, in this process or another, start
        no other check; the record the check writes answers them all
        afterwards), logging how it ended."""
        key = (pool.namespace, repository, tag)
        claim = "\n".join(key)
        if key in self._flight or not self._checking.claim(claim):
            return
        ttl = self.ttl_for(pool)
        checked = self._flight.run(key, lambda: self._ask(pool, repository, tag, ttl))
        checked.addBoth(self._unclaim, claim)
        checked.addCallbacks(
            self._revalidated,
            self._not_revalidated,
            callbackArgs=(pool, repository, tag),
            errbackArgs=(pool, repository, tag),
        )

    def _unclaim(self, outcome: T, claim: str) -> T:
        self._checking.release(claim)
        return outcome

    def _revalidated(
        self, answer: TagAnswer, pool: UpstreamPool, repository: str, tag: str
    ) -> None:
        self.log.info(
            "{namespace}: {repository}:{tag} checked behind its answer: {digest} "
            "({source})",
            namespace=pool.namespace,
            repository=repository,
            tag=tag,
            digest=str(answer.digest),
            source=answer.upstream,
        )

    def _not_revalidated(
        self, failure: Failure, pool: UpstreamPool, repository: str, tag: str
    ) -> None:
        if failure.check(ManifestUnknown):
            self.log.info(
                "{namespace}: {repository}:{tag} is gone at the origin: its "
                "answer is not served again",
                namespace=pool.namespace,
                repository=repository,
                tag=tag,
            )
        elif failure.check(RegistryError):
            self.log.warn(
                "{namespace}: revalidating {repository}:{tag} failed: {why}",
                namespace=pool.namespace,
                repository=repository,
                tag=tag,
                why=failure.getErrorMessage(),
            )
        else:
            self.log.failure(
                "{namespace}: revalidating {repository}:{tag} failed",
                failure,
                namespace=pool.namespace,
                repository=repository,
                tag=tag,
            )

    async def refresh(self, pool: UpstreamPool, repository: str, tag: str) -> TagAnswer:
        """
        What a tag points at, asked of the origin now, whatever answer is
        remembered, recorded or posted by another node (``keep_warm``:
        :mod:`regmirror.warm`); the mirrors are asked too, and noted stale
        when they answer otherwise, as at every check.  The answer is kept
        as a pull's check keeps it (on disk, for the other nodes, in
        memory; a failed check's window over, for every process), so that
        the tag's pulls take it.
        No ``origin_unreachable`` policy applies: without the origin's
        answer, the refresh fails.

        :raises ManifestUnknown: when the origin says the tag does not exist.
        :raises Exception: why the origin gave no answer (the error a pull
            would get).
        """
        key = (pool.namespace, repository, tag)
        ttl = self.ttl_for(pool)
        started = self.clock.seconds()
        try:
            answer = await pool.resolve_tag(repository, tag)
        except NotFoundAnywhere:
            raise self._gone(pool, key) from None
        except OriginUnreachable as unreachable:
            raise unreachable.error from None
        await self._confirmed(pool, key, answer, ttl, started)
        return answer

    def ttl_for(self, pool: UpstreamPool) -> float:
        """How long the origin's answers are reused in *pool*'s namespace:
        its own ``tag_ttl``, else the cache's."""
        return self.ttl if pool.tag_ttl is None else pool.tag_ttl

    def _remember(self, key: Key, answer: TagAnswer, until: float) -> None:
        """Reuse *answer* until *until*; the oldest remembered answers go
        first beyond :data:`MAX_ANSWERS` (clients choose the tags)."""
        self._answers.pop(key, None)
        while len(self._answers) >= MAX_ANSWERS:
            del self._answers[next(iter(self._answers))]
        self._answers[key] = (answer, until)

    def _failed(self, key: Key, pool: UpstreamPool, error: Exception) -> None:
        """The origin gave no answer about a tag (*error* says why): not
        asked again about it for ``origin_retry``, by any process of the
        machine."""
        if pool.origin_retry <= 0:
            return
        now = self.clock.seconds()
        self._failures.note(key, FailedCheck(now + pool.origin_retry, error, now))

    async def _while_failing(
        self, pool: UpstreamPool, repository: str, tag: str, failed: FailedCheck
    ) -> TagAnswer:
        """The policy's answer for a tag the origin failed to answer about
        less than ``origin_retry`` ago, without asking it: without an
        answer, the error that check ended with (its status and code: a
        refused login stays 502 ``UNAUTHORIZED``), saying when it is asked
        again."""
        left = max(1, math.ceil(failed.until - self.clock.seconds()))
        # Not before a 429's back-off is over either: a client told to come
        # back sooner would meet another 429.
        left = max(left, math.ceil(pool.origin.backing_off() or 0))
        again = {"Retry-After": str(left)}
        failure = failed.error
        error: Exception
        if isinstance(failure, RegistryError):
            error = type(failure)(
                f"{failure.message}; the origin is asked again in {left}s",
                {**failure.headers, **again},
            )
        else:
            error = UpstreamUnavailable(
                f"{pool.namespace}: the origin {pool.origin.name} failed to "
                f"answer about {repository}:{tag}; it is asked again in {left}s",
                again,
            )
        return await self._without_origin(
            pool, repository, tag, OriginUnreachable(error, []), announce=False
        )

    def _read(self, pool: UpstreamPool, repository: str, tag: str) -> TagRecord | None:
        """The tag's record on disk, if any (and readable)."""
        try:
            return self.store.tag(pool.namespace, repository, tag)
        except OSError:
            return None

    def _recorded(
        self,
        pool: UpstreamPool,
        repository: str,
        tag: str,
        ttl: float,
        record: TagRecord,
    ) -> TagAnswer | None:
        """
        The origin's answer as recorded on disk, while younger than
        *ttl*: the processes of ``workers = N`` share the cache folder,
        so that the origin is asked about a tag once per ``ttl`` on this
        machine, not once per process.  An immutable tag's record answers
        however old (``"immutable"``); it is read again after *ttl*, so
        that a purge is heeded.
        """
        key = (pool.namespace, repository, tag)
        if pool.immutable(tag):
            answer = TagAnswer(record.digest, IMMUTABLE)
            self._remember(key, answer, self.clock.seconds() + ttl)
            return answer
        if ttl <= 0 or self.clock.seconds() - record.confirmed >= ttl:
            return None
        answer = TagAnswer(record.digest, pool.origin.name)
        self._remember(key, answer, record.confirmed + ttl)
        return answer

    def _record(
        self,
        namespace: str,
        repository: str,
        tag: str,
        digest: Digest,
        confirmed: float | None = None,
    ) -> None:
        """Keep the origin's answer on disk (confirmed now, unless said)."""
        if not self.store.writable():
            return
        if confirmed is None:
            confirmed = self.clock.seconds()
        try:
            self.store.set_tag(namespace, repository, tag, digest, confirmed)
        except OSError as error:
            self.store.degrade(error)

    async def _without_origin(
        self,
        pool: UpstreamPool,
        repository: str,
        tag: str,
        unreachable: OriginUnreachable,
        announce: bool = True,
    ) -> TagAnswer:
        """Apply the namespace's policy for a tag the origin did not answer
        (logged as a warning if *announce*, else as information: the
        answer repeated while the origin is not asked)."""
        candidates: list[TagAnswer] = []
        record = self.store.tag(pool.namespace, repository, tag)
        if (
            record is not None
            and self.clock.seconds() - record.confirmed <= pool.max_stale
        ):
            candidates.append(TagAnswer(record.digest, CACHE))
        if pool.origin_unreachable == "freshest":
            candidates += unreachable.answers
        elif pool.origin_unreachable == "fail":
            candidates = []
        if not candidates:
            if unreachable.not_found and pool.origin_unreachable == "freshest":
                raise ManifestUnknown(
                    f"{repository}:{tag} is unknown upstream (the origin is "
                    "unreachable, no other upstream has it)"
                )
            raise unreachable.error
        chosen = candidates[0]
        if len({c.digest for c in candidates}) > 1:
            chosen = await self._freshest(pool, repository, candidates)
        if chosen.manifest is not None:
            self.manifests.keep(chosen.manifest)
        (self.log.warn if announce else self.log.info)(
            "{namespace}: origin unreachable ({why}); {repository}:{tag} answered "
            "by {source} as {digest}",
            namespace=pool.namespace,
            why=str(unreachable),
            repository=repository,
            tag=tag,
            source=chosen.upstream,
            digest=str(chosen.digest),
        )
        return chosen

    async def _freshest(
        self, pool: UpstreamPool, repository: str, candidates: list[TagAnswer]
    ) -> TagAnswer:
        """The candidate whose image was created last (the first on a tie)."""
        dated = []
        for position, candidate in enumerate(candidates):
            try:
                created = await self._created(pool, repository, candidate)
            except Exception as e:  # an unreadable candidate just loses
                self.log.info(
                    "cannot date {digest}: {why}", digest=str(candidate.digest), why=e
                )
                continue
            dated.append((created, -position, candidate))
        if not dated:
            return candidates[0]
        return max(dated, key=lambda entry: (entry[0], entry[1]))[2]

    async def _created(
        self, pool: UpstreamPool, repository: str, candidate: TagAnswer
    ) -> float:
        """When an image was built, from its config (an index: its first image)."""
        manifest = candidate.manifest or await self.manifests.get(
            pool, repository, candidate.digest, named=True
        )
        if manifest.media_type in INDEX_TYPES:
            entries = load_json(manifest.body)["manifests"]
            child = parse_digest(entries[0]["digest"])
            manifest = await self.manifests.get(pool, repository, child)
        config = parse_digest(load_json(manifest.body)["config"]["digest"])
        source = await self.blobs.blob(pool, repository, config)
        if source.relay is not None:
            # The cache would not take it: nothing to read it from here.
            discard(source.relay)
            raise DownloadFailed(f"config {config} is not cached")
        if source.download is not None:
            while source.download.state == "running":
                await source.download.changed()
            if source.download.state != "done":
                raise DownloadFailed(f"config {config} did not arrive")
        return parse_timestamp(self.store.blob_document(config)["created"])
