"""
Keeping the cache within its limits: this node's cache folder
(``max_size``, ``min_free``) and the cluster's bucket (``s3_max_size``),
each by evicting its least recently used blobs.

Run after each blob this process caches, and periodically by the
service (:meth:`regmirror.mirror.Mirror.housekeep`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from regmirror.bucket import Bucket
from regmirror.metrics import Metrics
from regmirror.store import Entry, Store

RunInThread = Callable[[Callable[[], Any]], "Deferred[Any]"]


@define(eq=False)
class Housekeeping:
    """Evicts from the cache folder, and from the bucket if there is one."""

    store: Store
    #: runs the walk of the cache folder off the reactor thread
    run_in_thread: RunInThread
    metrics: Metrics
    bucket: Bucket | None = None
    _evicting: bool = False
    log = Logger()

    def run(self) -> None:
        """Evict least recently used content if the cache is over its limits."""
        bucket = self.bucket
        if bucket is not None and bucket.max_size is not None:
            Deferred.fromCoroutine(bucket.evict()).addErrback(
                lambda failure: self.log.failure("shared eviction failed", failure)
            )
        if self._evicting or not self.store.over_limit():
            return
        self._evicting = True

        def done(result: object) -> None:
            self._evicting = False
            if isinstance(result, Failure):
                self.log.failure("eviction failed", result)
                return
            evicted: list[Entry] = result  # type: ignore[assignment]
            self.metrics.evictions.inc(len(evicted))
            self.metrics.evicted_bytes.inc(sum(e.size for e in evicted))

        d = self.run_in_thread(self.store.by_last_use)
        d.addCallback(self.store.evict).addBoth(done)
