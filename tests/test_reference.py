"""
Tests for :mod:`regmirror.reference`: the grammar every client-supplied
name, tag and digest must pass before it reaches the disk or the network.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regmirror.errors import (
    DigestInvalid,
    NameInvalid,
    NotFound,
    RegistryError,
    TagInvalid,
)
from regmirror.reference import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MAX_NAME_LENGTH,
    OCI_INDEX,
    OCI_MANIFEST,
    ApiPath,
    Digest,
    accepted_types,
    manifest_media_type,
    parse_api_path,
    parse_digest,
    parse_reference,
    referrers_tag,
    validate_name,
    validate_tag,
)

SHA256_HEX = "a" * 64
SHA512_HEX = "0123456789abcdef" * 8
SHA256 = f"sha256:{SHA256_HEX}"

#: The spec's repository name grammar, written out independently of the module.
NAME_GRAMMAR = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*"


# -- parse_digest -------------------------------------------------------------


def test_parse_digest_sha256() -> None:
    """A ``sha256:`` digest with 64 lower-case hex digits is accepted."""
    digest = parse_digest(SHA256)
    assert digest == Digest("sha256", SHA256_HEX)
    assert str(digest) == SHA256


def test_parse_digest_sha512() -> None:
    """A ``sha512:`` digest with 128 lower-case hex digits is accepted."""
    digest = parse_digest(f"sha512:{SHA512_HEX}")
    assert digest == Digest("sha512", SHA512_HEX)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f"md5:{'a' * 32}", id="unknown-algorithm"),
        pytest.param(f"sha1:{'a' * 40}", id="sha1"),
        pytest.param(f"sha384:{'a' * 96}", id="sha384"),
        pytest.param(f"sha256:{'a' * 63}", id="too-short"),
        pytest.param(f"sha256:{'a' * 65}", id="too-long"),
        pytest.param(f"sha256:{'a' * 128}", id="sha512-length-for-sha256"),
        pytest.param(f"sha512:{'a' * 64}", id="sha256-length-for-sha512"),
        pytest.param(f"sha256:{'A' * 64}", id="uppercase-hex"),
        pytest.param(f"SHA256:{'a' * 64}", id="uppercase-algorithm"),
        pytest.param(f"sha256:{'g' * 64}", id="not-hex"),
        pytest.param(f"sha256:{'a' * 64}\n", id="trailing-newline"),
        pytest.param(f" sha256:{'a' * 64}", id="leading-space"),
        pytest.param("sha256:", id="empty-hex"),
        pytest.param(":" + "a" * 64, id="empty-algorithm"),
        pytest.param("a" * 64, id="no-algorithm"),
        pytest.param("", id="empty"),
        pytest.param("latest", id="tag"),
        pytest.param("sha256:../../etc/passwd", id="traversal"),
        pytest.param(f"sha256:{'a' * 62}%2f", id="percent"),
    ],
)
def test_parse_digest_rejects(text: str) -> None:
    """Unknown algorithms, wrong lengths, upper case and garbage: DigestInvalid."""
    with pytest.raises(DigestInvalid):
        parse_digest(text)


def test_digest_of_matches_parse() -> None:
    """``Digest.of`` computes the same value a client would send for the bytes."""
    digest = Digest.of(b"")
    expected = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert digest == parse_digest(f"sha256:{expected}")


_VALID_DIGESTS = st.one_of(
    st.from_regex(r"sha256:[a-f0-9]{64}", fullmatch=True),
    st.from_regex(r"sha512:[a-f0-9]{128}", fullmatch=True),
)
_DIGEST_LIKE = st.from_regex(
    r"(sha256|sha512|md5|[a-z0-9]+)[:]?[a-fA-Z0-9=_-]{0,130}", fullmatch=True
)


@given(st.one_of(st.text(), _DIGEST_LIKE, _VALID_DIGESTS))
def test_parse_digest_accepted_round_trips(text: str) -> None:
    """
    Whatever ``parse_digest`` accepts prints back as the same text and has a
    lower-case hex of exactly its algorithm's length.
    """
    try:
        digest = parse_digest(text)
    except DigestInvalid:
        return
    assert str(digest) == text
    assert len(digest.hex) == {"sha256": 64, "sha512": 128}[digest.algorithm]
    assert set(digest.hex) <= set("0123456789abcdef")


@given(_VALID_DIGESTS)
def test_parse_digest_accepts_every_well_formed_digest(text: str) -> None:
    """Every well-formed sha256/sha512 digest is accepted."""
    assert str(parse_digest(text)) == text


# -- validate_name ------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "busybox",
        "library/busybox",
        "ghcr.io/org/app",
        "a/b/c/d/e",
        "my-app",
        "my--app",
        "my_app",
        "my__app",
        "a.b",
        "0",
        "a" * MAX_NAME_LENGTH,
    ],
)
def test_validate_name_accepts(name: str) -> None:
    """Names following the spec's grammar, up to 255 characters, are accepted."""
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("..", id="dotdot"),
        pytest.param("a/../b", id="dotdot-component"),
        pytest.param("a/./b", id="dot-component"),
        pytest.param("/a", id="leading-slash"),
        pytest.param("a/", id="trailing-slash"),
        pytest.param("a//b", id="empty-component"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("a%2fb", id="percent"),
        pytest.param("a%2e%2e", id="percent-dots"),
        pytest.param("Busybox", id="uppercase"),
        pytest.param("a..b", id="double-dot-separator"),
        pytest.param("a___b", id="triple-underscore"),
        pytest.param("-a", id="leading-dash"),
        pytest.param("a-", id="trailing-dash"),
        pytest.param(".a", id="leading-dot"),
        pytest.param("a:5000/b", id="port"),
        pytest.param("a b", id="space"),
        pytest.param("a\n", id="trailing-newline"),
        pytest.param("a\\b", id="backslash"),
        pytest.param("ü", id="non-ascii"),
        pytest.param("a" * (MAX_NAME_LENGTH + 1), id="too-long"),
    ],
)
def test_validate_name_rejects(name: str) -> None:
    """Anything off the grammar, or longer than 255 characters, is NameInvalid."""
    with pytest.raises(NameInvalid):
        validate_name(name)


