"""
Users and their bcrypt hashes from an htpasswd file, and the stand-in
hash an unknown user's password is checked against.
"""

from __future__ import annotations

import os
import re
from collections import Counter

from attrs import define, field
from twisted.logger import Logger

#: What ``htpasswd -B`` writes (bcrypt raises for anything else).
BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
#: The longest password bcrypt hashes, in bytes.
BCRYPT_MAX_PASSWORD = 72
#: What an unknown user's password is checked against, so that a login
#: costs one bcrypt check whether the user exists or not; its cost (``04``)
#: is replaced by the users' (:meth:`Htpasswd.stand_in`).  No password
#: matches it: it hashes 32 random bytes nobody kept.
STAND_IN_HASH = b"$2b$04$XdnCQnAZpWirTZnd0IwoE.4t96VZpYmeiE9cUmKukVqFHo8K3ofL."
#: The stand-in's cost when the htpasswd file has no users.
STAND_IN_COST = 10


@define(eq=False)
class Htpasswd:
    """
    Users and bcrypt hashes from an htpasswd file, read again whenever the
    file changes.  Entries with other hash schemes are ignored (logged).
    """

    path: str
    #: how many times the file was read: a change tells
    #: :class:`~regmirror.access.gate.Gate` to forget the logins it verified
    generation: int = 0
    _stamp: tuple[int, int, int, int] | None = None
    #: kept out of ``repr``: a log event carries its source
    _users: dict[str, bytes] = field(factory=dict, repr=False)
    _stand_in: bytes = field(default=b"", repr=False)
    log = Logger()

    def hash_for(self, user: str) -> bytes | None:
        self._reload()
        return self._users.get(user)

    def stand_in(self) -> bytes:
        """
        A hash no password matches, of the cost most users' hashes have
        (the higher one on a tie): what an unknown user's password is
        checked against, so that the check costs what a user's does.
        """
        self._reload()
        if not self._stand_in:
            costs = Counter(int(hashed[4:6]) for hashed in self._users.values())
            cost = max(costs, key=lambda c: (costs[c], c), default=STAND_IN_COST)
            self._stand_in = b"%s%02d%s" % (STAND_IN_HASH[:4], cost, STAND_IN_HASH[6:])
        return self._stand_in

    def _reload(self) -> None:
        try:
            status = os.stat(self.path)
        except OSError as e:
            self.log.error(
                "cannot read htpasswd file {path}: {why}",
                path=self.path,
                why=e.strerror,
            )
            if self._stamp is not None or self.generation == 0:
                self.generation += 1
            self._users = {}
            self._stand_in = b""
            self._stamp = None
            return
        # The inode too: a file replaced by a rename (how editors and
        # configuration tools write) may keep its size and time.
        stamp = (status.st_mtime_ns, status.st_ctime_ns, status.st_size, status.st_ino)
        if stamp == self._stamp:
            return
        users: dict[str, bytes] = {}
        lines: dict[str, int] = {}
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                user, colon, hashed = line.partition(":")
                if not colon or not BCRYPT_HASH.fullmatch(hashed):
                    self.log.warn(
                        "{path} line {number}: not a bcrypt entry, ignored",
                        path=self.path,
                        number=number,
                    )
                    continue
                if user in users:
                    self.log.warn(
                        "{path} line {number}: user {user!r} given twice "
                        "(also line {first}): the last line counts",
                        path=self.path,
                        number=number,
                        user=user[:64],
                        first=lines[user],
                    )
                users[user] = hashed.encode("ascii")
                lines[user] = number
        self._users = users
        self._stand_in = b""
        self._stamp = stamp
        self.generation += 1
        self.log.info(
            "loaded {count} users from {path}", count=len(users), path=self.path
        )
