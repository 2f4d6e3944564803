"""
The pull requests of the OCI distribution-spec conformance suite
(``conformance/`` of opencontainers/distribution-spec: ``TestHead``,
``TestPull``, ``TestList``, ``TestReferrers``, ``TestEmpty`` and
``TestManifestErrors`` with push disabled), sent by hand to a mirror in
front of a ``docker-registry`` (distribution 2.8) that holds what the
suite would have pushed: an image, a multi-platform index, an index of
indexes, an artifact (``artifactType``, empty config), and artifacts and an
image whose ``subject`` is the image, listed under its referrers tag as a
client without the referrers API leaves them.

The suite asks for manifests with two ``Accept`` lines (OCI index, then OCI
image manifest), checks status, ``Content-Type``, ``Content-Length``,
``Docker-Content-Digest`` and bytes, pages the tag list with ``last``
alone, and wants the referrers API of a registry that supports it: 200, an
OCI index, ``OCI-Filters-Applied`` when filtered, and an empty index for
a subject without referrers.  Each check here collects every request that
was answered wrongly, so a failure names them all.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest

from .harness import (
    LOCALHOST,
    REGISTRY_BINARY,
    MirrorProcess,
    RegistryProcess,
    Response,
    mirror_config,
)
from .images import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Blob,
    Image,
    canonical_json,
    gzip_layer,
    multi_arch_image,
    sha256_digest,
    single_arch_image,
)

pytestmark = pytest.mark.e2e

REPOSITORY = "conformance/repo1"
CONF1 = "application/vnd.example.oci.conformance.v1"
CONF2 = "application/vnd.example.oci.conformance.v2"
EMPTY_JSON = "application/vnd.oci.empty.v1+json"
ANNOTATION = "org.opencontainers.conformance"
#: the two ``Accept`` lines of every manifest request of the suite, in its
#: order (``apiWithHeaderAdd`` twice: two header lines), and reversed
SUITE_ACCEPT = (OCI_INDEX, OCI_MANIFEST)
ACCEPT_ORDERS = {"suite": SUITE_ACCEPT, "reversed": SUITE_ACCEPT[::-1]}


# -- the content ----------------------------------------------------------------


@dataclass
class Content:
    """What the upstream holds in :data:`REPOSITORY`, and what to expect."""

    #: digest → blob (configs and layers)
    blobs: dict[str, Blob] = field(default_factory=dict)
    #: digest → manifest or index, in an order that pushes children first
    manifests: dict[str, Blob] = field(default_factory=dict)
    #: tag → digest
    tags: dict[str, str] = field(default_factory=dict)
    #: subject digest → the descriptors the referrers API must list
    referrers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add_image(self, image: Image, tag: str | None = None) -> str:
        for blob in image.blobs:
            self.blobs[blob.digest] = blob
        for manifest in (*image.manifests, image.root):
            self.manifests[manifest.digest] = manifest
        if tag is not None:
            self.tags[tag] = image.root.digest
        return image.root.digest

    def add_manifest(self, manifest: Blob, tag: str | None = None) -> str:
        self.manifests[manifest.digest] = manifest
        if tag is not None:
            self.tags[tag] = manifest.digest
        return manifest.digest


def _index(entries: Sequence[dict[str, Any]], **extra: Any) -> Blob:
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    return Blob(OCI_INDEX, canonical_json({**document, **extra}))


def _artifact(
    content: Content,
    artifact_type: str | None,
    layer: Blob,
    *,
    config: Blob | None = None,
    subject: Blob | None = None,
    annotations: dict[str, str] | None = None,
) -> Blob:
    """An image manifest used as an artifact, its blobs added to *content*."""
    config = config or Blob(EMPTY_JSON, b"{}")
    for blob in (config, layer):
        content.blobs[blob.digest] = blob
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
    }
    if artifact_type is not None:
        document["artifactType"] = artifact_type
    if subject is not None:
        document["subject"] = subject.descriptor()
    if annotations:
        document["annotations"] = annotations
    return Blob(OCI_MANIFEST, canonical_json(document))


def build_content() -> Content:
    """Deterministic stand-ins for the suite's data (its generator is random)."""
    content = Content()
    image = single_arch_image(
        REPOSITORY, "image", [gzip_layer({"image.txt": b"conformance image\n"})]
    )
    content.add_image(image, "image")
    index = multi_arch_image(
        REPOSITORY,
        "index",
        {
            "amd64": [gzip_layer({"arch.txt": b"index amd64\n"})],
            "arm64": [gzip_layer({"arch.txt": b"index arm64\n"})],
        },
    )
    content.add_image(index, "index")
    inner = [
        multi_arch_image(
            REPOSITORY,
            f"inner-{n}",
            {
                arch: [gzip_layer({"nested.txt": f"inner {n} {arch}\n".encode()})]
                for arch in ("amd64", "arm64")
            },
        )
        for n in (1, 2)
    ]
    for each in inner:
        content.add_image(each)  # by digest only, as the suite pushes them
    content.add_manifest(
        _index([each.root.descriptor() for each in inner]), "index-of-index"
    )
    artifact = _artifact(content, CONF1, Blob(CONF1, b'{"conformance":"artifact"}'))
    content.add_manifest(artifact, "artifact")

    # artifacts-with-subject: an image with a subject and two artifacts
    subject = image.root
    referrers = [
        _artifact(
            content,
            None,
            gzip_layer({"ref.txt": b"an image with a subject\n"}),
            config=Blob(OCI_CONFIG, canonical_json({"architecture": "amd64"})),
            subject=subject,
        ),
        _artifact(
            content,
            CONF1,
            Blob(CONF1, b'{"referrer":1}'),
            subject=subject,
            annotations={ANNOTATION: "hello conformance test", "uniq": "1"},
        ),
        _artifact(
            content,
            CONF2,
            Blob("application/octet-stream", b"referrer 2\n"),
            subject=subject,
            annotations={ANNOTATION: "hello conformance test", "uniq": "2"},
        ),
    ]
    expected = []
    for number, referrer in enumerate(referrers):
        document = json.loads(referrer.data)
        entry = referrer.descriptor(
            artifactType=document.get("artifactType", document["config"]["mediaType"])
        )
        if "annotations" in document:
            entry["annotations"] = document["annotations"]
        expected.append(entry)
        content.add_manifest(referrer, f"tagged-artifact{number}" if number else None)
    content.referrers[subject.digest] = expected
    # what a client without the referrers API leaves behind
    referrers_tag = subject.digest.replace(":", "-")
    content.add_manifest(_index(expected), referrers_tag)
    return content


