"""
Mirrors of mirrors (issue 21), end to end: an office regmirror (the edge)
whose upstreams are a regional regmirror (the hq), reached through a path
prefix for ghcr.io (``url = http://hq/ghcr.io``) and through ``ns`` for
quay.io (``url = http://hq``, ``ns = quay.io``); the hq serves each
namespace from a ``docker-registry`` of its own, and only to users (the
edge logs in).  skopeo and containerd's ``ctr`` pull through the edge.
Nothing pulls ahead, so the access logs show what the clients' requests
cost.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest

from .daemons import ContainerdProcess
from .harness import (
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    http_request,
    mirror_config_namespaces,
)
from .images import Catalog, assert_layout_matches
from .test_clients import (  # noqa: F401  (fixtures)
    containerd,
    daemons_folder,
)

#: containerd's tests run one at a time on one xdist worker (see test_clients)
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("daemons")]

#: cold clients of one blob at the edge at once
CLIENTS = 20
#: the edge's account at the hq
EDGE, EDGE_PASSWORD = "edge", "pw-edge-4f1d9b0e-harbour"


def _hq_config(port: int, ghcr: RegistryProcess, quay: RegistryProcess) -> str:
    namespaces = mirror_config_namespaces(
        port,
        {"ghcr-origin": {"url": ghcr.url}, "quay-origin": {"url": quay.url}},
        {
            "docker.io": {
                "upstreams": "ghcr-origin",
                "default": "true",
                "prefetch": "0",
            },
            "ghcr.io": {"upstreams": "ghcr-origin", "prefetch": "0"},
            "quay.io": {"upstreams": "quay-origin", "prefetch": "0"},
        },
    )
    # Closed: the edge logs in, so its tokens come from the hq's challenges.
    return f"{namespaces}\n[access]\nanonymous = none\nhtpasswd = users.htpasswd\n"


def _edge_config(port: int, hq: MirrorProcess) -> str:
    return mirror_config_namespaces(
        port,
        {
            name: {**keys, "username": EDGE, "password": EDGE_PASSWORD}
            for name, keys in {
                "hq": {"url": f"http://{hq.host}"},
                "hq-ghcr": {"url": f"http://{hq.host}/ghcr.io/"},
                "hq-quay": {"url": f"http://{hq.host}", "ns": "quay.io"},
            }.items()
        },
        {
            "docker.io": {"upstreams": "hq", "default": "true", "prefetch": "0"},
            "ghcr.io": {"upstreams": "hq-ghcr", "prefetch": "0"},
            "quay.io": {"upstreams": "hq-quay", "prefetch": "0"},
        },
    )


def _requests(
    mirror: MirrorProcess, method: str, target: str, status: str = "[0-9]+"
) -> list[str]:
    """The mirror's access-log lines for *method* of exactly *target* (a
    regular expression of path and query) answered with *status*."""
    line = re.compile(rf'"{method} {target} HTTP/1\.1" {status} ')
    return [entry for entry in mirror.log_lines() if line.search(entry)]


def _hosts_toml(folder: Path, registry: str, mirror: MirrorProcess) -> None:
    (folder / registry).mkdir(parents=True, exist_ok=True)
    (folder / registry / "hosts.toml").write_text(
        f'server = "https://{registry}"\n\n'
        f'[host."http://{mirror.host}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


def test_an_edge_regmirror_pulls_through_a_regional_one_by_prefix_and_ns(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    daemons_folder: Path,  # noqa: F811
    containerd: ContainerdProcess,  # noqa: F811
    start_registry: Callable[..., RegistryProcess],
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    Through the edge: skopeo copies ``ghcr.io/test/small:latest`` and the
    whole multi-arch index ``quay.io/test/multi:latest``, byte for byte;
    the hq is asked ``/v2/ghcr.io/test/small/...`` and
    ``/v2/test/multi/...?ns=quay.io`` and each origin registry only its
    own; the edge's token requests carry the scope and realm of the hq's
    challenges (``ghcr.io/test/small``; ``/token?ns=quay.io``).  20 cold
    clients of one blob at the edge at once cost one GET at the hq and one
    at the origin registry.  ``ctr images pull`` (which asks the edge with
    ``?ns=``) brings an image of each namespace.
    """
    ghcr, quay = start_registry(), start_registry()
    hashed = bcrypt.hashpw(EDGE_PASSWORD.encode(), bcrypt.gensalt(rounds=4))
    hq = start_mirror(
        lambda port: _hq_config(port, ghcr, quay),
        files={"users.htpasswd": f"{EDGE}:{hashed.decode()}\n"},
    )
    edge = start_mirror(lambda port: _edge_config(port, hq))

    small, multi = catalog.small, catalog.multi
    skopeo.pull(edge.host, f"ghcr.io/{small.reference}", tmp_path / "small", "latest")
    assert_layout_matches(tmp_path / "small", small, "latest")
    skopeo.pull(
        edge.host,
        f"quay.io/{multi.reference}",
        tmp_path / "multi",
        "latest",
        all_platforms=True,
    )
    assert_layout_matches(tmp_path / "multi", multi, "latest")

    assert _requests(hq, "HEAD", r"/v2/ghcr\.io/test/small/manifests/latest")
    assert _requests(
        hq, "GET", rf"/v2/ghcr\.io/test/small/blobs/{small.layers[0].digest}"
    )
    assert _requests(hq, "HEAD", r"/v2/test/multi/manifests/latest\?ns=quay\.io")
    for child in multi.manifests:
        assert _requests(
            hq, "GET", rf"/v2/test/multi/manifests/{child.digest}\?ns=quay\.io"
        )
    # The hq's challenges named the repository as the edge asked for it,
    # and its realm the route (?ns=): the edge's token requests say so.
    scope = "scope=repository%3A{}%3Apull"
    assert _requests(
        hq, "GET", r"/token\?service=\S*" + scope.format(r"ghcr\.io%2Ftest%2Fsmall")
    )
    assert _requests(
        hq, "GET", r"/token\?ns=quay\.io&service=\S*" + scope.format("test%2Fmulti")
    )
    assert not _requests(hq, "(?:GET|HEAD)", r"/v2/quay\.io/\S*")
    assert not _requests(hq, "(?:GET|HEAD)", r"/v2/\S*small\S*\?ns=\S*")
    assert ghcr.count_requests("HEAD", "/v2/test/small/manifests/latest") >= 1
    assert quay.count_requests("HEAD", "/v2/test/multi/manifests/latest") >= 1
    assert not [line for line in ghcr.access_log() if "test/multi" in line]
    assert not [line for line in quay.access_log() if "test/small" in line]

    # One blob no one asked for yet, by 20 clients at once.
    shared = catalog.shared_layer
    barrier = threading.Barrier(CLIENTS, timeout=30)

    def fetch(_: int) -> tuple[int, bytes]:
        barrier.wait()
        response = http_request(
            edge.port,
            "GET",
            f"/v2/ghcr.io/test/shared/blobs/{shared.digest}",
            timeout=30,
        )
        return response.status, response.body

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(fetch, range(CLIENTS)))
    assert answers == [(200, shared.data)] * CLIENTS
    blob_at_hq = rf"/v2/ghcr\.io/test/shared/blobs/{shared.digest}"
    # The edge had no token for test/shared yet: a 401 before the one GET.
    assert len(_requests(hq, "GET", blob_at_hq, "200")) == 1, hq.log()
    assert len(_requests(hq, "GET", blob_at_hq, "401")) <= 1, hq.log()
    assert ghcr.count_blob_gets(shared.digest) == 1
    assert quay.count_blob_gets(shared.digest) == 0

    hosts = daemons_folder / "certs.d"
    _hosts_toml(hosts, "ghcr.io", edge)
    _hosts_toml(hosts, "quay.io", edge)
    busybox, one = catalog.busybox, catalog.shared_one
    pulls = {
        "ghcr.io/library/busybox:latest": busybox,
        "quay.io/test/shared:one": one,
    }
    for reference in pulls:
        containerd.ctr(
            "images", "pull", "--hosts-dir", str(hosts), "--plain-http",
            "--snapshotter", "native", reference,
        )  # fmt: skip
    listing = containerd.ctr("images", "ls").stdout.splitlines()[1:]
    digests = {line.split()[0]: line.split()[2] for line in listing if line.strip()}
    for reference, image in pulls.items():
        assert digests.get(reference) == image.root.digest, listing
    assert _requests(
        edge,
        "GET",
        rf"/v2/library/busybox/manifests/{busybox.root.digest}\?ns=ghcr\.io",
    )
    assert _requests(
        hq, "GET", rf"/v2/ghcr\.io/library/busybox/manifests/{busybox.root.digest}"
    )
    assert _requests(
        hq, "GET", rf"/v2/test/shared/blobs/{one.layers[1].digest}\?ns=quay\.io"
    )
    assert ghcr.count_blob_gets(busybox.layers[0].digest) == 1
    assert quay.count_blob_gets(one.layers[1].digest) == 1
