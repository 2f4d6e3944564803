"""
Tests for :class:`regmirror._attempts.Attempts`: where a download whose
transfer broke goes on from, and when it gives up.  The rule alone, with
upstreams reduced to their names; ``tests/test_failover.py`` runs it
through the fetcher.
"""

from __future__ import annotations

from attrs import frozen

from regmirror._attempts import MAX_FRUITLESS, Attempts, max_attempts


@frozen
class Named:
    name: str


A, B, C = Named("a"), Named("b"), Named("c")
ORDER = [A, B, C]


def attempt(attempts: Attempts, source: str, start: int, end: int) -> None:
    """One transfer from *source*: bytes ``[start, end)`` arrived, then it broke."""
    attempts.began(source, start)
    attempts.ended(end)


def test_before_any_break_the_namespace_order_stands() -> None:
    """A download under way on its first source keeps the configured order."""
    attempts = Attempts()
    assert attempts.next_order(ORDER) == ORDER
    attempts.began("a", 0)
    assert attempts.next_order(ORDER) == ORDER


def test_a_break_goes_on_from_the_next_upstream_in_order() -> None:
    """The upstream whose transfer broke goes to the end of the order; the
    others keep theirs."""
    attempts = Attempts()
    attempt(attempts, "a", 0, 4096)
    assert attempts.next_order(ORDER) == [B, C, A]
    attempt(attempts, "b", 4096, 8192)
    assert attempts.next_order(ORDER) == [C, A, B]


def test_upstreams_that_keep_breaking_take_turns() -> None:
    """Every upstream flaky: each is asked again only after all the others,
    whatever the order they broke in, however many rounds it takes."""
    attempts = Attempts()
    asked, written = [], 0
    for _ in range(7):
        source = attempts.next_order(ORDER)[0]
        asked.append(source.name)
        attempt(attempts, source.name, written, written + 100)
        written += 100
    assert asked == ["a", "b", "c", "a", "b", "c", "a"]


def test_an_upstream_that_could_not_be_asked_keeps_its_place() -> None:
    """``b`` refused to answer (no attempt recorded) while ``c`` took over:
    ``b``, which never broke this download, comes before those that did."""
    attempts = Attempts()
    attempt(attempts, "a", 0, 100)
    attempt(attempts, "c", 100, 200)
    assert attempts.next_order(ORDER) == [B, A, C]


def test_attempts_that_bring_bytes_never_use_up_an_upstream() -> None:
    """However many times an upstream breaks, each attempt that brought new
    bytes leaves it in the order and the download going."""
    attempts = Attempts()
    for n in range(40):
        attempt(attempts, "a", n * 100, n * 100 + 1)
    assert attempts.next_order([A]) == [A]
    assert attempts.exhausted(10**9, [A]) is None


def test_an_upstream_that_brings_nothing_is_dropped_after_max_fruitless() -> None:
    """Attempts that bring no new byte count against their upstream: after
    ``MAX_FRUITLESS`` of them it is not asked again by this download."""
    attempts = Attempts()
    attempt(attempts, "a", 0, 500)
    for _ in range(MAX_FRUITLESS - 1):
        attempt(attempts, "b", 500, 500)
    assert B in attempts.next_order(ORDER)
    attempt(attempts, "b", 500, 500)
    assert attempts.next_order(ORDER) == [C, A]
    assert attempts.exhausted(1000, ORDER) is None


def test_progress_between_fruitless_attempts_does_not_reset_the_count() -> None:
    """An upstream's fruitless attempts add up over the download, even with
    bytes from it or others in between."""
    attempts = Attempts()
    written = 0
    for _ in range(MAX_FRUITLESS):
        attempt(attempts, "a", written, written + 10)
        written += 10
        attempt(attempts, "b", written, written)
    assert attempts.next_order([A, B]) == [A]


def test_the_download_gives_up_when_no_upstream_is_left() -> None:
    """Every upstream brought nothing ``MAX_FRUITLESS`` times: the download
    gives up, saying so."""
    attempts = Attempts()
    for _ in range(MAX_FRUITLESS):
        attempt(attempts, "a", 0, 0)
        attempt(attempts, "b", 0, 0)
    why = attempts.exhausted(1000, [A, B])
    assert why is not None and "brought nothing" in why
    assert attempts.next_order([A, B]) == []


def test_a_sanity_cap_on_attempts_grows_with_the_blob() -> None:
    """Attempts that each bring a byte or two would go on for ever: a cap,
    larger for larger blobs, ends them."""
    assert max_attempts(0) < max_attempts(64 * 1024**2) < max_attempts(64 * 1024**3)
    attempts = Attempts()
    size = 64 * 1024**2
    for n in range(max_attempts(size) - 1):
        attempt(attempts, "a", n, n + 1)
    assert attempts.exhausted(size, [A]) is None
    attempt(attempts, "a", size, size + 1)
    why = attempts.exhausted(size, [A])
    assert why is not None and str(max_attempts(size)) in why


def test_the_summary_names_each_source_with_its_bytes_and_attempts() -> None:
    """For the log line of a failed download: every source, in the order it
    was first used, with the new bytes it brought and its attempts."""
    attempts = Attempts()
    attempt(attempts, "a", 0, 4096)
    attempt(attempts, "shared store", 4096, 4096)
    attempt(attempts, "a", 4096, 5000)
    attempts.began("b", 5000)
    assert attempts.summary() == (
        "a: 5000 bytes in 2 attempts, shared store: 0 bytes in 1 attempt, "
        "b: 0 bytes in 1 attempt"
    )


def test_ended_twice_counts_once() -> None:
    """A failure after the transfer's end was recorded changes nothing."""
    attempts = Attempts()
    attempt(attempts, "a", 0, 100)
    attempts.ended(200)
    assert attempts.summary() == "a: 100 bytes in 1 attempt"
