"""
Failed logins counted per client, in a table of fixed size shared by
every process using the cache folder (a file under an exclusive
``flock``), so that rotating addresses or spreading logins over workers
gains an attacker nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import struct
from collections.abc import Callable, Iterable
from typing import TypeVar

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from regmirror.access.clients import Client
from regmirror.errors import TooManyRequests

T = TypeVar("T")
#: Failed logins allowed per client address within the window, then 429.
LOGIN_FAILURES = 5
LOGIN_WINDOW = 60.0

#: One client's record in the failed-login table: a tag naming the client
#: (16 bytes of a hash, zeros when free), how many times follow, and the
#: times of its last :data:`LOGIN_FAILURES` failed logins.
_ENTRY = struct.Struct(f"<16sI{LOGIN_FAILURES}d")
#: The table: sets of ways; a client has its entry in one set, picked by
#: its hash.  4,096 clients failing at once are tracked; beyond that the
#: client whose last failure is oldest in a set gives way, which gains an
#: attacker nothing that the addresses causing it did not already give.
LOGIN_SETS, LOGIN_WAYS = 512, 8
_SET_SIZE = _ENTRY.size * LOGIN_WAYS
#: The size of the table, in memory or in its file.
LOGIN_TABLE_SIZE = _SET_SIZE * LOGIN_SETS
_FREE = bytes(16)

_Entries = list[tuple[bytes, list[float]]]


def _login_key(client: Client) -> bytes:
    """
    What failed logins are counted by: an IPv4 address, the /64 network of
    an IPv6 address (any host holds a whole /64), or, for every client
    without an address, one shared key.
    """
    if client is None:
        return b"?"
    if isinstance(client, ipaddress.IPv6Address):
        if client.ipv4_mapped is None:
            return b"6" + client.packed[:8]
        client = client.ipv4_mapped
    return b"4" + client.packed


@define(eq=False)
class FailedLogins:
    """
    Recent failed logins per client, counted by every process using the
    cache folder (``workers``): a table of fixed size in the file *path*,
    each change under an exclusive ``flock``; in memory when *path* is
    ``None`` (or cannot be used: then each process counts its own, as it
    logs).  A login is counted when it starts, before bcrypt answers, so
    that logins sent at once cannot all start before the first failure is
    counted; a right password gives its attempt back (:meth:`release`).
    """

    clock: IReactorTime
    path: str | None = None
    _table: bytearray = field(init=False)
    log = Logger()

    def __attrs_post_init__(self) -> None:
        self._table = bytearray(0 if self.path else LOGIN_TABLE_SIZE)

    def check(self, client: Client) -> None:
        """:raises TooManyRequests: when *client* has failed too often."""
        now = self.clock.seconds()
        tag, index = _locate(client)

        def check(entries: _Entries) -> None:
            for entry_tag, times in entries:
                if entry_tag == tag:
                    _refuse_beyond_limit(_recent(times, now), now)

        self._change(index, check)

    def reserve(self, client: Client) -> float:
        """
        Count a login of *client* starting now, as failed unless released.

        :return: its time, for :meth:`release`.
        :raises TooManyRequests: when *client* has failed too often.
        """
        now = self.clock.seconds()
        tag, index = _locate(client)

        def reserve(entries: _Entries) -> float:
            recents = [_recent(times, now) for _, times in entries]
            found = [way for way, (entry, _) in enumerate(entries) if entry == tag]
            if found:
                way = found[0]
                _refuse_beyond_limit(recents[way], now)
            else:
                # The client whose last failure is the oldest gives way.
                way = min(
                    range(len(entries)), key=lambda w: recents[w][-1:] or [-1e300]
                )
                recents[way] = []
            entries[way] = (tag, [*recents[way], now])
            return now

        return self._change(index, reserve)

    def release(self, client: Client, stamp: float) -> None:
        """Forget the login of *client* counted at *stamp*: it succeeded."""
        now = self.clock.seconds()
        tag, index = _locate(client)

        def release(entries: _Entries) -> None:
            for way, (entry, times) in enumerate(entries):
                if entry == tag:
                    recent = _recent(times, now)
                    if stamp in recent:
                        recent.remove(stamp)
                    entries[way] = (tag if recent else _FREE, recent)

        self._change(index, release)

    def _change(self, index: int, change: Callable[[_Entries], T]) -> T:
        """*change* the entries of set *index*; kept unless it raises."""
        offset = index * _SET_SIZE
        if self.path is not None:
            try:
                return self._change_file(self.path, offset, change)
            except OSError as e:
                self.log.error(
                    "cannot use {path} ({why}): failed logins are counted"
                    " by each process alone",
                    path=self.path,
                    why=e.strerror,
                )
                self.path = None
                self._table = bytearray(LOGIN_TABLE_SIZE)
        before = bytes(self._table[offset : offset + _SET_SIZE])
        entries = _unpack(before)
        outcome = change(entries)
        self._table[offset : offset + _SET_SIZE] = _pack(entries)
        return outcome

    @staticmethod
    def _change_file(path: str, offset: int, change: Callable[[_Entries], T]) -> T:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            before = os.pread(fd, _SET_SIZE, offset).ljust(_SET_SIZE, b"\0")
            entries = _unpack(before)
            outcome = change(entries)
            after = _pack(entries)
            if after != before:
                os.pwrite(fd, after, offset)
            return outcome
        finally:
            os.close(fd)  # which releases the lock


def _locate(client: Client) -> tuple[bytes, int]:
    """The tag of *client*'s entry and the index of its set."""
    digest = hashlib.sha256(b"regmirror failed logins\0" + _login_key(client)).digest()
    return digest[:16], int.from_bytes(digest[16:20], "little") % LOGIN_SETS


def _recent(times: Iterable[float], now: float) -> list[float]:
    """The failure times within the window; none from the future beyond it
    (a clock set back), none that is no number."""
    return sorted(t for t in times if now - LOGIN_WINDOW < t <= now + LOGIN_WINDOW)


def _refuse_beyond_limit(recent: list[float], now: float) -> None:
    if len(recent) >= LOGIN_FAILURES:
        wait = min(max(int(recent[-LOGIN_FAILURES] + LOGIN_WINDOW - now) + 1, 1), 61)
        raise TooManyRequests(
            "too many failed logins from this address; try again later",
            {"Retry-After": str(wait)},
        )


def _unpack(data: bytes) -> _Entries:
    return [
        (tag, list(times[:count])) for tag, count, *times in _ENTRY.iter_unpack(data)
    ]


def _pack(entries: _Entries) -> bytes:
    packed = []
    for tag, times in entries:
        kept = times[-LOGIN_FAILURES:]
        padding = [0.0] * (LOGIN_FAILURES - len(kept))
        packed.append(_ENTRY.pack(tag, len(kept), *kept, *padding))
    return b"".join(packed)