# -- pushing it (the suite's own push requests, which the mirror has not) --------


def _send(
    port: int,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
) -> Response:
    """
    One request to 127.0.0.1:*port*, each of *headers* on a line of its own
    (``http.client``'s dict of headers cannot repeat a name).
    """
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=10.0)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return Response(response.status, response.headers, response.read())
    finally:
        connection.close()


def _push(registry: RegistryProcess, content: Content) -> None:
    base = f"/v2/{REPOSITORY}"
    for digest, blob in content.blobs.items():
        started = _send(registry.port, "POST", f"{base}/blobs/uploads/")
        assert started.status == 202, started
        location = urlsplit(started.header("Location") or "")
        separator = "&" if location.query else "?"
        target = f"{location.path}?{location.query}{separator}digest={quote(digest)}"
        if not location.query:
            target = f"{location.path}?digest={quote(digest)}"
        done = _send(
            registry.port,
            "PUT",
            target,
            [("Content-Type", "application/octet-stream")],
            blob.data,
        )
        assert done.status == 201, (digest, done.status, done.body)
    tagged = {digest: tag for tag, digest in content.tags.items()}
    for digest, manifest in content.manifests.items():
        reference = tagged.get(digest, digest)
        put = _send(
            registry.port,
            "PUT",
            f"{base}/manifests/{reference}",
            [("Content-Type", manifest.media_type)],
            manifest.data,
        )
        assert put.status == 201, (reference, put.status, put.body)
        assert put.header("Docker-Content-Digest") == digest


@pytest.fixture(scope="module")
def content() -> Content:
    return build_content()


@pytest.fixture(scope="module")
def conformance_storage(
    tmp_path_factory: pytest.TempPathFactory, content: Content
) -> Path:
    """A registry storage folder holding :func:`build_content`."""
    if not os.access(REGISTRY_BINARY, os.X_OK):
        pytest.fail(f"{REGISTRY_BINARY} is not installed: run scripts/dev test")
    root = tmp_path_factory.mktemp("conformance")
    registry = RegistryProcess(root / "storage", root / "registry")
    registry.start()
    try:
        _push(registry, content)
    finally:
        registry.stop()
    return root / "storage"


@dataclass(frozen=True)
class Served:
    upstream: RegistryProcess
    mirror: MirrorProcess

    def send(self, method: str, path: str, *headers: tuple[str, str]) -> Response:
        return _send(self.mirror.port, method, f"/v2/{REPOSITORY}/{path}", headers)