def _assert_safe_relative_path(name: str) -> None:
    assert len(name) <= MAX_NAME_LENGTH
    assert not name.startswith("/")
    assert not os.path.isabs(name)
    assert "\x00" not in name
    assert "%" not in name
    assert "\\" not in name
    components = name.split("/")
    assert "" not in components
    assert ".." not in components
    assert "." not in components
    assert os.path.normpath(name) == name


_NAME_LIKE = st.text(alphabet="ab0./_-%\x00A\\:", max_size=40)


@given(st.one_of(st.text(), _NAME_LIKE, st.from_regex(NAME_GRAMMAR, fullmatch=True)))
def test_accepted_names_are_safe_paths(name: str) -> None:
    """
    Any name ``validate_name`` accepts is safe as a relative filesystem path:
    not absolute, no empty, ``.`` or ``..`` component, no NUL, no ``%``,
    at most 255 characters.
    """
    try:
        validate_name(name)
    except NameInvalid:
        return
    _assert_safe_relative_path(name)


@given(st.from_regex(NAME_GRAMMAR, fullmatch=True).filter(lambda n: len(n) <= 255))
def test_grammar_names_are_accepted(name: str) -> None:
    """Every name the spec's grammar generates, up to 255 characters, is accepted."""
    assert validate_name(name) == name


# -- validate_tag / parse_reference --------------------------------------------


@pytest.mark.parametrize(
    "tag", ["latest", "v1.2.3", "1.0-rc_1", "_hidden", "A", "a" * 128, "x." + "-" * 126]
)
def test_validate_tag_accepts(tag: str) -> None:
    """Tags of ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`` are accepted."""
    assert validate_tag(tag) == tag


@pytest.mark.parametrize(
    "tag",
    [
        pytest.param("", id="empty"),
        pytest.param("a" * 129, id="too-long"),
        pytest.param(".hidden", id="leading-dot"),
        pytest.param("-x", id="leading-dash"),
        pytest.param("a/b", id="slash"),
        pytest.param("a:b", id="colon"),
        pytest.param("..", id="dotdot"),
        pytest.param("a%2e", id="percent"),
        pytest.param("a\x00", id="nul"),
        pytest.param("latest\n", id="trailing-newline"),
        pytest.param("tag with space", id="space"),
        pytest.param("é", id="non-ascii"),
    ],
)
def test_validate_tag_rejects(tag: str) -> None:
    """Anything else is TagInvalid."""
    with pytest.raises(TagInvalid):
        validate_tag(tag)


def test_parse_reference_tag() -> None:
    """A reference without a colon is a tag, returned as text."""
    assert parse_reference("latest") == "latest"


def test_parse_reference_digest() -> None:
    """A reference with a colon is a digest."""
    assert parse_reference(SHA256) == Digest("sha256", SHA256_HEX)


def test_parse_reference_bad_digest() -> None:
    """A reference with a colon that is no valid digest is DigestInvalid."""
    with pytest.raises(DigestInvalid):
        parse_reference("latest:foo")


def test_parse_reference_bad_tag() -> None:
    """A reference without a colon that breaks the tag grammar is TagInvalid."""
    with pytest.raises(TagInvalid):
        parse_reference("../etc")


# -- parse_api_path -----------------------------------------------------------


