"""
Control tests: the harness against the upstream registry alone.

If these pass and a mirror test fails, the fault is the mirror's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .harness import RegistryProcess, Skopeo
from .images import Catalog, assert_layout_matches

pytestmark = pytest.mark.e2e


def test_upstream_serves_every_seeded_image_bit_for_bit(
    tmp_path: Path, catalog: Catalog, skopeo: Skopeo, upstream: RegistryProcess
) -> None:
    """Every pushed image comes back from the registry with the same digests."""
    for number, image in enumerate(catalog.images()):
        raw = skopeo.inspect_raw(upstream.host, image.reference)
        assert raw == image.root.data, image.reference
        destination = tmp_path / f"pulled-{number}"
        skopeo.pull(
            upstream.host, image.reference, destination, image.tag, all_platforms=True
        )
        assert_layout_matches(destination, image, image.tag)


def test_upstream_access_log_counts_blob_gets(
    tmp_path: Path, catalog: Catalog, skopeo: Skopeo, upstream: RegistryProcess
) -> None:
    """The access-log counter sees each layer fetched by a pull exactly once."""
    image = catalog.shared_one
    skopeo.pull(upstream.host, image.reference, tmp_path / "one", image.tag)
    for layer in image.layers:
        assert upstream.count_blob_gets(layer.digest) == 1, upstream.access_log()
    tags = json.loads(
        skopeo.run(
            "list-tags", "--tls-verify=false", f"docker://{upstream.host}/test/shared"
        )
    )
    assert sorted(tags["Tags"]) == ["one", "two"]
