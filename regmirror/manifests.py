"""
Manifests by digest: from the cache, else from the cluster's bucket, else
from the namespace's upstreams (one request per namespace and digest at a
time), kept in the cache, and put in the bucket when they came from an
upstream.  Through a namespace that vouches for them only
(:mod:`regmirror.vouches`).
"""

from __future__ import annotations

from attrs import define, evolve, field, frozen
from twisted.logger import Logger

from regmirror._flight import SingleFlight
from regmirror.bucket import SOURCE as BUCKET_SOURCE
from regmirror.bucket import Bucket
from regmirror.errors import ManifestUnknown
from regmirror.metrics import Metrics
from regmirror.pool import Manifest, NotFoundAnywhere, UpstreamPool
from regmirror.reference import Digest
from regmirror.store import Store
from regmirror.vouches import Vouches


@frozen
class Found:
    """
    A manifest and how the cache found it, for the access log.

    :ivar cache: ``hit``, ``miss`` (this request fetched it) or ``joined``
        (it waited for another request's fetch).
    :ivar source: where a miss or a join read it: an upstream's name, or
        the bucket's ``shared store``.
    """

    manifest: Manifest
    cache: str
    source: str | None = None


@define(eq=False)
class Manifests:
    """The cache's manifests, filled on demand."""

    store: Store
    metrics: Metrics
    #: which namespaces vouch for which manifests
    vouches: Vouches
    bucket: Bucket | None = None
    _flight: SingleFlight[tuple[str, Digest], Manifest] = field(factory=SingleFlight)
    log = Logger()

    async def get(
        self,
        pool: UpstreamPool,
        repository: str,
        digest: Digest,
        *,
        named: bool = False,
    ) -> Manifest:
        """See :meth:`find`: the manifest alone."""
        found = await self.find(pool, repository, digest, named=named)
        return found.manifest

    async def find(
        self,
        pool: UpstreamPool,
        repository: str,
        digest: Digest,
        *,
        named: bool = False,
    ) -> Found:
        """
        A manifest by digest, and where it came from: from the store, else
        from the bucket or upstream (kept).  A manifest another namespace
        fetched is served through *pool*'s namespace only once it vouches
        for it: a tag of the namespace named it (*named*), a manifest it
        vouches for references it, or one of its upstreams confirms it
        (``HEAD``).
        Serving a manifest through a namespace records that the namespace
        vouches for what the manifest references.

        :raises ManifestUnknown: when no upstream of the namespace has it.
        """
        # The namespace, or its repository (UpstreamPool.voucher).
        namespace = pool.voucher(repository)
        vouched = named or self.vouches.has(namespace, digest)
        cached = self.store.manifest(digest)
        if cached is not None:
            manifest = Manifest(digest, *cached)
            if not vouched:
                await self._flight.run(
                    (namespace, digest),
                    lambda: self._confirm(pool, repository, manifest),
                )
            self._lookup("hit")
            self.vouches.add_manifest(namespace, digest, manifest.body)
            return Found(manifest, "hit")

        async def fetch() -> Manifest:
            if self.bucket is not None:
                shared = await self.bucket.manifest(digest)
                if shared is not None:
                    # The bucket holds every namespace's manifests: one this
                    # namespace does not vouch for, its upstreams confirm.
                    if not vouched:
                        await self._confirm(pool, repository, shared)
                    self.keep(shared, share=False)
                    return evolve(shared, source=BUCKET_SOURCE)
            try:
                manifest = await pool.manifest(repository, digest)
            except NotFoundAnywhere:
                raise ManifestUnknown(
                    f"manifest {digest} is unknown upstream"
                ) from None
            self.keep(manifest)
            return manifest

        key = (namespace, digest)
        result = "joined" if key in self._flight else "miss"
        manifest = await self._flight.run(key, fetch)
        # Counted once it came: a manifest no upstream has is no miss.
        self._lookup(result)
        self.vouches.add_manifest(namespace, digest, manifest.body)
        return Found(manifest, result, manifest.source or None)

    async def _confirm(
        self, pool: UpstreamPool, repository: str, manifest: Manifest
    ) -> Manifest:
        """
        Ask the namespace's upstreams whether they have a manifest cached
        through another namespace (``HEAD``; only a registry's answer for
        it counts, see :meth:`UpstreamPool.confirm_manifest`).

        :raises ManifestUnknown: when none has it.
        """
        try:
            await pool.confirm_manifest(repository, manifest)
        except NotFoundAnywhere:
            raise ManifestUnknown(
                f"manifest {manifest.digest} is unknown to every upstream of "
                f"{pool.namespace}"
            ) from None
        return manifest

    def keep(self, manifest: Manifest, share: bool = True) -> None:
        """Keep a manifest, unless the cache cannot be written, and put it
        in the bucket (unless it came from there)."""
        if share and self.bucket is not None:
            self.bucket.put_manifest(manifest)
        if not self.store.writable():
            return
        try:
            self.store.put_manifest(manifest.digest, manifest.media_type, manifest.body)
        except OSError as error:
            self.store.degrade(error)

    def _lookup(self, result: str) -> None:
        self.metrics.cache.labels("manifest", result).inc()
