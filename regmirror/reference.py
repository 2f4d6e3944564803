"""
Repository names, tags, digests and media types: parsing and validation.

Everything a client sends is checked here against the grammar of the OCI
distribution spec before it can reach the disk or the network.  A value
that passes is safe to use as a path component: the grammars admit no
``/``-free ``..``, no NUL, no ``%`` and no leading ``/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any, Literal

from attrs import frozen

from regmirror.errors import DigestInvalid, NameInvalid, NotFound, TagInvalid

#: The longest repository name accepted (distribution's limit).
MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_COMPONENT_RE = re.compile(_COMPONENT)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")

#: Digest algorithms we can verify, with the length of their hex encoding.
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

#: Manifest media types the mirror asks upstreams for and serves.
MANIFEST_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
#: Manifest media types that list other manifests.
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

#: Manifests bigger than this are refused (the spec suggests 4 MiB).
MAX_MANIFEST_SIZE = 4 * 1024 * 1024


@frozen
class Digest:
    """A validated content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object for this digest's algorithm."""
        return hashlib.new(self.algorithm)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of *data*."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def parse_digest(text: str) -> Digest:
    """
    Parse and validate a digest.

    :raises DigestInvalid: for a malformed digest or an algorithm the mirror
        cannot verify.
    """
    match = _DIGEST.fullmatch(text)
    if match is None:
        raise DigestInvalid(f"invalid digest {text[:80]!r}")
    algorithm, encoded = match.groups()
    length = ALGORITHMS.get(algorithm)
    if length is None:
        raise DigestInvalid(f"unsupported digest algorithm {algorithm[:20]!r}")
    if len(encoded) != length or re.fullmatch(r"[a-f0-9]+", encoded) is None:
        raise DigestInvalid(f"invalid {algorithm} digest {text[:80]!r}")
    return Digest(algorithm, encoded)


def referrers_tag(digest: Digest) -> str:
    """
    The tag under which the referrers tag schema of the distribution spec
    keeps the index of *digest*'s referrers: the algorithm cut to 32
    characters, ``-``, the encoded part cut to 64 (``sha256-<hex>``).
    """
    return f"{digest.algorithm[:32]}-{digest.hex[:64]}"


def validate_name(name: str) -> str:
    """
    Check a repository name against the spec's grammar.

    :raises NameInvalid: when it does not match or is too long.
    """
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(f"repository name longer than {MAX_NAME_LENGTH} characters")
    if _NAME.fullmatch(name) is None:
        raise NameInvalid(f"invalid repository name {name[:80]!r}")
    return name


def is_name_component(text: str) -> bool:
    """Whether *text* is one valid path component of a repository name."""
    return _COMPONENT_RE.fullmatch(text) is not None


def validate_tag(tag: str) -> str:
    """
    Check a tag against the spec's grammar.

    :raises TagInvalid: when it does not match.
    """
    if _TAG.fullmatch(tag) is None:
        raise TagInvalid(f"invalid tag {tag[:80]!r}")
    return tag


def split_tagged(text: str) -> tuple[str, str] | None:
    """
    ``repository:tag`` as ``(repository, tag)``, both checked against the
    spec's grammar; ``None`` when no tag follows the last ``:``.

    :raises NameInvalid: for a repository name that breaks the grammar.
    :raises TagInvalid: for a tag that does.
    """
    name, colon, tag = text.rpartition(":")
    if not colon or "/" in tag:
        return None
    return validate_name(name), validate_tag(tag)


def is_immutable(patterns: Iterable[str], tag: str) -> bool:
    """Does *tag* match one of *patterns*, shell-style globs
    (``immutable_tags``), as :func:`fnmatch.fnmatchcase` matches (tags are
    case-sensitive; ``*`` and ``?`` match any characters, ``[0-9]`` one
    of a set)?"""
    return any(fnmatchcase(tag, pattern) for pattern in patterns)


def parse_reference(text: str) -> str | Digest:
    """A manifest reference: a :class:`Digest` when it has a colon, else a tag."""
    if ":" in text:
        return parse_digest(text)
    return validate_tag(text)


Endpoint = Literal["base", "manifests", "blobs", "tags", "referrers"]


@frozen
class ApiPath:
    """
    A parsed ``/v2/...`` request path.

    :ivar endpoint: which API endpoint.
    :ivar name: the repository name as the client wrote it (namespace prefix
        included); not yet validated, since routing may strip a prefix.
    :ivar reference: the tag or digest text (manifests, blobs, referrers).
    """

    endpoint: Endpoint
    name: str = ""
    reference: str = ""


