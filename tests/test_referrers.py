"""
The referrers API as a registry that supports it answers it, whatever the
upstream offers, and ``tags/list`` paged by ``n`` or ``last``.

An upstream without the referrers API (distribution 2.8) keeps referrers
under the referrers tag schema: the tag ``<alg>-<hex>`` of the subject
names an index listing them.  That tag is a tag like any other, so what it
points at is asked of the origin.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fakeregistry import FakeRegistry, digest_of
from memory import Harness, error_code, image
from twisted.web.server import Request

from regmirror.reference import OCI_INDEX, OCI_MANIFEST, parse_digest, referrers_tag

SBOM = "application/vnd.example.sbom.v1"
SIGNATURE = "application/vnd.example.signature.v1"
EMPTY_INDEX = (
    b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",'
    b'"manifests":[]}'
)


@pytest.fixture
def mirror(tmp_path: Any) -> Harness:
    return Harness(str(tmp_path), {"origin": FakeRegistry()})


def _descriptor(name: str, artifact_type: str | None) -> dict[str, Any]:
    body = name.encode()
    entry: dict[str, Any] = {
        "mediaType": OCI_MANIFEST,
        "digest": digest_of(body),
        "size": len(body),
        "annotations": {"org.example.name": name},
    }
    if artifact_type is not None:
        entry["artifactType"] = artifact_type
    return entry


def _tag_referrers(
    fake: FakeRegistry, subject: str, entries: list[dict[str, Any]]
) -> str:
    """Tag an index listing *entries* under *subject*'s referrers tag."""
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    tag = referrers_tag(parse_digest(subject))
    digest, _ = fake.add_manifest("library/app", tag, document, OCI_INDEX)
    return digest


def _referrers(mirror: Harness, subject: str, query: str = "") -> Any:
    response = mirror.request("GET", f"/v2/app/referrers/{subject}{query}")
    return response, mirror.body(response)


def test_no_referrers_api_and_no_referrers_tag_is_an_empty_index(
    mirror: Harness,
) -> None:
    """No referrers API upstream (404) and no referrers tag: 200 with an
    empty OCI index, as a registry that has the API answers; never 404."""
    subject = image(mirror.fakes["origin"])["manifest"]
    response, body = _referrers(mirror, subject)
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Type") == [OCI_INDEX]
    assert body == EMPTY_INDEX


def test_referrers_come_from_the_referrers_tag(mirror: Harness) -> None:
    """Without the API upstream, the referrers are the entries of the index
    under the subject's referrers tag, as listed there."""
    origin = mirror.fakes["origin"]
    subject = image(origin)["manifest"]
    entries = [_descriptor("sbom", SBOM), _descriptor("sig", SIGNATURE)]
    _tag_referrers(origin, subject, entries)
    response, body = _referrers(mirror, subject)
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Type") == [OCI_INDEX]
    assert response.headers.getRawHeaders("OCI-Filters-Applied") is None
    document = json.loads(body)
    assert document["schemaVersion"] == 2
    assert document["mediaType"] == OCI_INDEX
    assert document["manifests"] == entries


@pytest.mark.parametrize("wanted", [SBOM, SIGNATURE, "application/other"])
def test_referrers_from_the_tag_are_filtered_by_artifact_type(
    mirror: Harness, wanted: str
) -> None:
    """``?artifactType=`` keeps the entries of that type and says so with
    ``OCI-Filters-Applied: artifactType``."""
    origin = mirror.fakes["origin"]
    subject = image(origin)["manifest"]
    entries = [
        _descriptor("sbom", SBOM),
        _descriptor("sig", SIGNATURE),
        _descriptor("untyped", None),
    ]
    _tag_referrers(origin, subject, entries)
    response, body = _referrers(mirror, subject, f"?artifactType={wanted}")
    assert response.code == 200
    assert response.headers.getRawHeaders("OCI-Filters-Applied") == ["artifactType"]
    kept = json.loads(body)["manifests"]
    assert kept == [e for e in entries if e.get("artifactType") == wanted]


