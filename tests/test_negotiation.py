"""
Which manifest a client gets for a tag or digest that names an index,
depending on the media types its ``Accept`` header lines name.

The rule: the stored manifest is served as it is whenever the client
accepts it, or accepts any index type at all (an OCI index and a Docker
manifest list have the same shape, and every client that reads one reads
the other); only a client that accepts no index type asking by tag gets
the linux/amd64 image instead, as from distribution; by digest it gets
404 MANIFEST_UNKNOWN.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fakeregistry import FakeRegistry
from memory import Harness, error_code, image, index_manifest

from regmirror.reference import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)


@pytest.fixture
def mirror(tmp_path: Any) -> Harness:
    return Harness(str(tmp_path), {"origin": FakeRegistry()})


def _index(
    origin: FakeRegistry, media_type: str = OCI_INDEX, tag: str = "multi"
) -> dict[str, str]:
    """An index of two images (amd64 and arm64) tagged *tag* in *origin*."""
    amd64 = image(origin, tag=None, created="2024-01-01T00:00:00Z")
    arm64 = image(origin, tag=None, created="2024-02-02T00:00:00Z")
    document = index_manifest([(amd64, "amd64"), (arm64, "arm64")], media_type)
    digest, body = origin.add_manifest("library/app", tag, document, media_type)
    return {
        "index": digest,
        "body": body.decode(),
        "amd64": amd64["manifest"],
        "arm64": arm64["manifest"],
    }


def _digest_of(mirror: Harness, path: str, accept: list[str]) -> Any:
    response = mirror.request("GET", path, headers={"Accept": accept})
    digest = response.headers.getRawHeaders("Docker-Content-Digest")
    return response.code, digest[0] if digest else None, mirror.body(response)


@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize(
    "lines",
    [
        [OCI_INDEX, OCI_MANIFEST],
        [OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST],
        [DOCKER_MANIFEST, f"{OCI_INDEX}, {DOCKER_MANIFEST_LIST}", OCI_MANIFEST],
    ],
    ids=["conformance-suite", "dockerd", "mixed"],
)
def test_an_index_is_served_when_any_accept_line_names_it(
    mirror: Harness, by: str, lines: list[str]
) -> None:
    """
    Several ``Accept`` lines, the index type not on the last one (the OCI
    conformance suite sends two lines, dockerd one per type in any order):
    every line counts, so the index itself is the answer, by tag and by
    digest, with its own digest, type and bytes.
    """
    content = _index(mirror.fakes["origin"])
    reference = "multi" if by == "tag" else content["index"]
    response = mirror.request(
        "GET", f"/v2/app/manifests/{reference}", headers={"Accept": lines}
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [content["index"]]
    assert response.headers.getRawHeaders("Content-Type") == [OCI_INDEX]
    assert mirror.body(response).decode() == content["body"]


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_head_of_an_index_with_two_accept_lines(mirror: Harness, by: str) -> None:
    """HEAD with the conformance suite's two ``Accept`` lines: 200, the
    index's digest and length, no body."""
    content = _index(mirror.fakes["origin"])
    reference = "multi" if by == "tag" else content["index"]
    response = mirror.request(
        "HEAD",
        f"/v2/app/manifests/{reference}",
        headers={"Accept": [OCI_INDEX, OCI_MANIFEST]},
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [content["index"]]
    assert response.headers.getRawHeaders("Content-Length") == [
        str(len(content["body"]))
    ]
    assert mirror.body(response) == b""


@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize(
    ("stored", "accepted"),
    [
        (OCI_INDEX, [DOCKER_MANIFEST_LIST, DOCKER_MANIFEST]),
        (DOCKER_MANIFEST_LIST, [OCI_INDEX, OCI_MANIFEST]),
    ],
    ids=["oci-index-to-docker-client", "docker-list-to-oci-client"],
)
def test_the_other_index_type_is_served_as_stored(
    mirror: Harness, by: str, stored: str, accepted: list[str]
) -> None:
    """
    A client that accepts only the other index type gets the stored index
    as it is (its own type and digest), never one platform's image chosen
    for it: the list is what the tag points at, and the client can pick.
    """
    content = _index(mirror.fakes["origin"], media_type=stored)
    reference = "multi" if by == "tag" else content["index"]
    response = mirror.request(
        "GET",
        f"/v2/app/manifests/{reference}",
        headers={"Accept": [", ".join(accepted)]},
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [content["index"]]
    assert response.headers.getRawHeaders("Content-Type") == [stored]


@pytest.mark.parametrize(
    "accept",
    [None, ["*/*"], ["application/*"], [f"{OCI_MANIFEST};q=0.5, */*;q=0.1"]],
    ids=["absent", "any", "application-any", "any-with-q"],
)
def test_a_client_that_accepts_anything_gets_the_index(
    mirror: Harness, accept: list[str] | None
) -> None:
    """No ``Accept``, or a wildcard among its types: the index by tag."""
    content = _index(mirror.fakes["origin"])
    headers = {} if accept is None else {"headers": {"Accept": accept}}
    response = mirror.request("GET", "/v2/app/manifests/multi", **headers)
    assert response.code == 200
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [content["index"]]


def test_empty_accept_lines_name_no_type(mirror: Harness) -> None:
    """Blank ``Accept`` lines name nothing: the client accepts anything, as
    without the header, rather than nothing at all."""
    content = _index(mirror.fakes["origin"])
    response = mirror.request(
        "GET", "/v2/app/manifests/multi", headers={"Accept": ["", " "]}
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [content["index"]]


@pytest.mark.parametrize("stored", [OCI_INDEX, DOCKER_MANIFEST_LIST])
def test_a_client_accepting_no_index_type_gets_the_amd64_image_by_tag(
    mirror: Harness, stored: str
) -> None:
    """Only a client that accepts no index type at all, asking by tag, gets
    the index's linux/amd64 image (what registries do for old clients)."""
    content = _index(mirror.fakes["origin"], media_type=stored)
    response = mirror.request(
        "GET",
        "/v2/app/manifests/multi",
        headers={"Accept": [OCI_MANIFEST, DOCKER_MANIFEST]},
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [content["amd64"]]


def test_a_docker_v2_only_client_gets_the_oci_amd64_image_of_an_oci_index(
    mirror: Harness,
) -> None:
    """A client naming only Docker's image type, asking by tag for an OCI
    index of OCI images, gets the amd64 OCI image: image manifests are
    served whatever the Accept header says, as the README promises."""
    content = _index(mirror.fakes["origin"])
    response = mirror.request(
        "GET", "/v2/app/manifests/multi", headers={"Accept": [DOCKER_MANIFEST]}
    )
    assert response.code == 200
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [content["amd64"]]
    assert response.headers.getRawHeaders("Content-Type") == [OCI_MANIFEST]


def test_an_index_by_digest_for_a_client_accepting_no_index_type_is_unknown(
    mirror: Harness,
) -> None:
    """By digest nothing else may stand in for the index: 404
    MANIFEST_UNKNOWN when the client accepts no index type."""
    content = _index(mirror.fakes["origin"])
    response = mirror.request(
        "GET",
        f"/v2/app/manifests/{content['index']}",
        headers={"Accept": [OCI_MANIFEST, DOCKER_MANIFEST]},
    )
    assert response.code == 404
    assert error_code(mirror, response) == "MANIFEST_UNKNOWN"


def test_an_index_refused_with_q_zero_is_not_accepted(mirror: Harness) -> None:
    """``q=0`` takes a type out: an index refused that way, asked for by
    tag, is answered with the amd64 image."""
    content = _index(mirror.fakes["origin"])
    response = mirror.request(
        "GET",
        "/v2/app/manifests/multi",
        headers={"Accept": [f"{OCI_INDEX};q=0", OCI_MANIFEST]},
    )
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [content["amd64"]]


def test_a_nested_index_is_never_replaced_by_an_inner_index(
    mirror: Harness,
) -> None:
    """An index of indexes asked for by tag by a client that accepts no
    index type: 404 MANIFEST_UNKNOWN (its linux/amd64 entry is an index the
    client cannot read either); with the index types, the outer index."""
    origin = mirror.fakes["origin"]
    inner = _index(origin, tag="inner")
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_INDEX,
                "digest": inner["index"],
                "size": len(inner["body"]),
                "platform": {"os": "linux", "architecture": "amd64"},
            }
        ],
    }
    outer, _ = origin.add_manifest("library/app", "nested", document, OCI_INDEX)
    old = mirror.request(
        "GET", "/v2/app/manifests/nested", headers={"Accept": [OCI_MANIFEST]}
    )
    assert old.code == 404
    assert error_code(mirror, old) == "MANIFEST_UNKNOWN"
    new = mirror.request(
        "GET",
        "/v2/app/manifests/nested",
        headers={"Accept": [OCI_MANIFEST, OCI_INDEX]},
    )
    assert new.headers.getRawHeaders("Docker-Content-Digest") == [outer]
    assert json.loads(mirror.body(new))["manifests"][0]["digest"] == inner["index"]
