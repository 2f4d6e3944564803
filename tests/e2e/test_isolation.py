"""
Content stays in its namespace, end to end (issue 16, item 3): a real
``twistd regmirror`` with ``[access]`` serves the open default namespace
``docker.io`` (anonymous from 127.0.0.0/8, its own ``docker-registry``)
and a closed ``ghcr.io`` (``anonymous = none``, another
``docker-registry``).  What alice pulled through ghcr.io is cached once,
and served through docker.io only when docker.io's upstream has it too:
never to an anonymous client by digest, by any routing form, GET or HEAD,
whole or a range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    GHCR_HOST,
    MirrorProcess,
    RegistryProcess,
    Response,
    Skopeo,
    mirror_config_namespaces,
)
from .images import MANIFEST_ACCEPT, Catalog, ghcr_app
from .test_access import ALICE, ALICE_PASSWORD, basic, htpasswd_line

pytestmark = pytest.mark.e2e

#: the image pulled through the closed namespace
APP = ghcr_app()
#: the Host header the open namespace answers to
HUB_HOST = "hub.mirror.test"

#: every way of naming ``org/app`` of the open default namespace
OPEN_FORMS = {
    "bare": ("org/app", "", {}),
    "prefix": ("docker.io/org/app", "", {}),
    "alias": ("index.docker.io/org/app", "", {}),
    "ns": ("org/app", "?ns=docker.io", {}),
    "host": ("org/app", "", {"Host": HUB_HOST}),
}


@dataclass(frozen=True)
class Closed:
    """The mirror, its upstreams, and how far their access logs were."""

    mirror: MirrorProcess
    hub: RegistryProcess
    ghcr: RegistryProcess

    def ask(
        self,
        method: str,
        form: str,
        endpoint: str,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """An anonymous request for *endpoint* of ``org/app`` in docker.io."""
        name, query, extra = OPEN_FORMS[form]
        sent = {"Accept": MANIFEST_ACCEPT, **extra, **(headers or {})}
        return self.mirror.request(method, f"/v2/{name}/{endpoint}{query}", sent)

    def pull_closed(self) -> None:
        """alice pulls ``ghcr.io/org/app:v1``: manifest, config, layer."""
        alice = {"Accept": MANIFEST_ACCEPT, **basic(ALICE, ALICE_PASSWORD)}
        manifest = self.mirror.request("GET", "/v2/ghcr.io/org/app/manifests/v1", alice)
        assert manifest.status == 200, manifest.body
        assert manifest.body == APP.root.data
        for blob in APP.blobs:
            got = self.mirror.request(
                "GET", f"/v2/ghcr.io/org/app/blobs/{blob.digest}", alice
            )
            assert got.status == 200 and got.body == blob.data


def closed_config(port: int, hub: str, ghcr: str) -> str:
    """docker.io open to 127.0.0.0/8, ghcr.io closed, alice a user."""
    return mirror_config_namespaces(
        port,
        {"hub": {"url": hub}, "ghcr": {"url": ghcr}},
        {
            "docker.io": {
                "upstreams": "hub",
                "origin": "hub",
                "default": "true",
                "aliases": "index.docker.io",
                "hosts": HUB_HOST,
            },
            "ghcr.io": {
                "upstreams": "ghcr",
                "origin": "ghcr",
                "hosts": GHCR_HOST,
                "anonymous": "none",
            },
        },
    ) + ("\n[access]\nanonymous = 127.0.0.0/8\nhtpasswd = users.htpasswd\n")


@pytest.fixture
def closed(
    tmp_path: Path,
    skopeo: Skopeo,
    start_registry: Callable[..., RegistryProcess],
    start_mirror: Callable[..., MirrorProcess],
) -> Closed:
    hub = start_registry(storage=tmp_path / "hub-storage")
    ghcr = start_registry(storage=tmp_path / "ghcr-storage")
    skopeo.push_images(ghcr.host, [APP], tmp_path / "ghcr-push")
    mirror = start_mirror(
        lambda port: closed_config(port, hub.url, ghcr.url),
        files={"users.htpasswd": htpasswd_line(ALICE, ALICE_PASSWORD)},
    )
    return Closed(mirror, hub, ghcr)


@pytest.mark.parametrize("form", list(OPEN_FORMS))
def test_what_a_closed_namespace_cached_is_not_served_through_the_open_one(
    closed: Closed, form: str
) -> None:
    """
    The finding: after alice pulled ``ghcr.io/org/app:v1``, an anonymous
    client asking docker.io (bare name, prefix, alias, ``?ns=``, Host) for
    its manifest by digest, its config and its layer, with GET, HEAD and a
    Range, gets 404 (MANIFEST_UNKNOWN, BLOB_UNKNOWN), because docker.io's
    upstream, which is asked, does not have them; ghcr.io's upstream is
    asked nothing more, and the cache still holds each blob once.
    """
    c = closed
    c.pull_closed()
    cached = c.mirror.cached_blobs()
    ghcr_seen = len(c.ghcr.access_log())
    hub_seen = len(c.hub.access_log())
    manifest = f"manifests/{APP.root.digest}"
    for method in ("GET", "HEAD"):
        answer = c.ask(method, form, manifest)
        assert answer.status == 404, (method, answer.status, answer.body)
        for blob in APP.blobs:
            answer = c.ask(method, form, f"blobs/{blob.digest}")
            assert answer.status == 404, (method, blob.digest, answer.status)
    answer = c.ask("GET", form, manifest)
    assert answer.error_codes() == ["MANIFEST_UNKNOWN"]
    layer = APP.layers[0]
    ranged = c.ask("GET", form, f"blobs/{layer.digest}", {"Range": "bytes=0-9"})
    assert ranged.status == 404, ranged.body
    assert ranged.error_codes() == ["BLOB_UNKNOWN"]

    asked = c.hub.access_log()[hub_seen:]
    assert any(APP.root.digest in line for line in asked), asked
    assert any(layer.digest in line for line in asked), asked
    assert len(c.ghcr.access_log()) == ghcr_seen
    assert c.mirror.cached_blobs() == cached


def test_content_both_upstreams_have_is_served_from_one_copy_once_vouched_for(
    closed: Closed, skopeo: Skopeo, tmp_path: Path
) -> None:
    """
    When docker.io's upstream has the image too, an anonymous client gets
    it through docker.io from the copy alice's pull cached: one HEAD of
    the manifest to docker.io's upstream (its layers then need none, the
    manifest vouching for them), no blob fetched twice; and after a
    restart the record holds, nothing is asked again.
    """
    c = closed
    skopeo.push_images(c.hub.host, [APP], tmp_path / "hub-push")
    c.pull_closed()
    cached = c.mirror.cached_blobs()
    hub_seen = len(c.hub.access_log())

    def pull_open() -> None:
        manifest = c.ask("GET", "bare", f"manifests/{APP.root.digest}")
        assert manifest.status == 200 and manifest.body == APP.root.data
        for blob in APP.blobs:
            for method in ("HEAD", "GET"):
                got = c.ask(method, "bare", f"blobs/{blob.digest}")
                assert got.status == 200, (method, got.body)
                assert got.header("Content-Length") == str(blob.size)
                if method == "GET":
                    assert got.body == blob.data
        ranged = c.ask(
            "GET", "ns", f"blobs/{APP.layers[0].digest}", {"Range": "bytes=1-4"}
        )
        assert ranged.status == 206 and ranged.body == APP.layers[0].data[1:5]

    pull_open()
    asked = c.hub.access_log()[hub_seen:]
    assert len(asked) == 1, asked
    assert f'"HEAD /v2/org/app/manifests/{APP.root.digest}' in asked[0], asked
    assert c.mirror.cached_blobs() == cached

    c.mirror.stop()
    c.mirror.start()
    hub_seen = len(c.hub.access_log())
    pull_open()
    assert c.hub.access_log()[hub_seen:] == []


#: every way of naming ``test/small`` of the closed namespace
CLOSED_FORMS = {
    "prefix": ("ghcr.io/test/small", "", {}),
    "ns": ("test/small", "?ns=ghcr.io", {}),
    "host": ("test/small", "", {"Host": GHCR_HOST}),
}


def test_what_the_open_namespace_cached_is_not_served_through_the_closed_one(
    closed: Closed, skopeo: Skopeo, catalog: Catalog, tmp_path: Path
) -> None:
    """
    The other way round: ``test/small``, pulled anonymously through
    docker.io, is not served to alice through ghcr.io (prefix, ``?ns=``,
    Host; manifest by digest and blobs, GET and HEAD), whose upstream does
    not have it and is asked: 404, nothing fetched again from docker.io's.
    """
    c = closed
    small = catalog.small
    skopeo.push_images(c.hub.host, [small], tmp_path / "hub-push")
    manifest = c.mirror.request(
        "GET", "/v2/test/small/manifests/latest", {"Accept": MANIFEST_ACCEPT}
    )
    assert manifest.status == 200 and manifest.body == small.root.data
    for blob in small.blobs:
        got = c.mirror.request("GET", f"/v2/test/small/blobs/{blob.digest}")
        assert got.status == 200 and got.body == blob.data
    hub_seen = len(c.hub.access_log())
    ghcr_seen = len(c.ghcr.access_log())
    alice = {"Accept": MANIFEST_ACCEPT, **basic(ALICE, ALICE_PASSWORD)}
    for form, (name, query, extra) in CLOSED_FORMS.items():
        for method in ("GET", "HEAD"):
            for endpoint in (
                f"manifests/{small.root.digest}",
                *(f"blobs/{blob.digest}" for blob in small.blobs),
            ):
                answer = c.mirror.request(
                    method, f"/v2/{name}/{endpoint}{query}", {**alice, **extra}
                )
                assert answer.status == 404, (form, method, endpoint, answer.status)
    asked = c.ghcr.access_log()[ghcr_seen:]
    assert any(small.root.digest in line for line in asked), asked
    assert len(c.hub.access_log()) == hub_seen


#: HEAD answers of a portal or a site's fallback, by the open repository
#: that gets them: none is a registry's answer for a digest
PORTAL_HEADS = {
    "open/html": (200, {"Content-Type": "text/html", "Content-Length": "1234"}),
    "open/bare": (200, {}),
    "open/zero": (200, {"Content-Type": "application/octet-stream"}),
    "open/nocontent": (204, {}),
    "open/partial": (
        206,
        {
            "Content-Type": "application/octet-stream",
            "Content-Range": "bytes 0-0/1",
            "Content-Length": "1",
        },
    ),
}


def test_a_portal_answering_every_head_does_not_open_the_closed_namespace(
    tmp_path: Path,
    start_program: Callable[[Any], Any],
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    The finding: an open namespace whose upstream answers every ``HEAD``
    with a 2xx (``200 text/html``, ``200`` with no headers or no length,
    ``204``, ``206 bytes 0-0/1``) made it vouch for what alice pulled
    through the closed one, and serve it anonymously.  Now each is asked
    (its ``HEAD`` reaches the upstream) and each is a 404, for the
    manifest by digest and every blob, GET and HEAD, asked twice (nothing
    recorded); the closed namespace still serves alice.
    """
    from .test_hostile import HostileUpstream, Plan

    plan = Plan(tmp_path / "plan")
    plan.image(APP, "org/app")
    for repository, (status, headers) in PORTAL_HEADS.items():
        plan.mode(repository, mode="head", status=status, headers=headers)
    hostile = start_program(HostileUpstream(tmp_path / "hostile", plan))
    mirror = start_mirror(
        lambda port: (
            mirror_config_namespaces(
                port,
                {
                    "private": {"url": hostile.url},
                    # Never marked down, so that every request is checked.
                    "portal": {"url": hostile.url, "breaker_failures": "1000"},
                },
                {
                    "docker.io": {
                        "upstreams": "portal",
                        "origin": "portal",
                        "default": "true",
                        "prefetch": "0",
                    },
                    "ghcr.io": {
                        "upstreams": "private",
                        "origin": "private",
                        "hosts": GHCR_HOST,
                        "anonymous": "none",
                        "prefetch": "0",
                    },
                },
            )
            + "\n[access]\nanonymous = 127.0.0.0/8\nhtpasswd = users.htpasswd\n"
        ),
        files={"users.htpasswd": htpasswd_line(ALICE, ALICE_PASSWORD)},
    )
    alice = {"Accept": MANIFEST_ACCEPT, **basic(ALICE, ALICE_PASSWORD)}

    def pull_closed() -> None:
        manifest = mirror.request("GET", "/v2/ghcr.io/org/app/manifests/v1", alice)
        assert manifest.status == 200 and manifest.body == APP.root.data
        for blob in APP.blobs:
            got = mirror.request(
                "GET", f"/v2/ghcr.io/org/app/blobs/{blob.digest}", alice
            )
            assert got.status == 200 and got.body == blob.data

    pull_closed()
    cached = mirror.cached_blobs()
    endpoints = [
        f"manifests/{APP.root.digest}",
        *(f"blobs/{blob.digest}" for blob in APP.blobs),
    ]
    for repository in PORTAL_HEADS:
        for _ in range(2):
            for method in ("GET", "HEAD"):
                for endpoint in endpoints:
                    answer = mirror.request(
                        method,
                        f"/v2/{repository}/{endpoint}",
                        {"Accept": MANIFEST_ACCEPT},
                    )
                    assert answer.status == 404, (repository, method, endpoint)
        asked = hostile.requests_for(f"/v2/{repository}/", method="HEAD")
        assert asked, repository
        assert hostile.requests_for(f"/v2/{repository}/", method="GET") == []
    assert mirror.cached_blobs() == cached
    pull_closed()