def test_the_referrers_tag_is_resolved_at_the_origin(tmp_path: Any) -> None:
    """A mirror upstream listed before the origin holds an older referrers
    tag: the origin's says which index lists the referrers."""
    mirror_up, origin = FakeRegistry(), FakeRegistry()
    harness = Harness(str(tmp_path), {"mirror": mirror_up, "origin": origin})
    subject = image(origin)["manifest"]
    image(mirror_up)
    _tag_referrers(mirror_up, subject, [_descriptor("old", SBOM)])
    _tag_referrers(origin, subject, [_descriptor("new", SBOM)])
    tag = referrers_tag(parse_digest(subject))
    response, body = _referrers(harness, subject)
    assert response.code == 200
    names = [
        e["annotations"]["org.example.name"] for e in json.loads(body)["manifests"]
    ]
    assert names == ["new"]
    assert origin.count("HEAD", f"/manifests/{tag}") == 1


def test_a_referrers_tag_naming_no_index_is_a_bad_gateway(mirror: Harness) -> None:
    """A referrers tag that names an image manifest instead of an index is
    an upstream fault (502), not an empty list nor the image."""
    origin = mirror.fakes["origin"]
    subject = image(origin)["manifest"]
    image(origin, tag=referrers_tag(parse_digest(subject)))
    response, _ = _referrers(mirror, subject)
    assert response.code == 502
    assert error_code(mirror, response) == "UNAVAILABLE"


def _referrers_api(entries: list[dict[str, Any]], filtered: bool = False) -> Any:
    """A fault hook that makes a fake registry answer the referrers API."""

    def answer(request: Request) -> tuple[int, bytes] | None:
        if b"/referrers/" not in request.path:
            return None
        wanted = request.args.get(b"artifactType")
        listed = entries
        if filtered and wanted:
            listed = [e for e in entries if e.get("artifactType") == wanted[0].decode()]
            request.setHeader("OCI-Filters-Applied", "artifactType")
        request.setHeader("Content-Type", OCI_INDEX)
        document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed}
        return 200, json.dumps(document).encode()

    return answer


def test_an_upstream_referrers_api_that_does_not_filter_is_filtered_here(
    mirror: Harness,
) -> None:
    """An upstream with the API that ignores ``artifactType``: the mirror
    filters its answer and says so."""
    origin = mirror.fakes["origin"]
    subject = image(origin)["manifest"]
    entries = [_descriptor("sbom", SBOM), _descriptor("sig", SIGNATURE)]
    origin.fault = _referrers_api(entries)
    response, body = _referrers(mirror, subject, f"?artifactType={SBOM}")
    assert response.code == 200
    assert response.headers.getRawHeaders("OCI-Filters-Applied") == ["artifactType"]
    assert json.loads(body)["manifests"] == entries[:1]


def test_an_upstream_referrers_api_that_filters_is_passed_on(
    mirror: Harness,
) -> None:
    """An upstream that filters (and says so) is passed on as it answered."""
    origin = mirror.fakes["origin"]
    subject = image(origin)["manifest"]
    entries = [_descriptor("sbom", SBOM), _descriptor("sig", SIGNATURE)]
    origin.fault = _referrers_api(entries, filtered=True)
    response, body = _referrers(mirror, subject, f"?artifactType={SIGNATURE}")
    assert response.headers.getRawHeaders("OCI-Filters-Applied") == ["artifactType"]
    assert json.loads(body)["manifests"] == entries[1:]
    everything, body = _referrers(mirror, subject)
    assert everything.headers.getRawHeaders("OCI-Filters-Applied") is None
    assert json.loads(body)["manifests"] == entries


def test_an_upstream_referrers_answer_that_is_no_index_is_a_bad_gateway(
    mirror: Harness,
) -> None:
    """A 200 from the referrers API that is no index (an HTML page, say) is
    not passed on as one: 502."""
    subject = image(mirror.fakes["origin"])["manifest"]
    mirror.fakes["origin"].fault = lambda request: (
        (200, b"<html>welcome</html>") if b"/referrers/" in request.path else None
    )
    response, _ = _referrers(mirror, subject)
    assert response.code == 502
    assert error_code(mirror, response) == "UNAVAILABLE"


def test_the_referrers_api_is_asked_of_the_origin_first(tmp_path: Any) -> None:
    """The referrers of a digest change as artifacts are pushed: like a tag,
    the list comes from the origin, not from a mirror listed before it."""
    mirror_up, origin = FakeRegistry(), FakeRegistry()
    harness = Harness(str(tmp_path), {"mirror": mirror_up, "origin": origin})
    subject = image(origin)["manifest"]
    mirror_up.fault = _referrers_api([_descriptor("old", SBOM)])
    origin.fault = _referrers_api([_descriptor("new", SBOM)])
    response, body = _referrers(harness, subject)
    assert response.code == 200
    names = [
        e["annotations"]["org.example.name"] for e in json.loads(body)["manifests"]
    ]
    assert names == ["new"]
    assert mirror_up.count("GET", "/referrers/") == 0


