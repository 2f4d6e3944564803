"""
Pulls through the mirror with a real client (``skopeo``), checked digest by
digest against what was pushed upstream.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import MirrorProcess, RegistryProcess, Skopeo
from .images import Catalog, assert_layout_matches

pytestmark = pytest.mark.e2e


def test_pull_by_tag_single_arch(
    tmp_path: Path, catalog: Catalog, skopeo: Skopeo, mirror: MirrorProcess
) -> None:
    """A tag resolves through the mirror to the pushed manifest, config, layers."""
    image = catalog.small
    raw = skopeo.inspect_raw(mirror.host, image.reference)
    assert raw == image.root.data
    skopeo.pull(mirror.host, image.reference, tmp_path / "out", "latest")
    assert_layout_matches(tmp_path / "out", image, "latest")


def test_pull_by_digest(
    tmp_path: Path, catalog: Catalog, skopeo: Skopeo, mirror: MirrorProcess
) -> None:
    """``name@sha256:…`` is served with the exact bytes of that manifest."""
    image = catalog.small
    reference = f"{image.repository}@{image.root.digest}"
    assert skopeo.inspect_raw(mirror.host, reference) == image.root.data
    skopeo.pull(mirror.host, reference, tmp_path / "out", "pinned")
    assert_layout_matches(tmp_path / "out", image, "pinned")


def test_pull_one_word_name_maps_to_library(
    tmp_path: Path, catalog: Catalog, skopeo: Skopeo, mirror: MirrorProcess
) -> None:
    """For docker.io, ``busybox`` is fetched upstream as ``library/busybox``."""
    image = catalog.busybox
    skopeo.pull(mirror.host, "busybox:latest", tmp_path / "out", "latest")
    assert_layout_matches(tmp_path / "out", image, "latest")


def test_pull_multi_arch_index_all_platforms(
    tmp_path: Path, catalog: Catalog, skopeo: Skopeo, mirror: MirrorProcess
) -> None:
    """
    ``--all`` on an OCI index yields the index itself, both platform
    manifests and every config and layer, all with their pushed digests.
    """
    image = catalog.multi
    assert skopeo.inspect_raw(mirror.host, image.reference) == image.root.data
    skopeo.pull(
        mirror.host, image.reference, tmp_path / "out", "latest", all_platforms=True
    )
    assert_layout_matches(tmp_path / "out", image, "latest")


def test_pull_one_platform_of_multi_arch_index(
    tmp_path: Path, catalog: Catalog, skopeo: Skopeo, mirror: MirrorProcess
) -> None:
    """A client choosing one platform gets that platform's manifest and blobs."""
    image = catalog.multi
    arm64 = image.manifests[1]
    skopeo.pull(
        mirror.host,
        image.reference,
        tmp_path / "out",
        "latest",
        extra=["--override-arch", "arm64", "--override-os", "linux"],
    )
    assert_layout_matches(tmp_path / "out", image, "latest", platform_manifest=arm64)
    reference = f"{image.repository}@{arm64.digest}"
    assert skopeo.inspect_raw(mirror.host, reference) == arm64.data


def test_pull_big_layer(
    tmp_path: Path, catalog: Catalog, skopeo: Skopeo, mirror: MirrorProcess
) -> None:
    """A ~40 MiB layer streams through the mirror intact."""
    image = catalog.big
    assert image.layers[0].size > 40 * 1024 * 1024
    skopeo.pull(mirror.host, image.reference, tmp_path / "out", "latest")
    assert_layout_matches(tmp_path / "out", image, "latest")


def test_second_pull_served_from_cache_with_upstream_down(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    upstream: RegistryProcess,
    mirror: MirrorProcess,
) -> None:
    """
    Once pulled, an image can be pulled again with the upstream stopped: by
    digest from the cache, and by tag from the cached tag → digest, with a
    warning in the mirror's log.
    """
    image = catalog.small
    skopeo.pull(mirror.host, image.reference, tmp_path / "first", "latest")
    assert_layout_matches(tmp_path / "first", image, "latest")

    upstream.stop()
    assert not upstream.running

    by_digest = f"{image.repository}@{image.root.digest}"
    skopeo.pull(mirror.host, by_digest, tmp_path / "by-digest", "pinned")
    assert_layout_matches(tmp_path / "by-digest", image, "pinned")

    mark = len(mirror.log_lines())
    skopeo.pull(mirror.host, image.reference, tmp_path / "by-tag", "latest")
    assert_layout_matches(tmp_path / "by-tag", image, "latest")
    later = mirror.log_lines()[mark:]
    # twistd's text log writes "<time> [<namespace>#<level>] <message>".
    warnings = [x for x in later if "#warn]" in x and image.repository in x]
    assert warnings, "no warning logged for the stale tag:\n" + "\n".join(later)


def test_shared_layer_fetched_upstream_once(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    upstream: RegistryProcess,
    mirror: MirrorProcess,
) -> None:
    """
    Two tags sharing a layer: after pulling ``one``, pulling ``two`` takes
    the shared layer from the cache instead of fetching it upstream again.
    """
    one, two = catalog.shared_one, catalog.shared_two
    skopeo.pull(mirror.host, one.reference, tmp_path / "one", "one")
    assert_layout_matches(tmp_path / "one", one, "one")
    skopeo.pull(mirror.host, two.reference, tmp_path / "two", "two")
    assert_layout_matches(tmp_path / "two", two, "two")

    log = "\n".join(upstream.access_log())
    # Control: the counter does see the mirror's upstream GETs.
    for own_layer in (one.layers[1], two.layers[1]):
        assert upstream.count_blob_gets(own_layer.digest) == 1, log
    assert upstream.count_blob_gets(catalog.shared_layer.digest) == 1, log
