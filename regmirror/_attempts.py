"""
Where a download whose transfer broke goes on from, and when it gives up.

A download may take several attempts (transfers) to fill its spool, each
from one source (an upstream, the shared store, another node) and each
starting where the last one stopped.  :class:`Attempts` remembers what
each attempt brought and decides the order in which the namespace's
upstreams are asked for the rest:

- the upstreams that have not broken during this download come first, in
  the namespace's order; then those that did, the one that broke longest
  ago first.  A break therefore moves the download on to the next upstream,
  and an upstream that broke is asked again only after every other one was
  tried: flaky upstreams take turns;
- attempts are bounded by progress: one that brings new bytes costs
  nothing, one that brings none counts against its source, which after
  :data:`MAX_FRUITLESS` of them is not asked again by this download.  The
  download gives up when no upstream is left, and in any case after
  :func:`max_attempts` attempts, a sanity cap that grows with the blob.

It knows nothing of I/O: the fetcher tells it when attempts begin and end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from attrs import define, field

#: How many attempts of one source may bring no new byte in one download.
MAX_FRUITLESS = 3
#: The sanity cap on a download's attempts: this many, plus one for each
#: ATTEMPT_BYTES of the blob.  Only sources that bring less than that per
#: attempt, on average, meet it.
MIN_ATTEMPTS = 16
ATTEMPT_BYTES = 256 * 1024


def max_attempts(size: int) -> int:
    """The most attempts a download of *size* bytes may take."""
    return MIN_ATTEMPTS + size // ATTEMPT_BYTES


class Named(Protocol):
    @property
    def name(self) -> str: ...


NamedT = TypeVar("NamedT", bound=Named)


@define
class _Attempt:
    """One transfer: from *source*, bytes ``[start, end)`` (end: so far)."""

    source: str
    start: int
    end: int | None = None

    @property
    def brought(self) -> int:
        return 0 if self.end is None else max(0, self.end - self.start)


@define(eq=False)
class Attempts:
    """The attempts of one download, oldest first."""

    _attempts: list[_Attempt] = field(factory=list)

    def began(self, source: str, offset: int) -> None:
        """A transfer from *source* starts at byte *offset* of the blob."""
        self.ended(offset)
        self._attempts.append(_Attempt(source, offset))

    def ended(self, written: int) -> None:
        """The current transfer ended (broke, or finished) at *written*
        bytes; nothing if it already had."""
        if self._attempts and self._attempts[-1].end is None:
            self._attempts[-1].end = written

    def fruitless(self, source: str) -> int:
        """How many finished attempts of *source* brought no new byte."""
        return sum(
            1
            for a in self._attempts
            if a.source == source and a.end is not None and a.brought == 0
        )

    def spent(self, source: str) -> bool:
        """Has *source* brought nothing too often to be asked again?"""
        return self.fruitless(source) >= MAX_FRUITLESS

    def next_order(self, upstreams: Sequence[NamedT]) -> list[NamedT]:
        """
        *upstreams* (in the namespace's order) in the order to ask them for
        the rest: those that have not broken during this download first,
        then the others, the one whose last attempt is oldest first; those
        that are spent left out.
        """
        last: dict[str, int] = {}
        for position, attempt in enumerate(self._attempts):
            if attempt.end is not None:
                last[attempt.source] = position
        candidates = [u for u in upstreams if not self.spent(u.name)]
        # A stable sort: untried ones (-1) keep the namespace's order.
        return sorted(candidates, key=lambda u: last.get(u.name, -1))

    def exhausted(self, size: int, upstreams: Sequence[Named]) -> str | None:
        """Why the download of *size* bytes makes no further attempt, if so."""
        limit = max_attempts(size)
        if len(self._attempts) >= limit:
            return f"{limit} attempts, the most for {size} bytes"
        if not self.next_order(upstreams):
            return f"every upstream brought nothing in {MAX_FRUITLESS} attempts"
        return None

    def summary(self) -> str:
        """Each source, in the order it was first used, with the new bytes
        it brought and its attempts, for people."""
        totals: dict[str, list[int]] = {}
        for attempt in self._attempts:
            entry = totals.setdefault(attempt.source, [0, 0])
            entry[0] += attempt.brought
            entry[1] += 1
        return ", ".join(
            f"{source}: {brought} bytes in {count} attempt{'' if count == 1 else 's'}"
            for source, (brought, count) in totals.items()
        )
