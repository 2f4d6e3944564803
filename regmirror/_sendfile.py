"""
Blob bodies from disk to a plain TCP socket with ``sendfile(2)``: the
kernel copies from the page cache to the socket, and no byte of the body
passes through Python or the transport's write buffer (but for those of a
download still on their way to the spool file, sent from memory).

Twisted's TCP transport buffers whatever is written to it and sends it
when the socket is writable; a *pull* producer registered with it is
asked for more each time that buffer has been sent in full.  The sender
below is such a producer: for the length of one response body it takes
the transport's producer slot from the HTTP channel, so that it is only
ever asked to send when the response head is out and nothing else is
queued, and it gives the slot back after the last byte, for the next
request on the connection.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

from regmirror.errors import DownloadFailed
from regmirror.readers import BlobSource, BlobTail

#: Bytes asked of one ``sendfile`` call, and calls per writable socket
#: before the other connections get their turn.
SENDFILE_CHUNK = 1024 * 1024
CALLS_PER_TURN = 4

#: ``sendfile`` cannot serve this file or socket: copy instead.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


@implementer(IPullProducer)
class SocketSender(BlobTail):
    """
    Sends bytes ``[start, end)`` of a blob, from the cache file or from a
    download's growing spool, to a plain TCP connection with ``sendfile``.

    Back-pressure comes from the socket: when it is full the sender waits
    for the transport to find it writable again, and reads nothing ahead.

    :param transport: a connected :class:`twisted.internet.tcp.Server`
        (not TLS), whose producer is the HTTP channel, not paused, and
        which holds the response head in its write buffer.
    """

    def __init__(
        self,
        source: BlobSource,
        transport: Any,
        start: int,
        end: int,
        count: Callable[[int], object] | None = None,
        kernel: Callable[[int], object] | None = None,
    ) -> None:
        """
        :param count: called with the bytes of each send, however sent.
        :param kernel: called with the bytes of each ``sendfile`` (not
            those sent from memory, or copied where it cannot be used).
        """
        super().__init__(source, start, end, count)
        self._kernel = kernel
        self._transport = transport
        self._socket = transport.getHandle()
        self._previous: tuple[Any, bool] | None = None
        self._copy = False

    def begin(self) -> None:
        transport = self._transport
        self._previous = (transport.producer, transport.streamingProducer)
        transport.unregisterProducer()
        # Registering a pull producer asks it for data at once, while the
        # head is still queued: that call is ignored, as _previous is unset
        # until the registration is done.
        previous, self._previous = self._previous, None
        transport.registerProducer(self, False)
        self._previous = previous
        if not self._stopped:
            # Sending the head, if it is still queued; then resumeProducing.
            transport.startWriting()

    def resumeProducing(self) -> None:
        """The transport has sent everything it held: send some more."""
        if self._previous is not None and not self._stopped:
            self._send()

    def _more(self) -> None:
        # Waiting for the download means the socket was not full, and the
        # transport's buffer stays empty while this sender owns it.
        self._send()

    def _send(self) -> None:
        transport = self._transport
        if transport.disconnecting:
            self._abort(DownloadFailed("the connection is closing"))
            return
        for _ in range(CALLS_PER_TURN):
            limit = self._limit()
            assert limit is not None, "a sendfile body has a length"
            if self._position >= limit:
                self._at_limit()
                return
            count = min(SENDFILE_CHUNK, limit - self._position)
            try:
                sent = self._send_some(count)
            except BlockingIOError:
                transport.startWriting()
                return
            except OSError as e:
                self._abort(DownloadFailed(f"cannot send to the client: {e}"))
                return
            if sent == 0:
                self._abort(DownloadFailed("the blob's file ended early"))
                return
            self._sent(sent)
            if sent < count:
                # The socket is full: on when the transport finds it writable.
                transport.startWriting()
                return
        transport.startWriting()

    def _send_some(self, count: int) -> int:
        """Send up to *count* bytes from the current position."""
        view = self._in_memory(count)
        if view is not None:
            # Not in the file yet: from the download's window.
            sent: int = self._socket.send(view)
            return sent
        count = self._in_file(count)
        if count == 0:
            return 0
        if not self._copy:
            try:
                sent = os.sendfile(
                    self._socket.fileno(), self._file.fileno(), self._position, count
                )
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                # A file system without sendfile support: copy, on the same
                # socket, with the same back-pressure.
                self._copy = True
            else:
                if self._kernel is not None:
                    self._kernel(sent)
                return sent
        data = os.pread(self._file.fileno(), count, self._position)
        if not data:
            return 0
        sent = self._socket.send(data)
        return sent

    def _release(self) -> None:
        transport = self._transport
        if transport.producer is self:
            transport.unregisterProducer()
        previous, self._previous = self._previous, None
        if previous is not None and transport.connected and transport.producer is None:
            transport.registerProducer(*previous)
