"""
``[namespace:NAME] allow`` and ``deny``, end to end (issue 18, item 4): a
real ``twistd regmirror`` whose docker.io (``allow = library/*``, ``deny =
*/*-debug``) is served by its own ``docker-registry`` holding
``library/app``, ``library/app-debug`` and ``library/other``, the three
sharing a base layer.  A refused repository is 403 DENIED naming the rule,
however it is spelled or routed, and the upstream is never asked for it;
content that another repository brought into the cache (``library/other``,
or ``library/app-debug`` before the rules) is not served through
``library/app`` by digest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import (
    MirrorProcess,
    RegistryProcess,
    Response,
    Skopeo,
    free_port,
    mirror_config_namespaces,
)
from .images import MANIFEST_ACCEPT, Image, gzip_layer, single_arch_image

pytestmark = pytest.mark.e2e

BASE = gzip_layer({"etc/base.txt": b"the layer every image here shares\n" * 64})
APP = single_arch_image("library/app", "v1", [BASE, gzip_layer({"app": b"app\n"})])
DEBUG = single_arch_image(
    "library/app-debug", "v1", [BASE, gzip_layer({"app.debug": b"symbols\n" * 99})]
)
OTHER = single_arch_image(
    "library/other", "v1", [BASE, gzip_layer({"other": b"another image\n"})]
)
#: the layer only ``library/app-debug`` has, and only ``library/other``
DEBUG_ONLY, OTHER_ONLY = DEBUG.layers[1], OTHER.layers[1]
HUB_HOST = "hub.mirror.test"
DENY_RULE = "library/app-debug is refused by [namespace:docker.io] deny = */*-debug"


def config(port: int, hub: str, cache: Path, *, rules: bool = True) -> str:
    """docker.io over *hub*, its cache in *cache*, with the rules or not;
    nothing pulled ahead (the upstream sees only what clients ask for)."""
    docker = {
        "upstreams": "hub",
        "origin": "hub",
        "default": "true",
        "aliases": "index.docker.io",
        "hosts": HUB_HOST,
        "prefetch": "0",
    }
    if rules:
        docker.update({"allow": "library/*", "deny": "*/*-debug"})
    text = mirror_config_namespaces(port, {"hub": {"url": hub}}, {"docker.io": docker})
    return text.replace("directory = cache", f"directory = {cache}")


@dataclass(frozen=True)
class Ruled:
    mirror: MirrorProcess
    hub: RegistryProcess
    #: how many lines the hub's access log had once the mirror started
    seen: int

    def get(
        self, path: str, headers: Mapping[str, str] | None = None, method: str = "GET"
    ) -> Response:
        sent = {"Accept": MANIFEST_ACCEPT, **(headers or {})}
        return self.mirror.request(method, path, sent)

    def asked(self) -> list[str]:
        """The hub's access log since the mirror started."""
        return self.hub.access_log()[self.seen :]


def pull_by_http(mirror: MirrorProcess, image: Image) -> None:
    """The manifest and every blob of *image* through *mirror*."""
    headers = {"Accept": MANIFEST_ACCEPT}
    path = f"/v2/{image.repository}"
    got = mirror.request("GET", f"{path}/manifests/{image.tag}", headers)
    assert got.status == 200 and got.body == image.root.data, got.body
    for blob in image.blobs:
        got = mirror.request("GET", f"{path}/blobs/{blob.digest}", headers)
        assert got.status == 200 and got.body == blob.data, got.body


@pytest.fixture
def ruled(
    tmp_path: Path,
    skopeo: Skopeo,
    start_registry: Callable[..., RegistryProcess],
    start_mirror: Callable[..., MirrorProcess],
) -> Ruled:
    """
    The hub with the three images; a mirror without rules pulled
    ``library/app-debug`` and ``library/other`` into the cache and was
    stopped; the mirror with the rules runs over that cache.
    """
    hub = start_registry(storage=tmp_path / "hub-storage")
    skopeo.push_images(hub.host, [APP, DEBUG, OTHER], tmp_path / "push")
    cache = tmp_path / "cache"
    port = free_port()
    before = MirrorProcess(
        tmp_path / "before", config(port, hub.url, cache, rules=False), port
    )
    before.start()
    try:
        pull_by_http(before, DEBUG)
        pull_by_http(before, OTHER)
    finally:
        before.stop()
    assert not before.unhandled_errors(), before.log()
    mirror = start_mirror(lambda port: config(port, hub.url, cache))
    return Ruled(mirror, hub, len(hub.access_log()))


def denied(response: Response) -> str:
    assert response.status == 403, response.body
    assert response.error_codes() == ["DENIED"]
    message: str = response.json()["errors"][0]["message"]
    return message


def test_an_allowed_image_is_pulled_and_a_denied_one_refused_unasked(
    ruled: Ruled, skopeo: Skopeo, tmp_path: Path
) -> None:
    """
    skopeo pulls ``library/app:v1``; it cannot pull ``library/app-debug:v1``
    (the mirror's 403 names the rule).  The denied repository's manifest
    by tag and by digest, its blobs, its tag list and its referrers, GET
    and HEAD, are 403 DENIED naming the rule, though its content is
    cached; ``test/small`` is refused by ``allow``.  The hub's access log
    has no request for either.
    """
    skopeo.pull(ruled.mirror.host, APP.reference, tmp_path / "app", "v1")
    with pytest.raises(AssertionError, match="refused by"):
        skopeo.pull(ruled.mirror.host, DEBUG.reference, tmp_path / "debug", "v1")
    for endpoint in (
        "manifests/v1",
        f"manifests/{DEBUG.root.digest}",
        f"blobs/{DEBUG_ONLY.digest}",
        f"blobs/{BASE.digest}",
        "tags/list",
        f"referrers/{DEBUG.root.digest}",
    ):
        got = ruled.get(f"/v2/library/app-debug/{endpoint}")
        assert denied(got) == DENY_RULE, endpoint
        head = ruled.get(f"/v2/library/app-debug/{endpoint}", method="HEAD")
        assert head.status == 403, endpoint
    small = ruled.get("/v2/test/small/manifests/latest")
    assert denied(small) == (
        "test/small is refused by [namespace:docker.io] allow = library/* "
        "(it matches none of them)"
    )
    asked = ruled.asked()
    assert any("/v2/library/app/manifests/v1" in line for line in asked), asked
    assert not [line for line in asked if "app-debug" in line or "small" in line]


