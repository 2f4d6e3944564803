"""
Keeping images warm: ``[namespace:NAME] keep_warm``.

Every ``keep_warm_interval`` (the first time a moment after start, not a
whole interval later) each image of a namespace's list is refreshed, one
image at a time:

1. its tag is asked of the origin (:meth:`regmirror.tags.Tags.refresh`),
   whatever the tag's answer remembered or recorded: the answer is kept as
   a pull's check keeps it (the record on disk, the cluster's board), so
   the tag's pulls take it; the mirrors are asked too and noted stale when
   they answer otherwise, so a stale mirror is noticed before anyone
   pulls.  A tag matching ``immutable_tags`` is resolved as a pull would
   (its record, once there is one);
2. its manifest, and for an index the wanted platform's image manifest (or
   every platform's, without one), are fetched through the namespace
   (:mod:`regmirror.manifests`);
3. their configs and layers that are not cached are downloaded, one after
   another, as ordinary downloads of :mod:`regmirror.blobs`: a client
   pulling meanwhile joins them (one upstream ``GET`` either way).  Those
   cached already count as used, for eviction.

A refresh waits while the origin is rate limited (its 429's back-off) or
marked down (its open breaker, :mod:`regmirror.breaker`, whichever process
learnt it), and goes on once it may ask again; a refresh whose requests
meet a 429 waits the same way and starts that image again.  An image whose
blobs, with those of the other images kept warm, would not fit in the
cache's ``max_size`` is not fetched (``too big``): warm images evicting
each other would be fetched again at every interval.  Within that, a warm
image is fetched as a pull is, least recently used content making room.

It runs in the ``twistd`` process only (``workers`` serve beside it), like
housekeeping: one refresh per interval for the machine.  With
``[cluster]``, every node keeps its own cache warm.  Each image's state
(``pending``, ``refreshing``, ``ok``, ``failed``, ``waiting``,
``too big``) is written to ``<cache>/warm.json`` as it changes, which the
status document of every process reads (:func:`read_record`); each refresh
is counted in ``regmirror_keep_warm_refreshes_total`` by namespace and
outcome (:data:`OUTCOMES`).  SIGHUP reads the configuration file again and
takes its lists and intervals (:meth:`KeepWarm.change`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from attrs import define, evolve, field
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from regmirror._cli import human_size
from regmirror.ahead import contents
from regmirror.config import NamespaceConfig, WarmImage
from regmirror.download import UNTIL_END
from regmirror.errors import DownloadFailed, RegistryError, TooManyRequests
from regmirror.fetch import Fetcher
from regmirror.pool import Manifest, UpstreamPool
from regmirror.reference import INDEX_TYPES, Digest, load_json, parse_digest
from regmirror.repositories import refusal
from regmirror.responses import discard
from regmirror.upstream import Upstream

#: A namespace's first refresh starts this long after the service does
#: (and after a reload that changed its list).
FIRST_DELAY = 1.0
#: The states' record, in the cache folder.
RECORD = "warm.json"
#: The values of ``regmirror_keep_warm_refreshes_total``'s ``outcome``.
OUTCOMES = ("fetched", "unchanged", "failed", "too_big")
#: An index inside an index is followed this deep, no deeper.
MAX_NESTING = 2


PENDING = "pending"
REFRESHING = "refreshing"
OK = "ok"
FAILED = "failed"
WAITING = "waiting"
TOO_BIG = "too big"


class _CannotFetch(Exception):
    """A refresh cannot go on; the message says why."""


@define(eq=False)
class _Warm:
    """One image kept warm: how its last refresh went."""

    namespace: str
    image: WarmImage
    state: str = PENDING
    #: why it failed, is too big or waits; what changed when it is ok
    detail: str = ""
    #: when it was last refreshed (ok), and when last tried
    refreshed: float | None = None
    checked: float | None = None
    #: what the tag pointed at when last refreshed
    digest: str | None = None
    #: the bytes of its configs and layers
    size: int | None = None
    #: its configs and layers, with their sizes, at its last refresh
    blobs: dict[Digest, int] = field(factory=dict)

    def document(self) -> dict[str, Any]:
        """The state as the status document shows it."""
        return {
            "namespace": self.namespace,
            "image": str(self.image),
            "repository": self.image.repository,
            "tag": self.image.tag,
            "platform": self.image.platform,
            "state": self.state,
            "detail": self.detail,
            "refreshed": self.refreshed,
            "checked": self.checked,
            "digest": self.digest,
            "size": self.size,
        }


@define(eq=False)
class _Lane:
    """One namespace's list: its refreshes, one round per interval."""

    pool: UpstreamPool
    #: the namespace as the mirror serves it (its allow and deny): a list
    #: read again is checked against it
    rules: NamespaceConfig | None
    images: tuple[WarmImage, ...]
    interval: float
    #: the next round, when one is due
    timer: IDelayedCall | None = None
    #: the round under way
    round: Deferred[None] | None = None
    #: fired when the round under way ends (a stop waits for them)
    ended: list[Deferred[None]] = field(factory=list)


