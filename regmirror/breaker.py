"""
The health of one upstream, as the pools see it: :class:`Breaker`.
"""

from __future__ import annotations

from attrs import define
from twisted.internet.interfaces import IReactorTime


@define(eq=False)
class Breaker:
    """
    The health of one upstream: a circuit breaker.

    Closed, requests flow.  A transport failure (no connection, a timeout)
    opens it at once; ``threshold`` failed answers in a row (5xx, garbage)
    open it too, and so do ``threshold`` blob transfers in a row that break
    off mid-body.  Open, the upstream is skipped for ``backoff`` seconds,
    doubling each time it opens again (up to ten times), so a dead upstream
    costs at most one failed attempt per period.  Then one request probes
    it (half open): success closes the breaker, failure opens it again.
    """

    clock: IReactorTime
    threshold: int = 3
    backoff: float = 30.0
    failures: int = 0
    open_until: float = 0.0
    #: how many times in a row it opened; 0 means closed
    opened: int = 0
    #: blob transfers in a row that broke off (an answer's headers do not
    #: end the run: a mirror that cuts every body answers every request)
    broken: int = 0
    #: when :meth:`Upstream.recover` last looked, while open
    looked_at: float = 0.0
    _probing: bool = False

    def allow(self) -> bool:
        """May a request go to the upstream now?"""
        if self.opened == 0:
            return True
        if self.clock.seconds() < self.open_until or self._probing:
            return False
        self._probing = True
        return True

    def succeeded(self) -> bool:
        """Record an answer; ``True`` if this closed an open breaker."""
        was_open = self.opened > 0
        self.failures = self.opened = 0
        self._probing = False
        return was_open

    def abandoned(self) -> None:
        """A request ended with neither answer nor fault (cancelled)."""
        self._probing = False

    def failed(self, transport: bool) -> float | None:
        """Record a failure; the seconds it is now open for, if it opened."""
        self.failures += 1
        if not (transport or self._probing or self.failures >= self.threshold):
            return None
        return self._open()

    def broke(self) -> float | None:
        """
        Record a blob transfer that broke off; ``threshold`` in a row, with
        no whole transfer between, open the breaker (the seconds it is now
        open for, if it opened).
        """
        self.broken += 1
        if self.broken < self.threshold:
            return None
        self.broken = 0
        return self._open()

    def transferred(self) -> None:
        """A blob transfer arrived whole."""
        self.broken = 0

    def _open(self) -> float:
        self._probing = False
        delay = float(min(self.backoff * 2**self.opened, self.backoff * 10))
        self.opened += 1
        self.open_until = self.clock.seconds() + delay
        return delay
