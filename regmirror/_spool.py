"""
A download in progress on local disk: :class:`Spool`, a file in the
cache's ``spool/`` folder that grows, is hashed as it grows and handed to
the disk as it grows (``sync_file_range`` where the C library has it), and
is moved into the cache only once its bytes match their digest
(:meth:`Spool.commit`); and the file helpers the cache shares with it.
:class:`regmirror.store.Store` makes spools.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from attrs import define, field

from regmirror.reference import Digest

#: Beside a spool file: the size its blob will have, for other processes.
SIZE_SUFFIX = ".size"

#: A spool's bytes are handed to the disk as they come, so that the flush
#: before the last byte waits for little: without ``sync_file_range``, an
#: ``fdatasync`` every this many bytes.
WRITEBACK_STEP = 16 * 1024 * 1024
#: With ``sync_file_range``, the writer waits for the disk once more than
#: this many bytes are on their way there (a disk slower than the network
#: slows the download, rather than the last byte).
WRITEBACK_WINDOW = 32 * 1024 * 1024
#: The most buffers one ``writev`` takes (``IOV_MAX`` on Linux).
MAX_BUFFERS = 1024


class DigestMismatch(Exception):
    """Bytes did not hash to the digest they were fetched for."""

    def __init__(self, expected: Digest, actual: str) -> None:
        super().__init__(f"expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


def write_atomically(path: str, data: bytes, sync: bool = True) -> None:
    """Replace *path* with *data*, never leaving a half-written file behind."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _libc(name: str, *argtypes: Any) -> Callable[..., int] | None:
    """The C library's function *name*, one that Python's ``os`` lacks, or
    ``None`` where there is none (not Linux, another C library)."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _libc(
    "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
)
# <linux/fs.h>
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
#: ``sync_file_range`` cannot do this file: ``fdatasync`` now and then instead.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP})

#: ``fallocate64`` takes 64-bit offsets whatever the C library's ``off_t``
#: (glibc on 32-bit systems); a C library without it has a 64-bit ``off_t``.
_FALLOCATE = _libc(
    "fallocate64", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64
) or _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
# <linux/falloc.h>: FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_PUNCH_HOLE = 0x01 | 0x02


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """
    Give the file system back the blocks of bytes *offset* to *offset* +
    *length* of *fd* (they read as zeros then; the file keeps its size).
    Blocking.

    :return: ``False`` where the system or the file system cannot.
    :raises OSError: when it fails otherwise.
    """
    if _FALLOCATE is None:
        return False
    if _FALLOCATE(fd, _PUNCH_HOLE, offset, length) != 0:
        error = ctypes.get_errno()
        if error in _UNSUPPORTED:
            return False
        raise OSError(error, os.strerror(error))
    return True


class _Writeback:
    """
    Hands a growing file's bytes to the disk while it grows (blocking
    calls, made by whoever writes it), so that the ``fsync`` at its end
    finds little left to write.
    """

    def __init__(self) -> None:
        self._sync = _SYNC_FILE_RANGE
        #: bytes whose writeback was started, and those known on disk
        self._started = 0
        self._done = 0

    def advance(self, fd: int, end: int) -> None:
        """The file now has *end* bytes."""
        if self._sync is not None:
            try:
                self._ranges(fd, end)
                return
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self._sync = None  # this file system: fdatasync, then
        if end - self._done >= WRITEBACK_STEP:
            os.fdatasync(fd)
            self._done = self._started = end

    def _ranges(self, fd: int, end: int) -> None:
        if end > self._started:
            self._range(fd, self._started, end, _WRITE)
            self._started = end
        if end - self._done > WRITEBACK_WINDOW:
            # Bounded dirty bytes: wait for the older half of the window.
            until = end - WRITEBACK_WINDOW // 2
            self._range(fd, self._done, until, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            self._done = until

    def _range(self, fd: int, start: int, end: int, flags: int) -> None:
        assert self._sync is not None
        if self._sync(fd, start, end - start, flags) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))


def _write_all(fd: int, buffers: Sequence[bytes]) -> int:
    """Write every byte of *buffers* at the file's end; how many that is."""
    total = 0
    pending = [memoryview(b) for b in buffers if b]
    while pending:
        wrote = os.writev(fd, pending[:MAX_BUFFERS])
        total += wrote
        # A short write (rare for a file): carry on after what went.
        while pending and wrote >= len(pending[0]):
            wrote -= len(pending[0])
            pending.pop(0)
        if wrote:
            pending[0] = pending[0][wrote:]
    return total