@pytest.fixture
def served(
    conformance_storage: Path,
    start_registry: Callable[..., RegistryProcess],
    start_mirror: Callable[..., MirrorProcess],
) -> Iterator[Served]:
    upstream = start_registry(storage=conformance_storage)
    mirror = start_mirror(lambda port: mirror_config(port, upstream.url))
    yield Served(upstream, mirror)


def _assert_none(problems: list[str]) -> None:
    assert not problems, f"{len(problems)} wrong answers:\n" + "\n".join(problems)


def _accept(order: Sequence[str]) -> list[tuple[str, str]]:
    return [("Accept", media_type) for media_type in order]


# -- the checks -------------------------------------------------------------------


def test_ping(served: Served) -> None:
    """``TestPing``: ``GET /v2/`` is 200."""
    assert _send(served.mirror.port, "GET", "/v2/").status == 200


def _check_manifest(
    served: Served, method: str, reference: str, manifest: Blob, order: str
) -> str | None:
    response = served.send(
        method, f"manifests/{reference}", *_accept(ACCEPT_ORDERS[order])
    )
    got = (
        response.status,
        response.header("Content-Type"),
        response.header("Content-Length"),
        response.header("Docker-Content-Digest"),
        response.body == (b"" if method == "HEAD" else manifest.data),
    )
    wanted = (200, manifest.media_type, str(manifest.size), manifest.digest, True)
    if got == wanted:
        return None
    return f"{method} manifests/{reference} (Accept {order}): {got}, not {wanted}"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("order", ["suite", "reversed"])
def test_manifests_by_tag(
    served: Served, content: Content, method: str, order: str
) -> None:
    """``TestPull``/``TestHead`` by tag: every tag, index tags included,
    answers with the manifest it points at (type, length, digest, bytes),
    with the suite's two ``Accept`` lines in either order."""
    problems = [
        problem
        for tag, digest in sorted(content.tags.items())
        if (
            problem := _check_manifest(
                served, method, tag, content.manifests[digest], order
            )
        )
    ]
    _assert_none(problems)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("order", ["suite", "reversed"])
def test_manifests_by_digest(
    served: Served, content: Content, method: str, order: str
) -> None:
    """``TestPull``/``TestHead`` by digest: every manifest and index, the
    platform images and the inner indexes of the nested index included."""
    problems = [
        problem
        for digest, manifest in content.manifests.items()
        if (problem := _check_manifest(served, method, digest, manifest, order))
    ]
    _assert_none(problems)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_blobs(served: Served, content: Content, method: str) -> None:
    """``TestPull``/``TestHead`` of blobs: 200, length, digest, bytes."""
    problems = []
    for digest, blob in content.blobs.items():
        response = served.send(method, f"blobs/{digest}")
        got = (
            response.status,
            response.header("Content-Length"),
            response.header("Docker-Content-Digest"),
            response.body == (b"" if method == "HEAD" else blob.data),
        )
        if got != (200, str(blob.size), digest, True):
            problems.append(f"{method} blobs/{digest}: {got}")
    _assert_none(problems)


def _tags(served: Served, query: str = "") -> Any:
    response = served.send("GET", f"tags/list{query}")
    assert response.status == 200, response
    return response.json()["tags"], response


