"""
Pulling ahead (issue 17, target 3) with a real ``twistd regmirror`` in
front of a real ``docker-registry``, at the default ``prefetch``: a
manifest GET alone brings the image's config and layers into the cache,
and a ``skopeo copy`` racing the mirror's prefetches costs the upstream
one GET per blob, with one process or two.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import (
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    mirror_config,
    poll_until,
)
from .images import Catalog, Image, assert_layout_matches

pytestmark = pytest.mark.e2e

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def blob_gets(upstream: RegistryProcess, image: Image) -> dict[str, int]:
    """How many GETs the upstream saw of each of *image*'s blobs."""
    return {blob.digest: upstream.count_blob_gets(blob.digest) for blob in image.blobs}


def test_a_manifest_get_alone_brings_the_image_into_the_cache(
    catalog: Catalog, upstream: RegistryProcess, mirror: MirrorProcess
) -> None:
    """
    After nothing but a GET of ``test/small``'s manifest (no blob asked
    for), its config and both layers arrive in the cache, verified, each
    fetched once from the upstream, and counted as fetched ahead.
    """
    image = catalog.small
    served = mirror.request(
        "GET", f"/v2/{image.repository}/manifests/{image.tag}", {"Accept": OCI_MANIFEST}
    )
    assert served.status == 200
    assert served.body == image.root.data
    wanted = {blob.digest for blob in image.blobs}

    def arrived() -> bool:
        return wanted <= set(mirror.cached_blobs())

    poll_until(
        arrived,
        timeout=20,
        describe=lambda: f"cached: {sorted(mirror.cached_blobs())}\n{mirror.log()}",
    )
    cached = mirror.cached_blobs()
    assert all(cached[digest] == digest for digest in wanted)
    assert blob_gets(upstream, image) == dict.fromkeys(wanted, 1)
    assert mirror.metric("regmirror_prefetch_total", result="fetched") == len(wanted)
    assert mirror.metric("regmirror_prefetch_total", result="failed") == 0


def test_a_head_or_an_index_fetches_nothing_ahead(
    catalog: Catalog, upstream: RegistryProcess, mirror: MirrorProcess
) -> None:
    """
    A HEAD of ``test/small``'s manifest and a GET of ``test/multi``'s
    index fetch none of their blobs: once busybox's manifest, asked for
    after them, has brought busybox's blobs in, the upstream has seen no
    GET of theirs.
    """
    small, multi, busybox = catalog.small, catalog.multi, catalog.busybox
    head = mirror.request(
        "HEAD",
        f"/v2/{small.repository}/manifests/{small.tag}",
        {"Accept": OCI_MANIFEST},
    )
    assert head.status == 200
    index = mirror.request(
        "GET", f"/v2/{multi.repository}/manifests/{multi.tag}", {"Accept": OCI_INDEX}
    )
    assert index.status == 200 and index.body == multi.root.data
    served = mirror.request(
        "GET",
        f"/v2/{busybox.repository}/manifests/{busybox.tag}",
        {"Accept": OCI_MANIFEST},
    )
    assert served.status == 200
    wanted = {blob.digest for blob in busybox.blobs}
    poll_until(
        lambda: wanted <= set(mirror.cached_blobs()),
        timeout=20,
        describe=lambda: f"cached: {sorted(mirror.cached_blobs())}\n{mirror.log()}",
    )
    assert set(blob_gets(upstream, small).values()) == {0}
    assert set(blob_gets(upstream, multi).values()) == {0}
    for manifest in multi.manifests:
        assert (
            upstream.count_requests("GET", rf"/v2/\S+/manifests/{manifest.digest}") == 0
        )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_pull_racing_the_prefetches_costs_one_upstream_get_per_blob(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    upstream: RegistryProcess,
    start_mirror: Callable[..., MirrorProcess],
    workers: int,
) -> None:
    """
    ``skopeo copy`` of two images (one with a ~40 MiB layer) asks for each
    blob while the mirror is already fetching it ahead, in the process
    that served the manifest or, with ``workers = 2``, maybe in the other
    (which follows it through the spool lock): the pulled layouts match
    what was pushed, and the upstream saw one GET of each blob.
    """
    mirror = start_mirror(
        lambda port: mirror_config(port, upstream.url).replace(
            "[cache]", f"workers = {workers}\n\n[cache]", 1
        )
    )
    for image in (catalog.small, catalog.big):
        destination = tmp_path / image.repository.replace("/", "_")
        skopeo.pull(mirror.host, image.reference, destination, image.tag)
        assert_layout_matches(destination, image, image.tag)
        assert blob_gets(upstream, image) == {b.digest: 1 for b in image.blobs}
    assert mirror.metric("regmirror_prefetch_total", result="failed") == 0
