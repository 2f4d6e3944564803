"""
Lists passed back from an upstream (``tags/list``, the referrers API) go
out only as JSON under the mirror's own media type, whatever the upstream
said its body was (issue 16, item 7): an upstream, or a man in the middle
of a plain-http one, could otherwise serve a page from the mirror's origin.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fakeregistry import FakeRegistry
from memory import Harness, image
from twisted.web.server import Request

from regmirror.reference import OCI_INDEX

PAGE = b"<html><script>alert(document.cookie)</script></html>"


@pytest.fixture
def mirror(tmp_path: Any) -> Harness:
    return Harness(str(tmp_path), {"origin": FakeRegistry()})


def answering(
    marker: str, body: bytes, content_type: str
) -> Callable[[Request], tuple[int, bytes] | None]:
    """A fault answering requests whose path holds *marker* with *body*."""

    def fault(request: Request) -> tuple[int, bytes] | None:
        if marker.encode() not in request.path:
            return None
        request.setHeader("Content-Type", content_type)
        return 200, body

    return fault


def oci_error(mirror: Harness, response: Any) -> tuple[int, str, str, str]:
    """Status, Content-Type, first code and message of an OCI error answer."""
    document = json.loads(mirror.body(response))
    (content_type,) = response.headers.getRawHeaders("Content-Type")
    error = document["errors"][0]
    return response.code, content_type, error["code"], error["message"]


NOT_TAG_LISTS = [
    pytest.param(PAGE, "text/html", id="html"),
    pytest.param(PAGE, "application/json", id="html-said-json"),
    pytest.param(b'["v1", "v2"]', "application/json", id="json-array"),
    pytest.param(b'"<script>"', "application/json", id="json-string"),
    pytest.param(b'{"name":"app","tags":"<b>x</b>"}', "text/html", id="tags-text"),
    pytest.param(b'{"name":"app","tags":[1,{"a":2}]}', "text/html", id="tags-no-str"),
    pytest.param(b"", "application/json", id="empty"),
    pytest.param(b"\xff\xfe{", "application/json", id="bytes"),
]


@pytest.mark.parametrize("query", ["", "?n=1", "?last=a"])
@pytest.mark.parametrize(("body", "content_type"), NOT_TAG_LISTS)
def test_a_tag_list_that_is_no_json_tag_list_is_a_clear_oci_error(
    mirror: Harness, body: bytes, content_type: str, query: str
) -> None:
    """
    A ``tags/list`` answer that is not a JSON object with a list of tag
    names (a page, a JSON array or string, tags that are no list of
    strings, nothing, bytes that are no text), however the upstream typed
    it and whether the mirror pages it or not: 502 ``UNAVAILABLE`` as
    JSON, naming the upstream; nothing of the body reaches the client.
    """
    origin = mirror.fakes["origin"]
    image(origin)
    origin.fault = answering("/tags/list", body, content_type)
    response = mirror.request("GET", f"/v2/app/tags/list{query}")
    status, returned_type, code, message = oci_error(mirror, response)
    assert (status, returned_type, code) == (502, "application/json", "UNAVAILABLE")
    assert "origin" in message and "tag list" in message
    assert "script" not in message


def test_a_tag_list_typed_as_html_goes_out_as_json(mirror: Harness) -> None:
    """A real tag list the upstream labelled ``text/html``: passed on as
    ``application/json``, never with the upstream's type."""
    origin = mirror.fakes["origin"]
    image(origin)
    listing = b'{"name":"library/app","tags":["latest"]}'
    origin.fault = answering("/tags/list", listing, "text/html")
    response = mirror.request("GET", "/v2/app/tags/list")
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
    assert json.loads(mirror.body(response))["tags"] == ["latest"]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(PAGE, "text/html", id="html"),
        pytest.param(PAGE, OCI_INDEX, id="html-said-index"),
        pytest.param(b'{"manifests":"<script>"}', OCI_INDEX, id="no-list"),
        pytest.param(b"[]", OCI_INDEX, id="json-array"),
    ],
)
def test_a_referrers_answer_that_is_no_index_is_a_clear_oci_error(
    mirror: Harness, body: bytes, content_type: str
) -> None:
    """A referrers API answer that is no JSON index: 502 ``UNAVAILABLE`` as
    JSON, naming the upstream."""
    origin = mirror.fakes["origin"]
    subject = image(origin)["manifest"]
    origin.fault = answering("/referrers/", body, content_type)
    response = mirror.request("GET", f"/v2/app/referrers/{subject}")
    status, returned_type, code, message = oci_error(mirror, response)
    assert (status, returned_type, code) == (502, "application/json", "UNAVAILABLE")
    assert "origin" in message
    assert "script" not in message