@pytest.mark.parametrize("raw", [b"/v2/", b"/v2"])
def test_parse_api_path_base(raw: bytes) -> None:
    """``/v2/`` and ``/v2`` are the API version check."""
    assert parse_api_path(raw) == ApiPath("base")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/v2/a/b/manifests/x", ApiPath("manifests", "a/b", "x")),
        (b"/v2/busybox/manifests/latest", ApiPath("manifests", "busybox", "latest")),
        (
            b"/v2/ghcr.io/org/app/manifests/" + SHA256.encode(),
            ApiPath("manifests", "ghcr.io/org/app", SHA256),
        ),
        (b"/v2/a/blobs/" + SHA256.encode(), ApiPath("blobs", "a", SHA256)),
        (b"/v2/a/tags/list", ApiPath("tags", "a")),
        (b"/v2/a/b/tags/list", ApiPath("tags", "a/b")),
        (b"/v2/a/referrers/" + SHA256.encode(), ApiPath("referrers", "a", SHA256)),
    ],
)
def test_parse_api_path_endpoints(raw: bytes, expected: ApiPath) -> None:
    """Each endpoint is recognised by its last components; the rest is the name."""
    assert parse_api_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/v2/blobs/manifests/x", ApiPath("manifests", "blobs", "x")),
        (b"/v2/manifests/manifests/x", ApiPath("manifests", "manifests", "x")),
        (
            b"/v2/a/blobs/b/blobs/" + SHA256.encode(),
            ApiPath("blobs", "a/blobs/b", SHA256),
        ),
        (b"/v2/a/manifests/b/manifests/x", ApiPath("manifests", "a/manifests/b", "x")),
        (b"/v2/tags/list/tags/list", ApiPath("tags", "tags/list")),
        (b"/v2/referrers/tags/list", ApiPath("tags", "referrers")),
    ],
)
def test_parse_api_path_names_with_endpoint_words(
    raw: bytes, expected: ApiPath
) -> None:
    """
    Names may contain components called ``blobs``, ``manifests``, ``tags``:
    only the last components choose the endpoint.
    """
    assert parse_api_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"/v2/%2e%2e/manifests/x", id="encoded-dotdot"),
        pytest.param(b"/v2/a/%2E%2E/b/manifests/x", id="encoded-dotdot-upper"),
        pytest.param(b"/v2/a%2fb/manifests/x", id="encoded-slash"),
        pytest.param(b"/v2/a%2Fb/blobs/" + SHA256.encode(), id="encoded-slash-upper"),
        pytest.param(b"/v2/a/manifests/%2e%2e", id="encoded-reference"),
        pytest.param(b"/v2/a\x00b/manifests/x", id="nul"),
        pytest.param("/v2/ü/manifests/x".encode(), id="non-ascii-utf8"),
        pytest.param(b"/v2/\xff/manifests/x", id="non-ascii-byte"),
    ],
)
def test_parse_api_path_rejects_smuggling(raw: bytes) -> None:
    """Percent-encoding, NUL and non-ASCII bytes in the raw path are NameInvalid."""
    with pytest.raises(NameInvalid):
        parse_api_path(raw)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"/other", id="other"),
        pytest.param(b"/", id="root"),
        pytest.param(b"", id="empty"),
        pytest.param(b"/v2/a", id="name-only"),
        pytest.param(b"/v2/a/b", id="two-components"),
        pytest.param(b"/v2/a/manifests", id="no-reference"),
        pytest.param(b"/v2/a/tags", id="tags-without-list"),
        pytest.param(b"/v2/a/catalog/x", id="unknown-endpoint"),
        pytest.param(b"/v2/manifests/x", id="manifests-without-name"),
        pytest.param(b"/v2/tags/list", id="tags-without-name"),
        pytest.param(b"/v1/a/manifests/x", id="v1"),
    ],
)
def test_parse_api_path_not_found(raw: bytes) -> None:
    """Paths that are no API endpoint are NotFound."""
    with pytest.raises(NotFound):
        parse_api_path(raw)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"/v2x/a/manifests/latest", id="v2x"),
        pytest.param(b"/v20/a/manifests/latest", id="v20"),
        pytest.param(b"/v2xlibrary/busybox/manifests/latest", id="v2x-glued"),
    ],
)
def test_parse_api_path_requires_v2_component(raw: bytes) -> None:
    """
    ``/v2`` must be a whole path component: ``/v2x/...`` or ``/v20/...`` is
    NotFound, not an API path whose first character after ``/v2`` is dropped.
    """
    with pytest.raises(NotFound):
        parse_api_path(raw)


@given(st.binary())
def test_parse_api_path_total(tail: bytes) -> None:
    """
    For any bytes under ``/v2/``, ``parse_api_path`` either returns or raises
    one of the package's RegistryError subclasses, and a returned name holds
    no ``%``.
    """
    try:
        api = parse_api_path(b"/v2/" + tail)
    except RegistryError:
        return
    assert "%" not in api.name
    assert "%" not in api.reference
    assert "\x00" not in api.name