def test_an_origin_without_the_api_is_not_overruled_by_a_mirror_with_it(
    tmp_path: Any,
) -> None:
    """The origin has no referrers API (404) but keeps a referrers tag; a
    mirror listed before it has the API: the origin's tag decides, the
    mirror's API is not asked."""
    mirror_up, origin = FakeRegistry(), FakeRegistry()
    harness = Harness(str(tmp_path), {"mirror": mirror_up, "origin": origin})
    subject = image(origin)["manifest"]
    mirror_up.fault = _referrers_api([_descriptor("old", SBOM)])
    _tag_referrers(origin, subject, [_descriptor("new", SBOM)])
    response, body = _referrers(harness, subject)
    assert response.code == 200
    names = [
        e["annotations"]["org.example.name"] for e in json.loads(body)["manifests"]
    ]
    assert names == ["new"]
    assert mirror_up.count("GET", "/referrers/") == 0


def test_with_the_origin_down_a_mirrors_referrers_api_answers(tmp_path: Any) -> None:
    """The origin gives no answer at all (503): the mirrors' referrers API
    is asked in their order."""
    mirror_up, origin = FakeRegistry(), FakeRegistry()
    harness = Harness(str(tmp_path), {"mirror": mirror_up, "origin": origin})
    subject = image(mirror_up)["manifest"]
    mirror_up.fault = _referrers_api([_descriptor("from-mirror", SBOM)])
    origin.fault = lambda request: (503, b"maintenance")
    response, body = _referrers(harness, subject)
    assert response.code == 200
    names = [
        e["annotations"]["org.example.name"] for e in json.loads(body)["manifests"]
    ]
    assert names == ["from-mirror"]


def test_with_every_upstream_down_the_answer_is_an_error(mirror: Harness) -> None:
    """No upstream answers at all: an error (503), never an empty list that
    would say there are no referrers."""
    subject = image(mirror.fakes["origin"])["manifest"]
    mirror.fakes["origin"].fault = lambda request: (503, b"maintenance")
    response, _ = _referrers(mirror, subject)
    assert response.code in (502, 503)
    assert error_code(mirror, response) == "UNAVAILABLE"


def test_a_bad_subject_digest_is_400(mirror: Harness) -> None:
    """An invalid ``<digest>``: 400 DIGEST_INVALID, nothing asked upstream."""
    response, _ = _referrers(mirror, "sha256:nothex")
    assert response.code == 400
    assert error_code(mirror, response) == "DIGEST_INVALID"
    assert mirror.fakes["origin"].requests == []


# -- tags/list ----------------------------------------------------------------


def _tags(mirror: Harness, query: str) -> tuple[Any, list[str]]:
    response = mirror.request("GET", f"/v2/org/app/tags/list{query}&ns=ghcr.io")
    return response, json.loads(mirror.body(response))["tags"]


def test_last_without_n_pages_after_last(mirror: Harness) -> None:
    """``?last=b`` alone (``n`` is optional with ``last``): every tag after
    ``b`` and no ``Link``, from an upstream that ignores both parameters."""
    for tag in ("d", "a", "c", "b"):
        image(mirror.fakes["origin"], name="org/app", tag=tag)
    response, tags = _tags(mirror, "?last=b")
    assert tags == ["c", "d"]
    assert response.headers.getRawHeaders("Link") is None


def test_n_zero_is_an_empty_page_without_link(mirror: Harness) -> None:
    """``n=0``: an empty list and no ``Link`` header (the spec's words)."""
    for tag in ("a", "b"):
        image(mirror.fakes["origin"], name="org/app", tag=tag)
    response, tags = _tags(mirror, "?n=0")
    assert tags == []
    assert response.headers.getRawHeaders("Link") is None


def test_last_past_the_end_is_an_empty_page(mirror: Harness) -> None:
    """``last`` after every tag: an empty list."""
    image(mirror.fakes["origin"], name="org/app", tag="a")
    _, tags = _tags(mirror, "?last=zzz")
    assert tags == []