class SpoolClosed(Exception):
    """The spool was committed or thrown away: nothing more goes in."""


@define(eq=False)
class Spool:
    """
    A download in progress: bytes appended here are hashed as they go, and
    handed to the disk as they go (see :class:`_Writeback`).

    A thread may write bytes (:meth:`put`, in their order) while another
    hashes the same bytes (:meth:`hash`, in the same order); :meth:`append`
    does both.  :meth:`discard` may come meanwhile from another thread: a
    :meth:`put` under way then closes the file when it ends.

    :ivar path: the spool file, which readers may open and tail.
    :ivar written: the bytes readers may read: :meth:`write` counts them;
        whoever puts bytes in a thread counts them once :meth:`put` ended.
    """

    digest: Digest
    path: str
    final_path: str
    _file: IO[bytes]
    _hasher: object = field(init=False)
    written: int = 0
    #: bytes in the file (``written`` may lag behind, never run ahead)
    _end: int = 0
    _writeback: _Writeback = field(factory=_Writeback)
    _lock: threading.Lock = field(factory=threading.Lock)
    #: calls using the file under way (in a thread)
    _using: int = 0
    _closed: bool = False

    def __attrs_post_init__(self) -> None:
        self._hasher = self.digest.hasher()

    def write(self, data: bytes) -> None:
        self.written += self.append([data])

    def append(self, buffers: Sequence[bytes]) -> int:
        """
        Add *buffers* to the file and to the hash.  Blocking: large amounts
        are a thread's job.

        :return: the number of bytes appended.
        :raises SpoolClosed: when the spool was committed or discarded.
        """
        appended = self.put(buffers)
        self.hash(buffers)
        return appended

    def put(self, buffers: Sequence[bytes]) -> int:
        """
        Add *buffers* to the file (not to the hash), and start their
        writeback to the disk.  Blocking.

        :return: the number of bytes written.
        :raises SpoolClosed: when the spool was committed or discarded.
        """
        with self._using_file() as fd:
            # Readers open the file by name: what is counted must be there.
            written = _write_all(fd, buffers)
            self._end += written
            self._writeback.advance(fd, self._end)
            return written

    def hash(self, buffers: Sequence[bytes]) -> None:
        """Add *buffers* to the hash, after those hashed before.  Blocking
        for large buffers (hashlib lets other threads run meanwhile)."""
        for data in buffers:
            self._hasher.update(data)  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def _using_file(self) -> Iterator[int]:
        """The file descriptor, which is not closed until the caller is
        done with it (a :meth:`discard` from another thread meanwhile
        leaves the closing to the last user)."""
        with self._lock:
            if self._closed:
                raise SpoolClosed(self.path)
            self._using += 1
        try:
            yield self._file.fileno()
        finally:
            with self._lock:
                self._using -= 1
                close = self._closed and not self._using
            if close:
                self._file.close()

    def verify(self) -> None:
        """
        :raises DigestMismatch: if the bytes written so far do not match.
        """
        actual = self._hasher.hexdigest()  # type: ignore[attr-defined]
        if actual != self.digest.hex:
            raise DigestMismatch(self.digest, f"{self.digest.algorithm}:{actual}")

    def announce(self, size: int | None) -> None:
        """Tell readers in other processes how big the blob will be."""
        if size is not None:
            write_atomically(self.path + SIZE_SUFFIX, str(size).encode(), sync=False)

    def commit(self) -> None:
        """
        Verify, flush to stable storage and move into the cache.  Blocking:
        run it in a thread for big blobs.

        :raises DigestMismatch: and removes the spool file, if the bytes do
            not match the digest.
        """
        try:
            self.verify()
            # Short: most of the bytes went to the disk on the way.
            os.fsync(self._file.fileno())
            os.makedirs(os.path.dirname(self.final_path), exist_ok=True)
            os.replace(self.path, self.final_path)
            unlink_if_there(self.path + SIZE_SUFFIX)
            self._close()  # releases the lock, after the rename
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Throw the bytes away (a call under way in a thread closes the
        file when it ends: never is a file closed under a thread using it)."""
        unlink_if_there(self.path)
        unlink_if_there(self.path + SIZE_SUFFIX)
        self._close()

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            close = not self._using
        if close:
            self._file.close()


def unlink_if_there(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
