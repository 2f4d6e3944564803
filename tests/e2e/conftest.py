"""
Fixtures of the end-to-end suite.

The test images are generated and pushed once per session into a registry
storage directory.  Each test then gets its own upstream ``docker-registry``
process over that storage (so it may stop it, and its access log holds only
that test's requests) and its own mirror with an empty cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from .engines import (
    CEPH_BINARIES,
    REDIS_BINARIES,
    CephRGW,
    RedisServer,
    missing_engines,
)
from .harness import (
    LOCALHOST,
    REGISTRY_BINARY,
    SKOPEO_BINARY,
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    TwoNamespaces,
    free_port,
    mirror_config,
    two_namespace_config,
)
from .images import Catalog, build_catalog, ghcr_app, write_layout
from .servers import ProgramProcess, write_certificate

ProgramProcessT = TypeVar("ProgramProcessT", bound=ProgramProcess)


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


@pytest.fixture(scope="session")
def small_layout(tmp_path_factory: pytest.TempPathFactory, catalog: Catalog) -> Path:
    """``catalog.small`` as an OCI layout, for servers that read layouts."""
    layout = tmp_path_factory.mktemp("small-layout") / "layout"
    write_layout(layout, [catalog.small])
    return layout


@pytest.fixture(scope="session")
def big_layout(tmp_path_factory: pytest.TempPathFactory, catalog: Catalog) -> Path:
    """``catalog.big`` (one ~40 MiB layer) as an OCI layout."""
    layout = tmp_path_factory.mktemp("big-layout") / "layout"
    write_layout(layout, [catalog.big])
    return layout


@pytest.fixture
def start_registry(
    tmp_path: Path, seeded_storage: Path
) -> Iterator[Callable[..., RegistryProcess]]:
    """
    Start more ``docker-registry`` processes over the seeded images, with
    the keyword arguments of :class:`RegistryProcess` (``auth``, ``tls``),
    or over another storage folder given as ``storage``; all stopped at
    teardown.
    """
    started: list[RegistryProcess] = []

    def start(storage: Path | None = None, **options: Any) -> RegistryProcess:
        registry = RegistryProcess(
            seeded_storage if storage is None else storage,
            tmp_path / f"registry-{len(started)}",
            **options,
        )
        started.append(registry)
        registry.start()
        return registry

    yield start
    for registry in started:
        registry.stop()


@pytest.fixture
def start_program() -> Iterator[Callable[[ProgramProcessT], ProgramProcessT]]:
    """Start a helper program of :mod:`servers`; all stopped at teardown."""
    started: list[ProgramProcess] = []

    def start(program: ProgramProcessT) -> ProgramProcessT:
        started.append(program)
        program.start()
        return program

    yield start
    for program in started:
        program.stop()


@pytest.fixture
def start_mirror(tmp_path: Path) -> Iterator[Callable[..., MirrorProcess]]:
    """
    Start mirrors: ``start(config, env=..., files=...)`` where *config* makes
    the INI text from the port, *env* is added to the mirror's environment
    and *files* (relative path → text or bytes) are written into the mirror's folder
    (the config file's folder) first; *logger*: twistd's ``--logger``.  At
    teardown every mirror is stopped, and must not have died nor logged an
    unhandled error.
    """
    started: list[MirrorProcess] = []

    def start(
        config: Callable[[int], str],
        *,
        env: Mapping[str, str] | None = None,
        files: Mapping[str, str | bytes] | None = None,
        logger: str | None = None,
    ) -> MirrorProcess:
        port = free_port()
        workdir = tmp_path / f"mirror-{len(started)}"
        for relative, content in (files or {}).items():
            path = workdir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        process = MirrorProcess(workdir, config(port), port, env=env, logger=logger)
        started.append(process)
        process.start()
        return process

    yield start
    problems = []
    for process in started:
        died = process.returncode
        process.stop()
        if died is not None:
            problems.append(f"a mirror died during the test:\n{process.log()}")
        elif process.unhandled_errors():
            problems.append(f"a mirror logged unhandled errors:\n{process.log()}")
    assert not problems, "\n".join(problems)


@pytest.fixture
def two_namespaces(
    tmp_path: Path,
    skopeo: Skopeo,
    upstream: RegistryProcess,
    start_registry: Callable[..., RegistryProcess],
    start_mirror: Callable[..., MirrorProcess],
) -> TwoNamespaces:
    """
    A mirror serving docker.io (default; ``upstream``, the seeded catalog)
    and ghcr.io (a registry of its own holding only ``ghcr_app()``).
    """
    ghcr = start_registry(storage=tmp_path / "ghcr-storage")
    skopeo.push_images(ghcr.host, [ghcr_app()], tmp_path / "ghcr-push")
    mirror = start_mirror(
        lambda port: two_namespace_config(port, upstream.url, ghcr.url)
    )
    return TwoNamespaces(
        mirror, upstream, ghcr, len(upstream.access_log()), len(ghcr.access_log())
    )


# -- the cluster's engines -------------------------------------------------------


def _require_engines(binaries: tuple[str, ...]) -> None:
    missing = missing_engines(binaries)
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)}: run scripts/dev test")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` for the whole run; use :func:`redis` in tests."""
    _require_engines(REDIS_BINARIES)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """
    The session's Redis, running (started again if an earlier test stopped
    it) and empty (FLUSHALL).
    """
    if not redis_server.running:
        redis_server.start()
    redis_server.flushall()
    return redis_server


@pytest.fixture(scope="session")
def ceph_rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephRGW]:
    """
    One single-node Ceph RGW (S3 on ``ceph_rgw.endpoint``) for the whole
    run; each test takes its own bucket with :func:`s3_bucket`.
    """
    _require_engines(CEPH_BINARIES)
    rgw = CephRGW(tmp_path_factory.mktemp("ceph-rgw"))
    rgw.start()
    yield rgw
    rgw.stop()


@pytest.fixture
def s3_bucket(ceph_rgw: CephRGW) -> str:
    """The name of a new, empty bucket of the session's RGW."""
    if not ceph_rgw.running:
        pytest.fail(f"the session's Ceph RGW is down:\n{ceph_rgw.log_tail()}")
    return ceph_rgw.make_bucket()


@pytest.fixture
def tls_mirror(
    tmp_path: Path, upstream: RegistryProcess
) -> Iterator[tuple[MirrorProcess, int]]:
    """A mirror with a plain listener and an ``ssl:`` one whose certificate
    files are named relative to the config file's folder."""
    workdir = tmp_path / "mirror"
    write_certificate(workdir)
    plain, secure = free_port(), free_port()
    config = mirror_config(plain, upstream.url).replace(
        f"listen = tcp:{plain}:interface={LOCALHOST}",
        f"listen = tcp:{plain}:interface={LOCALHOST}\n"
        f"    ssl:{secure}:privateKey=key.pem:certKey=cert.pem:interface={LOCALHOST}",
    )
    process = MirrorProcess(workdir, config, plain)
    process.start()
    yield process, secure
    process.stop()
