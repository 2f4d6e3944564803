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