class KeepWarm(Service):
    """
    Refreshes the images of every namespace's ``keep_warm`` list every
    ``keep_warm_interval``, through *fetcher*, as long as the service runs.
    """

    log = Logger()

    def __init__(
        self,
        fetcher: Fetcher,
        pools: Sequence[UpstreamPool],
        namespaces: Sequence[NamespaceConfig],
        clock: IReactorTime,
    ) -> None:
        self.fetcher = fetcher
        self.clock = clock
        self.record = os.path.join(fetcher.store.root, RECORD)
        lists = {n.name: n for n in namespaces}
        self._lanes: dict[str, _Lane] = {}
        self._states: dict[tuple[str, WarmImage], _Warm] = {}
        for pool in pools:
            namespace = lists.get(pool.namespace)
            images = () if namespace is None else _listed(namespace)
            interval = 600.0 if namespace is None else namespace.keep_warm_interval
            self._lanes[pool.namespace] = _Lane(pool, namespace, images, interval)
            self._track(pool.namespace, images)

    # -- the service ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._carry_over()
        self._save()
        for lane in self._lanes.values():
            if lane.images:
                self._schedule(lane, FIRST_DELAY)

    def stopService(self) -> Deferred[None]:
        """Cancel the rounds under way (downloads that clients joined go
        on) and the timers; fires once every round has ended."""
        super().stopService()
        waiting: list[Deferred[None]] = []
        for lane in self._lanes.values():
            self._cancel_timer(lane)
            if lane.round is not None:
                ended: Deferred[None] = Deferred()
                lane.ended.append(ended)
                waiting.append(ended)
                lane.round.cancel()
        if not waiting:
            return succeed(None)
        d: Deferred[None] = Deferred()
        remaining = [len(waiting)]

        def one_ended(_: object) -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                d.callback(None)

        for ended in waiting:
            ended.addBoth(one_ended)
        return d

    def change(self, namespaces: Sequence[NamespaceConfig]) -> None:
        """
        Take the lists and intervals of *namespaces*, the configuration
        file read again (SIGHUP): a namespace whose list or interval
        changed starts a round soon, with the new list (a round under way
        stops; the downloads clients joined go on).  A namespace not served
        since start is left for a restart, and so is an image that the
        ``allow`` and ``deny`` in force refuse (changed rules need a
        restart: a list may not fetch what the mirror refuses).
        """
        lists = {n.name: n for n in namespaces}
        for name in lists.keys() - self._lanes.keys():
            if lists[name].keep_warm:
                self.log.warn(
                    "namespace {namespace} is new: its keep_warm list waits for "
                    "a restart",
                    namespace=name,
                )
        for name, lane in self._lanes.items():
            namespace = lists.get(name)
            images = () if namespace is None else _listed(namespace)
            if lane.rules is not None:
                images = self._allowed(lane.rules, images)
            interval = (
                lane.interval if namespace is None else namespace.keep_warm_interval
            )
            if (images, interval) == (lane.images, lane.interval):
                continue
            lane.images, lane.interval = images, interval
            self._track(name, images)
            self.log.info(
                "{namespace}: keeping {count} images warm every {interval}s",
                namespace=name,
                count=len(images),
                interval=interval,
            )
            if not self.running:
                continue
            if lane.round is not None:
                lane.round.cancel()
            self._cancel_timer(lane)
            if images:
                self._schedule(lane, FIRST_DELAY)
        self._save()

    def _allowed(
        self, rules: NamespaceConfig, images: tuple[WarmImage, ...]
    ) -> tuple[WarmImage, ...]:
        kept = []
        for image in images:
            why = refusal(rules, image.repository)
            if why is None:
                kept.append(image)
            else:
                self.log.error(
                    "{namespace}: {image} is not kept warm: {why} (the rules in "
                    "force; changed allow and deny need a restart)",
                    namespace=rules.name,
                    image=str(image),
                    why=why,
                )
        return tuple(kept)

    # -- what the status document shows -------------------------------------

    def states(self) -> list[dict[str, Any]]:
        """Every image's state, namespaces and images in their order."""
        return [state.document() for state in self._states.values()]

    # -- rounds ---------------------------------------------------------------

    def _track(self, namespace: str, images: Sequence[WarmImage]) -> None:
        """Keep states for *images* of *namespace*, those no longer listed
        forgotten, the order that of the lists."""
        kept: dict[tuple[str, WarmImage], _Warm] = {}
        for name, lane in self._lanes.items():
            listed = images if name == namespace else lane.images
            for image in listed:
                key = (name, image)
                kept[key] = self._states.get(key) or _Warm(name, image)
        self._states = kept

    def _schedule(self, lane: _Lane, delay: float) -> None:
        lane.timer = self.clock.callLater(delay, self._begin, lane)

    def _cancel_timer(self, lane: _Lane) -> None:
        if lane.timer is not None and lane.timer.active():
            lane.timer.cancel()
        lane.timer = None

    def _begin(self, lane: _Lane) -> None:
        lane.timer = None
        if lane.round is not None:
            return  # ending: the next is scheduled when it has
        started = self.clock.seconds()
        d = Deferred.fromCoroutine(self._round(lane))
        lane.round = d
        d.addErrback(self._round_failed, lane)
        d.addBoth(self._round_ended, lane, started)

    def _round_failed(self, failure: Failure, lane: _Lane) -> None:
        if not failure.check(CancelledError):
            self.log.failure(
                "{namespace}: keeping images warm failed",
                failure,
                namespace=lane.pool.namespace,
            )

    def _round_ended(self, _: object, lane: _Lane, started: float) -> None:
        lane.round = None
        ended, lane.ended = lane.ended, []
        for d in ended:
            d.callback(None)
        if self.running and lane.images and lane.timer is None:
            due = started + lane.interval - self.clock.seconds()
            self._schedule(lane, max(0.0, due))

    async def _round(self, lane: _Lane) -> None:
        for image in lane.images:
            state = self._states.get((lane.pool.namespace, image))
            if state is not None:
                await self._refresh(lane.pool, state)

    # -- one image --------------------------------------------------------------

    async def _refresh(self, pool: UpstreamPool, state: _Warm) -> None:
        """Refresh one image, waiting while the origin may not be asked;
        its state saved and its outcome counted."""
        while True:
            await self._until_origin_free(pool, state)
            self._set(state, REFRESHING, "", checked=self.clock.seconds())
            try:
                outcome, detail = await self._warm(pool, state)
            except CancelledError:
                raise
            except Exception as error:
                if _rate_limited(error) and pool.origin.backing_off() is not None:
                    continue  # after the back-off, this image again
                why = _why(error)
                self._count(pool, "failed")
                self._set(state, FAILED, why)
                self.log.warn(
                    "{namespace}: keeping {image} warm failed: {why}",
                    namespace=pool.namespace,
                    image=str(state.image),
                    why=why,
                )
                return
            break
        self._count(pool, outcome)
        if outcome == "too_big":
            self._set(state, TOO_BIG, detail)
            self.log.warn(
                "{namespace}: {image} is not kept warm: {why}",
                namespace=pool.namespace,
                image=str(state.image),
                why=detail,
            )
            return
        state.refreshed = self.clock.seconds()
        self._set(state, OK, detail)
        self.log.info(
            "{namespace}: {image} is {digest}, kept warm ({detail})",
            namespace=pool.namespace,
            image=str(state.image),
            digest=state.digest,
            detail=detail,
        )

    async def _until_origin_free(self, pool: UpstreamPool, state: _Warm) -> None:
        """Wait while the origin is rate limited or marked down."""
        while True:
            busy = self._origin_busy(pool.origin)
            if busy is None:
                return
            why, left = busy
            self._set(state, WAITING, why)
            await deferLater(self.clock, left, lambda: None)

    def _origin_busy(self, origin: Upstream) -> tuple[str, float] | None:
        """Why the origin may not be asked now, and for how long."""
        left = origin.backing_off()
        if left is not None:
            return (
                f"rate limited: the origin {origin.name} answered 429, "
                f"asked again in {max(1, round(left))}s",
                left,
            )
        health = origin.breaker.health()
        now = self.clock.seconds()
        until = max(health.open_until, health.probe_until)
        if health.opened > 0 and now < until:
            return (
                f"the origin {origin.name} is marked down, "
                f"asked again in {max(1, round(until - now))}s",
                until - now,
            )
        return None

    async def _warm(self, pool: UpstreamPool, state: _Warm) -> tuple[str, str]:
        """Resolve, fetch the manifests and the blobs of one image: the
        outcome and what to say about it."""
        image = state.image
        tags = self.fetcher.tags
        if pool.immutable(image.tag):
            answer = await tags.resolve(pool, image.repository, image.tag)
        else:
            answer = await tags.refresh(pool, image.repository, image.tag)
        moved = state.digest is not None and state.digest != str(answer.digest)
        state.digest = str(answer.digest)
        top, fetched = answer.manifest, 1
        if top is None:
            found = await self.fetcher.manifests.find(
                pool, image.repository, answer.digest, named=True
            )
            top, fetched = found.manifest, int(found.cache != "hit")
        manifests, more = await self._images(pool, image, top, MAX_NESTING)
        fetched += more
        if image.platform is not None and top.media_type not in INDEX_TYPES:
            await self._check_platform(pool, image, top)
        blobs: dict[Digest, int] = {}
        for manifest in manifests:
            blobs.update(contents(manifest.body))
        size = sum(blobs.values())
        state.size = size
        too_big = self._too_big(state, blobs)
        if too_big is not None:
            return "too_big", too_big
        store = self.fetcher.store
        came = 0
        for digest in blobs:
            if store.blob_size(digest) is not None:
                continue  # cached (and now counted as used)
            await self._until_origin_free(pool, state)
            self._set(state, REFRESHING, f"fetching {digest}")
            came += await self._blob(pool, image.repository, digest)
        state.blobs = blobs
        what = f"{len(blobs)} blobs, {human_size(size)}"
        if moved:
            what = f"the tag moved; {what}"
        if came:
            return "fetched", f"{what}, {came} fetched"
        return ("fetched" if fetched else "unchanged"), what

    async def _images(
        self, pool: UpstreamPool, image: WarmImage, manifest: Manifest, depth: int
    ) -> tuple[list[Manifest], int]:
        """The image manifests *manifest* stands for: itself, or an index's
        for the wanted platform (every platform without one); and how many
        manifests came from upstream for them."""
        if manifest.media_type not in INDEX_TYPES:
            return [manifest], 0
        if depth <= 0:
            raise _CannotFetch(f"{manifest.digest}: indexes nested too deep")
        found: list[Manifest] = []
        fetched = 0
        for entry in _entries(manifest.body):
            if not _platform_matches(entry.get("platform"), image.platform):
                continue
            child = parse_digest(str(entry.get("digest")))
            got = await self.fetcher.manifests.find(pool, image.repository, child)
            fetched += got.cache != "hit"
            more, deeper = await self._images(pool, image, got.manifest, depth - 1)
            found += more
            fetched += deeper
        if not found:
            raise _CannotFetch(f"the index {manifest.digest} has no {image.platform}")
        return found, fetched

    async def _check_platform(
        self, pool: UpstreamPool, image: WarmImage, manifest: Manifest
    ) -> None:
        """A tag naming one image, not an index: its config (fetched first,
        as a client would) must say the platform asked for."""
        listed = contents(manifest.body)
        if not listed:
            raise _CannotFetch(f"{manifest.digest} names no config")
        config = listed[0][0]
        if not await self._blob(pool, image.repository, config):
            return  # in the cluster's bucket, not here to read
        try:
            described = self.fetcher.store.blob_document(config)
        except (OSError, ValueError) as error:
            raise _CannotFetch(f"cannot read the config {config}: {error}") from None
        if not _platform_matches(described, image.platform):
            found = (
                f"{described.get('os')}/{described.get('architecture')}"
                if isinstance(described, dict)
                else "of no platform"
            )
            raise _CannotFetch(
                f"{manifest.digest} is one image for {found}, not {image.platform}"
            )

    def _too_big(self, state: _Warm, blobs: dict[Digest, int]) -> str | None:
        """Why *blobs* may not come, if the images kept warm would then
        not fit in the cache's ``max_size``."""
        limit = self.fetcher.store.max_size
        if limit is None:
            return None
        others: dict[Digest, int] = {}
        for other in self._states.values():
            if other is not state and other.state == OK:
                others.update(other.blobs)
        warm = sum({**others, **blobs}.values())
        if warm <= limit:
            return None
        return (
            f"its {human_size(sum(blobs.values()))} with the other warm images' "
            f"{human_size(sum(others.values()))} would pass the cache's max_size "
            f"({human_size(limit)})"
        )

    async def _blob(self, pool: UpstreamPool, repository: str, digest: Digest) -> int:
        """Download one blob that is not cached through the namespace, or
        join its download under way; 1 once it is here, 0 if it goes to
        the cluster's bucket instead."""
        blobs = self.fetcher.blobs
        sources = blobs.sources
        if sources.redirects and await sources.redirect(digest):
            return 0  # clients are sent to the cluster's bucket, which has it
        source = await blobs.blob(pool, repository, digest)
        if source.relay is not None:
            discard(source.relay)
            raise _CannotFetch("the cache cannot be written now")
        download = source.download
        if download is not None:
            while download.state == "running":
                await download.changed(UNTIL_END)
            if download.state != "done":
                raise DownloadFailed(f"{digest} did not arrive")
        return 1

    # -- states -----------------------------------------------------------------

    def _set(
        self, state: _Warm, what: str, detail: str, *, checked: float | None = None
    ) -> None:
        if checked is not None:
            state.checked = checked
        if (state.state, state.detail) == (what, detail) and checked is None:
            return
        state.state, state.detail = what, detail
        self._save()

    def _count(self, pool: UpstreamPool, outcome: str) -> None:
        self.fetcher.metrics.keep_warm.labels(pool.namespace, outcome).inc()

    def _carry_over(self) -> None:
        """What the last run learnt of the images still listed: when they
        were refreshed, their digest and size (pending again until their
        first refresh)."""
        for entry in read_record(self.record):
            try:
                key = (str(entry["namespace"]), _image(entry))
            except (KeyError, TypeError, ValueError):
                continue
            state = self._states.get(key)
            if state is not None and state.refreshed is None:
                state.refreshed = entry.get("refreshed")
                state.digest = entry.get("digest")
                state.size = entry.get("size")

    def _save(self) -> None:
        """Write every state to the record, for every process's status
        document; a cache folder that cannot take it is logged, once per
        failure."""
        document = json.dumps({"images": self.states()}).encode("utf-8")
        folder = os.path.dirname(self.record)
        try:
            fd, temporary = tempfile.mkstemp(dir=folder, prefix=".warm-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(document)
                os.replace(temporary, self.record)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as error:
            self.log.error(
                "cannot write {path}: {why}",
                path=self.record,
                why=error.strerror or str(error),
            )


def _listed(namespace: NamespaceConfig) -> tuple[WarmImage, ...]:
    """The namespace's ``keep_warm`` images by the names upstream knows
    them: a one-word name in Docker Hub's namespace with ``library/``."""
    return tuple(
        evolve(image, repository=f"library/{image.repository}")
        if namespace.library and "/" not in image.repository
        else image
        for image in namespace.keep_warm
    )


def read_record(path: str) -> list[dict[str, Any]]:
    """The images' states as the ``twistd`` process last wrote them to
    *path*; none when there is no record (or no readable one)."""
    try:
        with open(path, "rb") as f:
            document = json.loads(f.read())
        images = document["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [entry for entry in images if isinstance(entry, dict)]


def _image(entry: dict[str, Any]) -> WarmImage:
    platform = entry.get("platform")
    return WarmImage(str(entry["repository"]), str(entry["tag"]), platform or None)


def _entries(body: bytes) -> list[dict[str, Any]]:
    """An index's ``manifests`` entries that are objects."""
    document = load_json(body)
    listed = document.get("manifests") if isinstance(document, dict) else None
    return (
        [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
    )


def _platform_matches(described: object, wanted: str | None) -> bool:
    """Is an index entry's ``platform`` the wanted one (any without one)?
    ``linux/arm64`` matches ``linux/arm64/v8``."""
    if wanted is None:
        return True
    if not isinstance(described, dict):
        return False
    label = f"{described.get('os')}/{described.get('architecture')}"
    if described.get("variant"):
        label += f"/{described['variant']}"
    return label == wanted or label.startswith(wanted + "/")


def _rate_limited(error: Exception) -> bool:
    """Did *error* come of a 429 (the origin's, or every upstream's)?"""
    return isinstance(error, TooManyRequests)


def _why(error: Exception) -> str:
    if isinstance(error, RegistryError):
        return error.message
    return str(error) or type(error).__name__
