"""
A time limit that progress pushes back, on the injected clock: the
package's one idle timer.

:meth:`Deferred.addTimeout` bounds a wait that should end; :class:`Idle`
bounds work that should keep moving (a body going up, bytes coming in),
however long it takes as a whole: a :class:`Deferred` it cancels
(:meth:`Idle.watch`), or a body protocol it calls back (:meth:`Idle.start`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")


@define(eq=False)
class Idle:
    """
    Cancels a :class:`Deferred`, or calls a function, after *seconds* of
    *clock* without progress (:meth:`touch`).
    """

    clock: IReactorTime
    seconds: float
    _call: IDelayedCall | None = field(default=None, init=False)

    def start(self, expire: Callable[[], object]) -> None:
        """Start counting from now: *expire* is called once time runs out,
        unless :meth:`stop` came first."""
        self._call = self.clock.callLater(self.seconds, expire)

    def stop(self) -> None:
        """The work ended: the count ends too."""
        if self._call is not None and self._call.active():
            self._call.cancel()

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

        self.start(expire)

        def settle(result: T | Failure) -> T | Failure:
            self.stop()
            if expired and isinstance(result, Failure):
                return Failure(TimeoutError(f"no progress within {self.seconds:g}s"))
            return result

        return d.addBoth(settle)

    def touch(self) -> None:
        """Progress: the count starts again."""
        if self._call is not None and self._call.active():
            self._call.reset(self.seconds)
