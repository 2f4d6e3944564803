"""
Manifests by digest: from the cache, else from the cluster's bucket, else
from the namespace's upstreams (one request per namespace and digest at a
time), kept in the cache, and put in the bucket when they came from an
upstream.
"""

from __future__ import annotations

from attrs import define, field
from twisted.logger import Logger

from regmirror._flight import SingleFlight
from regmirror.bucket import Bucket
from regmirror.errors import ManifestUnknown
from regmirror.metrics import Metrics
from regmirror.pool import Manifest, NotFoundAnywhere, UpstreamPool
from regmirror.reference import Digest
from regmirror.store import Store


@define(eq=False)
class Manifests:
    """The cache's manifests, filled on demand."""

    store: Store
    metrics: Metrics
    bucket: Bucket | None = None
    _flight: SingleFlight[tuple[str, Digest], Manifest] = field(factory=SingleFlight)
    log = Logger()

    async def get(
        self, pool: UpstreamPool, repository: str, digest: Digest
    ) -> Manifest:
        """
        A manifest by digest: from the store, else from the bucket or
        upstream (kept).

        :raises ManifestUnknown: when no upstream has it.
        """
        cached = self.store.manifest(digest)
        if cached is not None:
            self._lookup("hit")
            return Manifest(digest, *cached)

        async def fetch() -> Manifest:
            if self.bucket is not None:
                shared = await self.bucket.manifest(digest)
                if shared is not None:
                    self.keep(shared, share=False)
                    return shared
            try:
                manifest = await pool.manifest(repository, digest)
            except NotFoundAnywhere:
                raise ManifestUnknown(
                    f"manifest {digest} is unknown upstream"
                ) from None
            self.keep(manifest)
            return manifest

        key = (pool.namespace, digest)
        self._lookup("joined" if key in self._flight else "miss")
        return await self._flight.run(key, fetch)

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
