"""
A time limit that progress pushes back, on the injected clock.

:meth:`Deferred.addTimeout` bounds a wait that should end; :class:`Idle`
bounds work that should keep moving (a body going up, bytes coming in),
however long it takes as a whole.
"""

from __future__ import annotations

from typing import TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")


@define(eq=False)
class Idle:
    """
    Cancels a :class:`Deferred` after *seconds* of *clock* without
    progress (:meth:`touch`).
    """

    clock: IReactorTime
    seconds: float
    _call: IDelayedCall | None = field(default=None, init=False)

    def watch(self, d: Deferred[T]) -> Deferred[T]:
        """
        Start counting from now.  Once time runs out *d* is cancelled and
        then fails with :class:`twisted.internet.defer.TimeoutError`,
        whatever its canceller made of it; the count ends when *d* fires.

        :return: *d*
        """
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            d.cancel()

        call = self._call = self.clock.callLater(self.seconds, expire)

        def settle(result: T | Failure) -> T | Failure:
            if call.active():
                call.cancel()
            if expired and isinstance(result, Failure):
                return Failure(TimeoutError(f"no progress within {self.seconds:g}s"))
            return result

        return d.addBoth(settle)

    def touch(self) -> None:
        """Progress: the count starts again."""
        if self._call is not None and self._call.active():
            self._call.reset(self.seconds)
