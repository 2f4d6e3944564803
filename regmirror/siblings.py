"""
The other worker processes of this machine, downloading into the cache
folder this process shares with them (``[server] workers``).

The spool lock gives one download per digest machine-wide: a process that
finds a digest's spool locked (:class:`regmirror.store.SpoolBusy`) does not
download it, but follows the other process's spool file as it grows, and
the cache file once it is verified there.  A followed download is a
:class:`~regmirror.download.Download` like any other for the readers.
"""

from __future__ import annotations

import os

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from regmirror._spool import SIZE_SUFFIX
from regmirror.download import Download, Followed
from regmirror.reference import Digest
from regmirror.store import Store

#: How often another process's download is looked at, and for how many looks
#: its size is awaited before serving without it.
FOLLOW_INTERVAL = 0.05
FOLLOW_SIZE_POLLS = 100

#: Where a followed download's bytes come from, for people.
SOURCE = "another worker"


@define(eq=False)
class Siblings:
    """Follows the downloads of the other processes sharing the cache."""

    store: Store
    clock: IReactorTime
    #: this process's downloads under way, which a followed one joins once
    #: its size is known, and leaves at its end
    running: dict[Digest, Download]
    #: look-outs on other processes' downloads
    _watchers: dict[Digest, LoopingCall] = field(factory=dict)
    log = Logger()

    async def follow(self, digest: Digest, path: str) -> Download:
        """
        Another process sharing the cache is downloading *digest* into the
        spool at *path*: serve from it as it grows, and from the cache once
        it is verified.
        """
        download = Download(
            digest,
            Followed(path, self.store.blob_path(digest)),
            None,
            "",
            source=SOURCE,
            follower=True,
            clock=self.clock,
        )
        self.log.info(
            "following another worker's download of {digest}", digest=str(digest)
        )
        poller = LoopingCall(self._watch, download)
        poller.clock = self.clock
        self._watchers[digest] = poller
        poller.start(FOLLOW_INTERVAL).addErrback(
            lambda failure: self.log.failure(
                "cannot follow {digest}", failure, digest=str(digest)
            )
        )
        # The size, which the downloader announces once it has headers.
        for _ in range(FOLLOW_SIZE_POLLS):
            if download.size is not None or download.state != "running":
                break
            await deferLater(self.clock, FOLLOW_INTERVAL, lambda: None)
        if download.state == "running":
            # Joined from now on; until now other requests waited for the
            # start of this download, so that none was answered without
            # the size.
            self.running[digest] = download
        return download

    def _watch(self, download: Download) -> None:
        """One look at another process's download."""
        spool = download.spool
        if download.size is None:
            try:
                with open(spool.path + SIZE_SUFFIX, encoding="ascii") as f:
                    download.size = int(f.read())
            except (OSError, ValueError):
                pass
        try:
            written = os.stat(spool.path).st_size
        except FileNotFoundError:
            written = None
        finished = os.path.exists(spool.final_path)
        if (
            not finished
            and written is not None
            and not self.store.spool_abandoned(spool.path)
        ):
            if written != spool.written:
                spool.written = written
                download.notify()
            return
        finished = finished or os.path.exists(spool.final_path)
        if finished:
            spool.written = os.stat(spool.final_path).st_size
            download.state = "done"
        else:
            self.log.warn(
                "the other worker's download of {digest} ended unfinished",
                digest=str(download.digest),
            )
            download.state = "failed"
        self.running.pop(download.digest, None)
        self._watchers.pop(download.digest).stop()
        download.notify()