#: every routing of ``library/app-debug`` to docker.io
ROUTED = {
    "bare one-word name": ("/v2/app-debug/manifests/v1", {}),
    "bare": ("/v2/library/app-debug/manifests/v1", {}),
    "prefix": ("/v2/docker.io/library/app-debug/manifests/v1", {}),
    "prefix, one word": ("/v2/docker.io/app-debug/manifests/v1", {}),
    "alias": ("/v2/index.docker.io/app-debug/manifests/v1", {}),
    "ns": ("/v2/library/app-debug/manifests/v1?ns=docker.io", {}),
    "ns alias": ("/v2/app-debug/manifests/v1?ns=index.docker.io", {}),
    "ns and prefix": ("/v2/docker.io/app-debug/manifests/v1?ns=docker.io", {}),
    "host": ("/v2/app-debug/manifests/v1", {"Host": HUB_HOST}),
    "host, upper case": (
        f"/v2/library/app-debug/blobs/{DEBUG_ONLY.digest}",
        {"Host": HUB_HOST.upper() + "."},
    ),
}
#: spellings that are no valid name: refused before routing
INVALID = [
    "/v2/Library/App-Debug/manifests/v1",
    "/v2/library/APP-debug/manifests/v1",
    "/v2/library/app/../app-debug/manifests/v1",
    "/v2/library/app-debug/./manifests/v1",
    "/v2/library%2fapp-debug/manifests/v1",
    "/v2/library/app%2ddebug/manifests/v1",
    "/v2/library/app/%2e%2e/app-debug/manifests/v1",
    "/v2/library//app-debug/manifests/v1",
    "/v2/docker.io/../library/app-debug/manifests/v1",
]


def test_no_spelling_or_routing_reaches_a_denied_repository(ruled: Ruled) -> None:
    """
    The one-word name (``library/`` added before the rules), path prefix,
    alias, ``?ns=``, ``Host`` (any case, a trailing dot): 403 naming the
    rule; upper case, ``..``, ``.``, encoded slashes and letters, empty
    components: 400 NAME_INVALID.  No request for ``app-debug`` upstream.
    """
    for form, (path, headers) in ROUTED.items():
        assert denied(ruled.get(path, headers)) == DENY_RULE, form
    for path in INVALID:
        got = ruled.get(path)
        assert got.status == 400, (path, got.body)
        assert got.error_codes() == ["NAME_INVALID"], path
    assert not [line for line in ruled.asked() if "debug" in line]


def test_content_of_other_repositories_is_not_served_through_an_allowed_one(
    ruled: Ruled,
) -> None:
    """
    The digest walk-around: through ``library/app``, the layer only
    ``library/app-debug`` has (cached before the rules) and the layer only
    ``library/other`` has (allowed, cached) are 404 BLOB_UNKNOWN, their
    manifests by digest 404 MANIFEST_UNKNOWN: the hub is asked about
    ``library/app`` (``HEAD``), which holds none of them; the base layer
    all three share is served from the cache once the hub confirms
    ``library/app`` has it.  Nothing is downloaded, ``app-debug`` never
    asked.
    """
    cached = ruled.mirror.cached_blobs()
    for layer in (DEBUG_ONLY, OTHER_ONLY):
        for method in ("GET", "HEAD"):
            got = ruled.get(f"/v2/library/app/blobs/{layer.digest}", method=method)
            assert got.status == 404, (method, got.body)
            if method == "GET":
                assert got.error_codes() == ["BLOB_UNKNOWN"]
    for image in (DEBUG, OTHER):
        got = ruled.get(f"/v2/library/app/manifests/{image.root.digest}")
        assert got.status == 404, got.body
        assert got.error_codes() == ["MANIFEST_UNKNOWN"]
    shared = ruled.get(f"/v2/library/app/blobs/{BASE.digest}")
    assert shared.status == 200 and shared.body == BASE.data
    asked = ruled.asked()
    assert not [line for line in asked if "app-debug" in line], asked
    assert not [line for line in asked if '"GET ' in line and "/blobs/" in line]
    assert ruled.hub.count_requests(
        "HEAD", rf"/v2/library/app/blobs/{DEBUG_ONLY.digest}"
    ), asked
    assert ruled.mirror.cached_blobs() == cached


def test_regmirror_prefetch_does_not_fetch_a_denied_image(ruled: Ruled) -> None:
    """``regmirror prefetch`` through the running mirror and with ``-c`` (a
    mirror of its own in the process): the image fails, naming the rule;
    the hub is asked nothing for it."""
    for where in (
        ("--mirror", f"http://{ruled.mirror.host}"),
        ("-c", str(ruled.mirror.config_path)),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "regmirror.cli", "prefetch", *where, "app-debug:v1"],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ),
        )
        assert done.returncode == 1, done
        assert DENY_RULE in done.stderr, done.stderr
    assert not [line for line in ruled.asked() if "debug" in line]