@pytest.mark.parametrize("query", ["", "?artifactType=application/x"])
def test_a_referrers_index_typed_as_html_goes_out_as_an_oci_index(
    mirror: Harness, query: str
) -> None:
    """A referrers index the upstream labelled ``text/html``: passed on as
    an OCI index, filtered here or not."""
    origin = mirror.fakes["origin"]
    subject = image(origin)["manifest"]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    origin.fault = answering("/referrers/", json.dumps(index).encode(), "text/html")
    response = mirror.request("GET", f"/v2/app/referrers/{subject}{query}")
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Type") == [OCI_INDEX]
    assert json.loads(mirror.body(response))["manifests"] == []


def strict_json(body: bytes) -> Any:
    """*body* parsed as JSON proper: ``NaN`` and ``Infinity`` refused."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in the mirror's JSON")

    return json.loads(body, parse_constant=refuse)


@pytest.mark.parametrize("query", ["", "?n=1"])
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"name":"library/app","tags":["a"],"n":NaN}', id="nan"),
        pytest.param(b'{"name":"library/app","tags":["a"],"x":-Infinity}', id="-inf"),
        pytest.param(b'{"name":"library/app","tags":["a"],"x":Infinity}', id="inf"),
        pytest.param(b'{"name":"library/app","tags":["a"],"x":1e999}', id="1e999"),
    ],
)
def test_a_tag_list_with_numbers_json_has_not_is_a_clear_oci_error(
    mirror: Harness, body: bytes, query: str
) -> None:
    """
    A tag list with ``NaN``, ``Infinity`` or a number too large to be
    finite (which Python's parser takes, and would write out as
    ``Infinity``): 502 ``UNAVAILABLE`` naming the upstream, never a 200
    whose body is no JSON.
    """
    origin = mirror.fakes["origin"]
    image(origin)
    origin.fault = answering("/tags/list", body, "application/json")
    response = mirror.request("GET", f"/v2/app/tags/list{query}")
    status, returned_type, code, message = oci_error(mirror, response)
    assert (status, returned_type, code) == (502, "application/json", "UNAVAILABLE")
    assert "origin" in message


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(b'"size":1e999', id="1e999"),
        pytest.param(b'"size":NaN', id="nan"),
        pytest.param(b'"size":-Infinity', id="-inf"),
    ],
)
def test_a_referrers_index_with_numbers_json_has_not_is_a_clear_oci_error(
    mirror: Harness, entry: bytes
) -> None:
    """A referrers entry whose size is ``1e999`` (read as infinity),
    ``NaN`` or ``-Infinity``: 502 ``UNAVAILABLE``, not a body with
    ``Infinity`` in it, filtered here or not."""
    origin = mirror.fakes["origin"]
    subject = image(origin)["manifest"]
    body = (
        b'{"schemaVersion":2,"manifests":[{"mediaType":"'
        + OCI_INDEX.encode()
        + b'","digest":"sha256:'
        + b"a" * 64
        + b'",'
        + entry
        + b',"artifactType":"application/x"}]}'
    )
    origin.fault = answering("/referrers/", body, OCI_INDEX)
    for query in ("", "?artifactType=application/x"):
        response = mirror.request("GET", f"/v2/app/referrers/{subject}{query}")
        status, returned_type, code, message = oci_error(mirror, response)
        assert (status, code) == (502, "UNAVAILABLE"), query
        assert "origin" in message


@pytest.mark.parametrize(
    "listing",
    [
        pytest.param(b'{"name":"library/app","tags":null}', id="null"),
        pytest.param(b'{"name":"library/app"}', id="missing"),
    ],
)
@pytest.mark.parametrize("query", ["", "?n=2", "?last=a"])
def test_a_tag_list_of_null_is_an_empty_list(
    mirror: Harness, listing: bytes, query: str
) -> None:
    """``"tags": null`` (a Go registry's empty list), or no ``tags`` at
    all, goes out as ``"tags": []``, the array the spec describes."""
    origin = mirror.fakes["origin"]
    image(origin)
    origin.fault = answering("/tags/list", listing, "application/json")
    response = mirror.request("GET", f"/v2/app/tags/list{query}")
    assert response.code == 200
    assert strict_json(mirror.body(response)) == {"name": "library/app", "tags": []}


def test_what_the_mirror_writes_is_strict_json(mirror: Harness) -> None:
    """A tag list with large integers and nested values goes out parsed
    by a strict parser alike."""
    origin = mirror.fakes["origin"]
    image(origin)
    listing = b'{"name":"library/app","tags":["a"],"x":[1.5,10000000000000000000000]}'
    origin.fault = answering("/tags/list", listing, "application/json")
    response = mirror.request("GET", "/v2/app/tags/list")
    assert strict_json(mirror.body(response)) == strict_json(listing)