def test_tag_list_and_last(served: Served, content: Content) -> None:
    """``TestList``: every tag is listed; ``?last=`` the middle tag (``n``
    left out, as the suite does) lists exactly the tags after it."""
    listed, _ = _tags(served)
    assert set(content.tags) <= set(listed)
    ordered = sorted(listed)
    last = ordered[len(ordered) // 2 - 1]
    after, response = _tags(served, f"?last={last}")
    assert after == ordered[len(ordered) // 2 :]
    assert response.header("Link") is None


def test_tag_list_pages_with_n_and_last(served: Served, content: Content) -> None:
    """``n`` with and without ``last``: pages of ``n`` in order, each with a
    ``Link`` to the next but the last one."""
    ordered = sorted(content.tags)
    first, response = _tags(served, "?n=2")
    assert first == ordered[:2]
    assert response.header("Link") is not None
    second, _ = _tags(served, f"?n=2&last={first[-1]}")
    assert second == ordered[2:4]


def _referrers(served: Served, subject: str, query: str = "") -> Response:
    return served.send("GET", f"referrers/{subject}{query}")


def _listed(expected: dict[str, Any], got: list[dict[str, Any]]) -> bool:
    """The suite's test: same digest, type, size, artifactType, and at least
    the expected annotations."""
    return any(
        entry.get("digest") == expected["digest"]
        and entry.get("mediaType") == expected["mediaType"]
        and entry.get("size") == expected["size"]
        and entry.get("artifactType") == expected["artifactType"]
        and expected.get("annotations", {}).items()
        <= (entry.get("annotations") or {}).items()
        for entry in got
    )


def _index_problems(response: Response, what: str) -> list[str]:
    """What the suite's ``ReferrersList`` finds wrong with an answer."""
    if response.status != 200:
        return [f"{what}: {response.status} {response.body[:200]!r}"]
    problems = []
    if response.header("Content-Type") != OCI_INDEX:
        problems.append(f"{what}: Content-Type {response.header('Content-Type')}")
    document = response.json()
    if document.get("mediaType") != OCI_INDEX or document.get("schemaVersion") != 2:
        problems.append(f"{what}: not an OCI index: {document}")
    return problems


def test_referrers(served: Served, content: Content) -> None:
    """``TestReferrers``: the referrers API lists every referrer of the
    subject (from the upstream's referrers tag: distribution 2.8 has no
    API), and filtered by each artifactType lists those only, saying
    ``OCI-Filters-Applied: artifactType``."""
    problems = []
    for subject, expected in content.referrers.items():
        response = _referrers(served, subject)
        problems += _index_problems(response, f"referrers/{subject}")
        if response.status == 200:
            got = response.json()["manifests"]
            problems += [
                f"referrers/{subject}: {entry} missing from {got}"
                for entry in expected
                if not _listed(entry, got)
            ]
        for artifact_type in sorted({entry["artifactType"] for entry in expected}):
            what = f"referrers/{subject}?artifactType={artifact_type}"
            # Encoded as Go's url.Values does: a "+" would be a space.
            query = "?" + urlencode({"artifactType": artifact_type})
            response = _referrers(served, subject, query)
            problems += _index_problems(response, what)
            if response.status != 200:
                continue
            applied = response.header("OCI-Filters-Applied") or ""
            if "artifactType" not in [f.strip() for f in applied.split(",")]:
                problems.append(f"{what}: OCI-Filters-Applied is {applied!r}")
            got = response.json()["manifests"]
            problems += [
                f"{what}: {entry} missing"
                for entry in expected
                if entry["artifactType"] == artifact_type and not _listed(entry, got)
            ]
            problems += [
                f"{what}: {entry} is of another type"
                for entry in got
                if entry.get("artifactType") != artifact_type
            ]
    _assert_none(problems)


def test_referrers_of_a_subject_without_any(served: Served, content: Content) -> None:
    """``TestEmptyReferrers`` and a subject that exists but has no
    referrers: 200 with an empty OCI index, never 404."""
    problems = []
    for subject in (sha256_digest(b"no such subject"), content.tags["index"]):
        response = _referrers(served, subject)
        problems += _index_problems(response, f"referrers/{subject}")
        if response.status == 200 and response.json()["manifests"] != []:
            problems.append(f"referrers/{subject}: {response.json()}")
    _assert_none(problems)


def test_what_is_missing(served: Served) -> None:
    """``TestManifestErrors`` and the missing-blob requests: an unknown
    digest or tag is 404 MANIFEST_UNKNOWN, ``sha256:baddigeststring`` is
    400 DIGEST_INVALID (the suite takes 400 or 404), an unknown blob 404
    (BLOB_UNKNOWN), an unknown repository's tag list 404 NAME_UNKNOWN."""
    accept = _accept(SUITE_ACCEPT)
    missing = sha256_digest(b"missing manifest")
    expectations = [
        ("GET", f"manifests/{missing}", accept, 404, "MANIFEST_UNKNOWN"),
        ("GET", "manifests/missing-tag", accept, 404, "MANIFEST_UNKNOWN"),
        ("GET", "manifests/sha256:baddigeststring", accept, 400, "DIGEST_INVALID"),
        ("GET", f"blobs/{missing}", [], 404, "BLOB_UNKNOWN"),
        ("HEAD", f"blobs/{missing}", [], 404, None),
        ("HEAD", f"manifests/{missing}", accept, 404, None),
    ]
    problems = []
    for method, path, headers, status, code in expectations:
        response = served.send(method, path, *headers)
        codes = response.error_codes() if code is not None else None
        if (response.status, codes) != (status, [code] if code else None):
            problems.append(f"{method} {path}: {response.status} {codes}")
    unknown = _send(served.mirror.port, "GET", "/v2/conformance/nothing/tags/list")
    if (unknown.status, unknown.error_codes()) != (404, ["NAME_UNKNOWN"]):
        problems.append(f"tags/list of an unknown repository: {unknown}")
    _assert_none(problems)
