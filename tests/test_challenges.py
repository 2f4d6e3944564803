"""
Tests for :func:`regmirror.upstream.parse_challenges`: reading an upstream's
``WWW-Authenticate`` header to find the token realm.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from regmirror.upstream import Challenge, parse_challenges


def test_docker_hub_bearer() -> None:
    """Docker Hub's Bearer challenge gives realm, service and scope."""
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"'
    )
    assert parse_challenges(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/busybox:pull",
            },
        )
    ]


def test_quoted_value_with_comma() -> None:
    """A comma inside a quoted value belongs to the value."""
    header = 'Bearer realm="https://a.example/token",scope="repository:x:pull,push"'
    [challenge] = parse_challenges(header)
    assert challenge.params == {
        "realm": "https://a.example/token",
        "scope": "repository:x:pull,push",
    }


def test_quoted_value_with_escaped_quote() -> None:
    """A backslash escapes a quote or backslash inside a quoted value."""
    header = r'Bearer realm="say \"hi\", then go",error="a\\b",service="s"'
    [challenge] = parse_challenges(header)
    assert challenge.params == {
        "realm": 'say "hi", then go',
        "error": "a\\b",
        "service": "s",
    }


def test_several_challenges() -> None:
    """Several challenges in one header are all returned, in order."""
    header = 'Basic realm="x", Bearer realm="y",service="z"'
    assert parse_challenges(header) == [
        Challenge("basic", {"realm": "x"}),
        Challenge("bearer", {"realm": "y", "service": "z"}),
    ]


def test_several_challenges_unquoted() -> None:
    """Several challenges with unquoted values are all returned."""
    header = "Basic realm=x, Bearer realm=y, service=z"
    assert parse_challenges(header) == [
        Challenge("basic", {"realm": "x"}),
        Challenge("bearer", {"realm": "y", "service": "z"}),
    ]


def test_unquoted_values() -> None:
    """Parameter values may be tokens without quotes."""
    header = "Bearer realm=https://auth.example/token,service=registry.example"
    assert parse_challenges(header) == [
        Challenge(
            "bearer",
            {"realm": "https://auth.example/token", "service": "registry.example"},
        )
    ]


def test_case_insensitive_scheme_and_names() -> None:
    """Scheme and parameter names are lower-cased; values keep their case."""
    header = 'bearer Realm="https://A.example/Token",SERVICE="Reg"'
    assert parse_challenges(header) == [
        Challenge("bearer", {"realm": "https://A.example/Token", "service": "Reg"})
    ]
    assert parse_challenges('BEARER realm="r"')[0].scheme == "bearer"


def test_whitespace_around_parameters() -> None:
    """Spaces around ``=`` and ``,`` are allowed."""
    header = 'Bearer  realm = "r" ,  service = "s"'
    assert parse_challenges(header) == [
        Challenge("bearer", {"realm": "r", "service": "s"})
    ]


def test_empty_header() -> None:
    """An empty header has no challenges."""
    assert parse_challenges("") == []


def test_scheme_without_parameters() -> None:
    """A scheme alone is a challenge with no parameters."""
    assert parse_challenges("Basic") == [Challenge("basic", {})]


def test_parameterless_challenge_before_bearer() -> None:
    """
    A challenge without parameters followed by a comma and another challenge
    (RFC 9110 ``#challenge``) does not hide the Bearer challenge after it.
    """
    challenges = parse_challenges('Negotiate, Bearer realm="https://a.example/t"')
    assert Challenge("bearer", {"realm": "https://a.example/t"}) in challenges


_NAME = st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True)
_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E))


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(st.dictionaries(_NAME, _VALUE, min_size=1, max_size=5), st.booleans())
def test_quoted_parameters_round_trip(params: dict[str, str], spaced: bool) -> None:
    """
    Any printable ASCII values, quoted and escaped, come back exactly, under
    their names.
    """
    separator = ", " if spaced else ","
    header = "Bearer " + separator.join(f"{k}={_quote(v)}" for k, v in params.items())
    assert parse_challenges(header) == [Challenge("bearer", params)]


@given(st.text())
def test_any_text_parses_without_error(header: str) -> None:
    """Arbitrary header text never raises: it gives a (possibly empty) list."""
    challenges = parse_challenges(header)
    assert all(isinstance(c, Challenge) for c in challenges)
