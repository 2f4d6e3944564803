"""Single flight: one piece of work per key, its result shared by every caller."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """
    Runs at most one coroutine per key at a time; callers that ask for the
    same key meanwhile wait for that one's result.

    Each caller gets a Deferred of its own: cancelling it (a client went
    away) leaves the shared work and the other callers alone.
    """

    def __init__(self) -> None:
        self._waiting: dict[K, list[Deferred[V]]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._waiting

    def join(self, key: K) -> Deferred[V] | None:
        """The result of the work under way for *key*, if there is some."""
        waiters = self._waiting.get(key)
        if waiters is None:
            return None
        mine: Deferred[V] = Deferred()
        waiters.append(mine)
        return mine

    def run(self, key: K, work: Callable[[], Coroutine[Any, Any, V]]) -> Deferred[V]:
        mine: Deferred[V] = Deferred()
        waiters = self._waiting.get(key)
        if waiters is not None:
            waiters.append(mine)
            return mine
        self._waiting[key] = [mine]
        Deferred.fromCoroutine(work()).addBoth(self._finished, key)
        return mine

    def _finished(self, result: V | Failure, key: K) -> None:
        for waiter in self._waiting.pop(key):
            if waiter.called:  # cancelled by its caller
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
