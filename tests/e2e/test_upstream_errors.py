"""
What a client is told when upstreams fail, end to end with a real mirror:
an upstream that accepts connections and never answers, and one that
wants credentials the mirror does not have.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import LOCALHOST, MirrorProcess, RegistryProcess, mirror_config_upstreams
from .images import MANIFEST_ACCEPT, Catalog
from .servers import write_htpasswd

pytestmark = pytest.mark.e2e

StartMirror = Callable[..., MirrorProcess]
StartRegistry = Callable[..., RegistryProcess]


@pytest.fixture
def blackhole() -> Iterator[str]:
    """The URL of a listening socket that never accepts: the kernel
    completes each connection, and no byte ever comes back."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOCALHOST, 0))
    listener.listen(64)
    try:
        yield f"http://{LOCALHOST}:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.mark.parametrize(
    "path",
    [
        "/v2/test/small/manifests/latest",
        "/v2/test/small/blobs/sha256:" + "5" * 64,
        "/v2/test/small/manifests/sha256:" + "6" * 64,
    ],
)
def test_an_upstream_that_never_answers_is_a_504_that_says_it_timed_out(
    blackhole: str, start_mirror: StartMirror, path: str
) -> None:
    """
    The only upstream accepts TCP and never answers (``response_timeout =
    2s``): a tag, a blob and a manifest by digest are each ``504
    UNAVAILABLE`` whose message names the upstream and says that it gave no
    response within 2 s (it was a 503 saying "connection failed: ", with
    no reason).
    """
    mirror = start_mirror(
        lambda port: mirror_config_upstreams(
            port,
            {"blackhole": {"url": blackhole, "response_timeout": "2s"}},
            origin="blackhole",
        )
    )
    response = mirror.request("GET", path, {"Accept": MANIFEST_ACCEPT})
    assert response.status == 504, response.body
    assert response.error_codes() == ["UNAVAILABLE"], response.body
    message = response.json()["errors"][0]["message"]
    assert "timed out" in message, message
    assert "upstream blackhole: no response within 2s" in message, message


def test_an_upstream_refusing_the_mirror_is_a_502_not_a_401(
    tmp_path: Path,
    catalog: Catalog,
    start_registry: StartRegistry,
    start_mirror: StartMirror,
) -> None:
    """
    An upstream that wants Basic credentials the mirror has not got answers
    it 401: the client (whose credentials, if any, are the mirror's) is
    answered ``502`` with the code ``UNAUTHORIZED`` and a message saying the
    upstream refused the mirror's credentials, not a 401 without a
    ``WWW-Authenticate`` challenge that no client could answer.
    """
    htpasswd = write_htpasswd(tmp_path / "htpasswd", "someone", "a-password")
    registry = start_registry(auth={"htpasswd": {"realm": "test", "path": htpasswd}})
    mirror = start_mirror(
        lambda port: mirror_config_upstreams(
            port, {"private": {"url": registry.url}}, origin="private"
        )
    )
    image = catalog.small
    for path in (
        f"/v2/{image.repository}/manifests/{image.tag}",
        f"/v2/{image.repository}/blobs/{image.blobs[0].digest}",
    ):
        response = mirror.request("GET", path, {"Accept": MANIFEST_ACCEPT})
        assert response.status == 502, (path, response.status, response.body)
        assert response.header("WWW-Authenticate") is None
        assert response.error_codes() == ["UNAUTHORIZED"], response.body
        message = response.json()["errors"][0]["message"]
        assert "refused the mirror's credentials" in message, message
        assert "private" in message, message


def test_an_upstream_answering_every_request_with_a_page_is_marked_down(
    tmp_path: Path, start_program: Callable[[Any], Any], start_mirror: StartMirror
) -> None:
    """
    The finding: an upstream answering every request ``200 text/html`` (a
    captive portal) was asked every time (72 of 72) and never marked down,
    while one answering 500 was after a few.  Now, of 24 requests (blobs,
    manifests by digest and by tag, tag lists), the page counts as a
    failed answer: after ``breaker_failures`` (3) it is marked down
    (``regmirror_upstream_down`` 1, ``invalid`` errors counted) and few
    requests reach it; clients get 5xx, never the page.
    """
    from .test_hostile import HostileUpstream, Plan

    plan = Plan(tmp_path / "plan")
    plan.mode("*", mode="page")
    portal = start_program(HostileUpstream(tmp_path / "portal", plan))
    mirror = start_mirror(
        lambda port: mirror_config_upstreams(
            port,
            {"portal": {"url": portal.url, "breaker_failures": "3"}},
            origin="portal",
        )
    )
    paths = []
    for i in range(1, 7):
        paths += [
            f"/v2/test/small/blobs/sha256:{i:064x}",
            f"/v2/test/small/manifests/sha256:{i:064x}",
            f"/v2/test/small/manifests/v{i}",
            f"/v2/test/app{i}/tags/list",
        ]
    for path in paths:
        response = mirror.request("GET", path, {"Accept": MANIFEST_ACCEPT})
        assert response.status >= 500, (path, response.status)
        assert b"hotel" not in response.body
    asked = [r for r in portal.records() if r["path"].startswith("/v2/test/")]
    assert len(asked) <= 5, [r["path"] for r in asked]
    assert mirror.metric("regmirror_upstream_down", upstream="portal") == 1
    assert mirror.metric("regmirror_upstream_errors_total", kind="invalid") >= 3
