"""The package's time limit that progress pushes back, on a :class:`Clock`."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from regmirror._timeout import Idle
from regmirror.responses import read_small


class IdleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.idle = Idle(self.clock, 30)

    def test_silence_cancels_after_exactly_the_limit(self) -> None:
        """Without progress, the work is cancelled at ``seconds``, and fails
        with Twisted's TimeoutError however its canceller failed it."""
        cancelled: list[object] = []

        def cancel(d: Deferred[str]) -> None:
            cancelled.append(d)
            d.errback(ValueError("the agent's own words"))

        d = self.idle.watch(Deferred(cancel))
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, TimeoutError)
        assert "no progress within 30s" in failure.getErrorMessage()
        assert len(cancelled) == 1

    def test_progress_pushes_the_limit_back(self) -> None:
        """Each touch gives the work ``seconds`` more, however long it runs."""
        d: Deferred[str] = self.idle.watch(Deferred())
        for _ in range(10):
            self.clock.advance(20)
            self.idle.touch()
        self.assertNoResult(d)
        self.clock.advance(30)
        self.failureResultOf(d, TimeoutError)

    def test_the_count_ends_when_the_work_does(self) -> None:
        """A result passes through and leaves no timer behind; so does a
        cancellation that is not the limit's."""
        d: Deferred[str] = self.idle.watch(Deferred())
        d.callback("done")
        assert self.successResultOf(d) == "done"
        assert self.clock.getDelayedCalls() == []
        self.idle.touch()
        assert self.clock.getDelayedCalls() == []

        other: Deferred[str] = Idle(self.clock, 30).watch(Deferred())
        other.cancel()
        self.failureResultOf(other, CancelledError)
        assert self.clock.getDelayedCalls() == []

    def test_a_function_is_called_after_silence_unless_stopped(self) -> None:
        """``start`` calls back after ``seconds`` without a touch, once;
        ``stop`` ends the count, and touches after it change nothing."""
        expired: list[float] = []
        self.idle.start(lambda: expired.append(self.clock.seconds()))
        self.clock.advance(25)
        self.idle.touch()
        self.clock.advance(29.9)
        assert expired == []
        self.clock.advance(0.1)
        assert expired == [55.0]
        self.clock.advance(100)
        assert expired == [55.0]

        stopped = Idle(self.clock, 30)
        stopped.start(lambda: expired.append(-1.0))
        stopped.stop()
        stopped.touch()
        assert self.clock.getDelayedCalls() == []


class _Response:
    """Just enough of an ``IResponse`` for ``read_small``: a body of no
    announced length, delivered to a protocol over a transport that
    records being stopped."""

    length = None

    def __init__(self) -> None:
        self.protocol: Any = None
        self.stopped = False

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)

    def stopProducing(self) -> None:
        self.stopped = True


def test_a_small_body_that_goes_silent_is_given_up() -> None:
    """``responses.read_small`` gives up a body after ``idle`` seconds
    without a byte, not before (each chunk pushes the limit back), and
    closes its connection."""
    clock = Clock()
    response = _Response()
    body = read_small(response, 100, clock, 5)  # type: ignore[arg-type]
    d = Deferred.fromCoroutine(body)
    for _ in range(3):
        clock.advance(4.9)
        response.protocol.dataReceived(b"x")
    clock.advance(4.9)
    assert not d.called and not response.stopped
    clock.advance(0.1)
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures[0].check(ValueError)
    assert failures[0].getErrorMessage() == "silent for 5s"
    assert response.stopped
    assert clock.getDelayedCalls() == []