def parse_api_path(raw: bytes) -> ApiPath:
    """
    Split a raw (still percent-encoded) request path under ``/v2/``.

    The raw path is used, never a decoded one, so that ``%2e%2e`` or ``%2f``
    cannot smuggle a ``..`` or a ``/`` past the grammar: ``%`` appears in no
    valid name, tag or digest.

    :raises NameInvalid: for bytes outside ASCII or a ``%`` in the path.
    :raises NotFound: for a path that is no API endpoint.
    """
    try:
        path = raw.decode("ascii")
    except UnicodeDecodeError:
        raise NameInvalid("request path is not ASCII") from None
    if not path.startswith("/v2"):
        raise NotFound("not a registry API path")
    rest = path[len("/v2") :]
    if rest in ("", "/"):
        return ApiPath("base")
    if not rest.startswith("/"):
        raise NotFound("not a registry API path")
    if "%" in rest or "\x00" in rest:
        raise NameInvalid("percent-encoded characters are not allowed in names")
    parts = rest[1:].split("/")
    if len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
        return ApiPath("tags", "/".join(parts[:-2]))
    if len(parts) >= 3 and parts[-2] in ("manifests", "blobs", "referrers"):
        endpoint: Endpoint = parts[-2]  # type: ignore[assignment]
        return ApiPath(endpoint, "/".join(parts[:-2]), parts[-1])
    raise NotFound("not a registry API endpoint")


def accepted_types(accept_header: str | None) -> frozenset[str] | None:
    """
    The media types named in an ``Accept`` header (all its lines, joined
    with ", ").

    :return: ``None`` when the client accepts anything (no header, one that
        names no type, or ``*/*``), else the set of types it listed
        (parameters dropped; those refused with ``q=0`` left out).
    """
    if not accept_header:
        return None
    types = set()
    named = False
    for item in accept_header.split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        if not media:
            continue  # an empty element, e.g. from a blank header line
        named = True
        if any(re.fullmatch(r"q=0(?:\.0{0,3})?", p) for p in params):
            continue  # q=0: explicitly not acceptable
        if media in ("*/*", "application/*"):
            return None
        types.add(media)
    return frozenset(types) if named else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:20]} is too large a number")
    return number


def load_json(body: bytes) -> Any:
    """
    Parse JSON from an untrusted source.

    :return: ``None`` for anything that is not JSON, including documents
        nested too deeply for the parser and those with ``NaN``,
        ``Infinity`` or a number too large to be finite (Python's parser
        takes them, but they cannot be written out as JSON again).
    """
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        return None


def descriptors(body: bytes, *lists: str) -> list[dict[str, Any]]:
    """
    A manifest's descriptors: its ``config``, then the entries of the named
    *lists* (``layers``, ``manifests``, ``blobs``), those that are objects;
    nothing for a body that is no JSON object.
    """
    document = load_json(body)
    if not isinstance(document, dict):
        return []
    found = [document.get("config")]
    for key in lists:
        listed = document.get(key)
        if isinstance(listed, list):
            found += listed
    return [d for d in found if isinstance(d, dict)]


def manifest_media_type(body: bytes, content_type: str | None) -> str | None:
    """
    The media type of a manifest: the upstream's ``Content-Type`` when it is
    a manifest type, else the document's own ``mediaType``.

    :return: ``None`` when neither names a manifest type.
    """
    declared = content_type.split(";", 1)[0].strip().lower() if content_type else ""
    document = load_json(body)
    if not isinstance(document, dict) or document.get("schemaVersion") != 2:
        return None
    media = document.get("mediaType")
    is_index = isinstance(document.get("manifests"), list)
    is_image = isinstance(document.get("layers"), list)
    if is_index == is_image:
        return None  # neither, or both: no honest manifest looks like that
    shape = INDEX_TYPES if is_index else frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
    if media is not None:
        # The document's own word, which its digest covers; a header that
        # says otherwise, or a shape that does, makes it no manifest at all.
        if media not in shape or (declared in MANIFEST_TYPES and declared != media):
            return None
        return str(media)
    if declared in shape:
        return declared
    if declared in MANIFEST_TYPES:
        return None
    # OCI documents may omit mediaType: the shape decides.
    return OCI_INDEX if is_index else OCI_MANIFEST


_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_timestamp(text: str) -> float:
    """
    An RFC 3339 time as written in image configs (Go writes nanoseconds and
    ``Z``), in seconds since 1970.

    :raises ValueError: for anything else.
    """
    moment = datetime.fromisoformat(_FRACTION.sub(r"\1", text.strip()))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
