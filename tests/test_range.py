"""
Tests for :func:`regmirror.http.blobs.parse_range`: how a ``Range`` header selects
part of a blob of known size.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regmirror.errors import RangeInvalid
from regmirror.http.blobs import asks_range, parse_range


@pytest.mark.parametrize(
    ("value", "size", "expected"),
    [
        ("bytes=0-0", 10, (0, 1)),
        ("bytes=0-9", 10, (0, 10)),
        ("bytes=2-5", 10, (2, 6)),
        ("bytes=9-9", 10, (9, 10)),
        ("bytes=5-", 10, (5, 10)),
        ("bytes=0-", 10, (0, 10)),
        ("bytes=0-", 1, (0, 1)),
        (" bytes=2-5 ", 10, (2, 6)),
    ],
)
def test_single_range(value: str, size: int, expected: tuple[int, int]) -> None:
    """``bytes=first-last`` gives ``(first, last + 1)``; an open end means size."""
    assert parse_range(value, size) == expected


@pytest.mark.parametrize(
    ("value", "size", "expected"),
    [
        ("bytes=5-100", 10, (5, 10)),
        ("bytes=0-10", 10, (0, 10)),
        ("bytes=9-99999999999999999999", 10, (9, 10)),
    ],
)
def test_last_beyond_size_is_clamped(
    value: str, size: int, expected: tuple[int, int]
) -> None:
    """A last byte past the end is clamped to the end of the body."""
    assert parse_range(value, size) == expected


@pytest.mark.parametrize(
    ("value", "size", "expected"),
    [
        ("bytes=-1", 10, (9, 10)),
        ("bytes=-3", 10, (7, 10)),
        ("bytes=-10", 10, (0, 10)),
        ("bytes=-11", 10, (0, 10)),
        ("bytes=-500", 1, (0, 1)),
    ],
)
def test_suffix_range(value: str, size: int, expected: tuple[int, int]) -> None:
    """``bytes=-N`` is the last N bytes, or the whole body when N >= size."""
    assert parse_range(value, size) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="no-header"),
        pytest.param("", id="empty"),
        pytest.param("bytes=", id="no-range"),
        pytest.param("bytes=-", id="dash-only"),
        pytest.param("bytes=a-b", id="letters"),
        pytest.param("bytes=1-2-3", id="three-parts"),
        pytest.param("bytes=0-1,5-6", id="multi-range"),
        pytest.param("bytes=0-1, 5-6", id="multi-range-space"),
        pytest.param("items=0-1", id="other-unit"),
        pytest.param("0-1", id="no-unit"),
        pytest.param("bytes=+1-2", id="sign"),
        pytest.param("bytes=5-3", id="last-before-first"),
        pytest.param("bytes=1-0", id="last-before-first-small"),
    ],
)
def test_ignored_ranges(value: str | None) -> None:
    """
    No header, a malformed one, several ranges, or ``last < first``: None,
    meaning the whole body is sent.
    """
    assert parse_range(value, 10) is None


@pytest.mark.parametrize(
    ("value", "size"),
    [
        pytest.param("bytes=10-", 10, id="start-at-size"),
        pytest.param("bytes=10-20", 10, id="start-at-size-closed"),
        pytest.param("bytes=11-", 10, id="start-past-size"),
        pytest.param("bytes=-0", 10, id="empty-suffix"),
        pytest.param("bytes=0-", 0, id="empty-body"),
        pytest.param("bytes=-5", 0, id="suffix-of-empty-body"),
    ],
)
def test_unsatisfiable(value: str, size: int) -> None:
    """
    A range starting at or past the end, or an empty suffix, raises
    RangeInvalid: status 416 with ``Content-Range: bytes */SIZE``.
    """
    with pytest.raises(RangeInvalid) as info:
        parse_range(value, size)
    assert info.value.status == 416
    assert info.value.headers["Content-Range"] == f"bytes */{size}"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("bytes=" + "1" * 5000 + "-", id="huge-first"),
        pytest.param("bytes=0-" + "9" * 5000, id="huge-last"),
        pytest.param("bytes=-" + "9" * 5000, id="huge-suffix"),
    ],
)
def test_huge_numbers(value: str) -> None:
    """
    Numbers with thousands of digits (a few KiB fit in one header) never
    escape as a ValueError: the range is served clamped, ignored, or
    refused with RangeInvalid.
    """
    try:
        result = parse_range(value, 10)
    except RangeInvalid:
        return
    assert result is None or 0 <= result[0] < result[1] <= 10


_NUMBER = st.one_of(st.integers(0, 20), st.integers(0, 2**70))
_SPEC = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", _NUMBER, _NUMBER),
    st.builds(lambda a: f"bytes={a}-", _NUMBER),
    st.builds(lambda b: f"bytes=-{b}", _NUMBER),
)


@given(size=st.integers(1, 2**40), value=_SPEC)
def test_returned_range_is_within_body(size: int, value: str) -> None:
    """
    For any body of at least one byte, a range that is served is a
    non-empty slice of the body: ``0 <= start < end <= size``; one that is
    refused carries ``bytes */SIZE``.
    """
    try:
        result = parse_range(value, size)
    except RangeInvalid as e:
        assert e.headers["Content-Range"] == f"bytes */{size}"
        return
    if result is not None:
        start, end = result
        assert 0 <= start < end <= size


@given(size=st.integers(1, 2**40), length=st.integers(1, 2**41))
def test_suffix_is_last_bytes(size: int, length: int) -> None:
    """``bytes=-N`` gives the last ``min(N, size)`` bytes."""
    assert parse_range(f"bytes=-{length}", size) == (size - min(length, size), size)


@given(
    size=st.integers(1, 2**40),
    start=st.integers(0, 2**41),
    extra=st.integers(0, 2**41),
)
def test_closed_range(size: int, start: int, extra: int) -> None:
    """
    ``bytes=first-last`` with ``first <= last`` gives ``(first, min(last + 1,
    size))`` when first is inside the body, and RangeInvalid otherwise.
    """
    last = start + extra
    value = f"bytes={start}-{last}"
    if start >= size:
        with pytest.raises(RangeInvalid):
            parse_range(value, size)
    else:
        assert parse_range(value, size) == (start, min(last + 1, size))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("bytes=" + "0" * 30 + "5-", (5, 10), id="padded-first"),
        pytest.param("bytes=2-" + "0" * 30 + "5", (2, 6), id="padded-last"),
        pytest.param("bytes=-" + "0" * 30 + "3", (7, 10), id="padded-suffix"),
    ],
)
def test_leading_zeros(value: str, expected: tuple[int, int]) -> None:
    """
    Leading zeros (``1*DIGIT`` in RFC 9110) do not change a position, however
    many there are.
    """
    assert parse_range(value, 10) == expected


def test_long_last_before_first_ignored() -> None:
    """``last < first`` is ignored (None) even when both have 20 digits."""
    assert parse_range("bytes=20000000000000000000-10000000000000000000", 10) is None


@given(
    size=st.integers(1, 2**40),
    last=st.integers(0, 10**25),
    gap=st.integers(1, 10**25),
)
def test_last_before_first_always_ignored(size: int, last: int, gap: int) -> None:
    """For any numbers, ``bytes=first-last`` with ``last < first`` gives None."""
    assert parse_range(f"bytes={last + gap}-{last}", size) is None


@given(
    size=st.integers(0, 2**40),
    value=_SPEC,
    pad=st.integers(0, 40),
)
def test_zero_padding_changes_nothing(size: int, value: str, pad: int) -> None:
    """Zero-padding every number in a range gives the same outcome."""
    padded = re.sub(r"\d+", lambda m: "0" * pad + m.group(0), value)

    def outcome(text: str) -> object:
        try:
            return parse_range(text, size)
        except RangeInvalid as e:
            return ("416", e.headers["Content-Range"])

    assert outcome(padded) == outcome(value)


@pytest.mark.parametrize(
    ("value", "asks"),
    [
        (None, False),
        ("bytes=0-1,5-6", False),
        ("bytes=5-3", False),
        ("bytes=-", False),
        ("items=0-1", False),
        ("bytes=2-5", True),
        ("bytes=5-", True),
        ("bytes=-3", True),
        ("bytes=-0", True),
        ("bytes=99999999-", True),
    ],
)
def test_asks_range_before_the_size_is_known(value: str | None, asks: bool) -> None:
    """
    Whether a header asks for one range is known without the size (a
    download that stated none waits for it only then): exactly the headers
    :func:`parse_range` answers with a range or a 416 rather than ignores.
    """
    assert asks_range(value) is asks
    try:
        answered = parse_range(value, 10) is not None
    except RangeInvalid:
        answered = True
    assert answered is asks