# -- accepted_types -----------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "*/*", "application/*"])
def test_accepted_types_anything(header: str | None) -> None:
    """No header, ``*/*`` or ``application/*`` means any type (None)."""
    assert accepted_types(header) is None


def test_accepted_types_wildcard_among_others() -> None:
    """A ``*/*`` anywhere in the list means any type."""
    assert accepted_types(f"{OCI_MANIFEST}, */*;q=0.1") is None


def test_accepted_types_list() -> None:
    """Listed types are returned lower-cased with parameters and blanks dropped."""
    header = (
        f"{OCI_INDEX};q=0.9, {DOCKER_MANIFEST.upper()} ,, "
        f"{OCI_MANIFEST}; charset=utf-8,"
    )
    assert accepted_types(header) == frozenset(
        {OCI_INDEX, DOCKER_MANIFEST, OCI_MANIFEST}
    )


@pytest.mark.parametrize("header", [", ", " ,, ", ";q=1"])
def test_accepted_types_naming_nothing_means_anything(header: str) -> None:
    """Blank lines joined with ", " name no type: anything is accepted, as
    without the header, not nothing."""
    assert accepted_types(header) is None


def test_accepted_types_only_refused_types_accept_nothing_else() -> None:
    """Every named type refused with ``q=0``: an empty set, not anything."""
    assert accepted_types(f"{OCI_INDEX};q=0") == frozenset()


def test_referrers_tag_truncates_and_joins_with_a_hyphen() -> None:
    """The referrers tag schema: algorithm, ``-``, encoded part cut to 64
    characters; always a valid tag."""
    assert referrers_tag(parse_digest(SHA256)) == f"sha256-{SHA256_HEX}"
    long = referrers_tag(parse_digest(f"sha512:{SHA512_HEX}"))
    assert long == f"sha512-{SHA512_HEX[:64]}"
    assert validate_tag(long) == long


# -- manifest_media_type -------------------------------------------------------


def test_manifest_media_type_header_and_document_must_agree() -> None:
    """A Content-Type naming another manifest type than the document's own
    ``mediaType`` makes the answer no manifest at all (parameters and case
    of the header ignored when they agree)."""
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
    lying = f"{DOCKER_MANIFEST.upper()}; charset=utf-8"
    assert manifest_media_type(body.encode(), lying) is None
    honest = f"{OCI_INDEX.upper()}; charset=utf-8"
    assert manifest_media_type(body.encode(), honest) == OCI_INDEX


@pytest.mark.parametrize("content_type", [None, "", "application/json"])
def test_manifest_media_type_from_document(content_type: str | None) -> None:
    """Without a manifest Content-Type, the document's ``mediaType`` decides,
    when its shape (``manifests`` for a list) agrees."""
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": []}
    )
    assert manifest_media_type(body.encode(), content_type) == DOCKER_MANIFEST_LIST
    shapeless = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST})
    assert manifest_media_type(shapeless.encode(), content_type) is None


def test_manifest_media_type_oci_index_by_shape() -> None:
    """An OCI document without ``mediaType`` but with ``manifests`` is an index."""
    body = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert manifest_media_type(body, "application/json") == OCI_INDEX


def test_manifest_media_type_oci_manifest_by_shape() -> None:
    """An OCI document without ``mediaType`` but with ``layers`` is a manifest."""
    body = json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode()
    assert manifest_media_type(body, None) == OCI_MANIFEST


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
        pytest.param(b"[]", id="list"),
        pytest.param(b'"text"', id="string"),
        pytest.param(b"{}", id="empty-object"),
        pytest.param(b'{"mediaType": "text/html"}', id="other-media-type"),
        pytest.param(b'{"schemaVersion": 1, "layers": []}', id="schema-1"),
        pytest.param(
            b'{"schemaVersion": 2, "mediaType": "x", "layers": []}',
            id="unknown-media-type-with-layers",
        ),
    ],
)
def test_manifest_media_type_none(body: bytes) -> None:
    """A body that names no manifest type, under no manifest Content-Type: None."""
    assert manifest_media_type(body, "application/octet-stream") is None


def test_manifest_media_type_deeply_nested_body() -> None:
    """
    A deeply nested JSON body (well under the 4 MiB manifest limit) is no
    manifest: None, not a RecursionError escaping the parser.
    """
    body = b"[" * 100_000 + b"]" * 100_000
    assert manifest_media_type(body, None) is None


def test_accept_with_q_zero_excludes_the_type() -> None:
    """A type sent with ``q=0`` is one the client refuses, not accepts."""
    header = f"{OCI_INDEX};q=0, {OCI_MANIFEST}"
    assert accepted_types(header) == frozenset({OCI_MANIFEST})
