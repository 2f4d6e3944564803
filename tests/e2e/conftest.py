"""
Fixtures of the end-to-end suite.

The test images are generated and pushed once per session into a registry
storage directory.  Each test then gets its own upstream ``docker-registry``
process over that storage (so it may stop it, and its access log holds only
that test's requests) and its own mirror with an empty cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import (
    REGISTRY_BINARY,
    SKOPEO_BINARY,
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    free_port,
    mirror_config,
)
from .images import Catalog, build_catalog, write_layout


def _require_tools() -> None:
    for binary in (REGISTRY_BINARY, SKOPEO_BINARY):
        if not os.access(binary, os.X_OK):
            pytest.fail(f"{binary} is not installed: run scripts/dev test")


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return build_catalog()


@pytest.fixture(scope="session")
def skopeo(tmp_path_factory: pytest.TempPathFactory) -> Skopeo:
    _require_tools()
    return Skopeo(tmp_path_factory.mktemp("skopeo"))


@pytest.fixture(scope="session")
def seeded_storage(
    tmp_path_factory: pytest.TempPathFactory, catalog: Catalog, skopeo: Skopeo
) -> Path:
    """A registry storage directory holding every image of the catalog."""
    root = tmp_path_factory.mktemp("upstream-seed")
    storage = root / "storage"
    by_repository: dict[str, list[str]] = {}
    for image in catalog.images():
        by_repository.setdefault(image.repository, []).append(image.tag)
    registry = RegistryProcess(storage, root / "registry")
    registry.start()
    try:
        for repository, tags in by_repository.items():
            layout = root / "layouts" / repository.replace("/", "_")
            write_layout(
                layout, [i for i in catalog.images() if i.repository == repository]
            )
            for tag in tags:
                skopeo.push_layout(layout, tag, registry.host, repository)
    finally:
        registry.stop()
    return storage


@pytest.fixture
def upstream(tmp_path: Path, seeded_storage: Path) -> Iterator[RegistryProcess]:
    """A fresh registry process serving the seeded images."""
    registry = RegistryProcess(seeded_storage, tmp_path / "upstream")
    registry.start()
    yield registry
    registry.stop()


@pytest.fixture
def mirror(tmp_path: Path, upstream: RegistryProcess) -> Iterator[MirrorProcess]:
    """A running mirror, with an empty cache, in front of ``upstream``."""
    port = free_port()
    process = MirrorProcess(
        tmp_path / "mirror", mirror_config(port, upstream.url), port
    )
    process.start()
    yield process
    died = process.returncode
    process.stop()
    assert died is None, f"the mirror died during the test:\n{process.log()}"
    assert not process.unhandled_errors(), process.log()
