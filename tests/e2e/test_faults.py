"""
Failover on faults a real registry will not produce on demand, end to end:
the fault-injecting registry (``programs/fake_upstream.py``) is the first
upstream of the namespace and a real ``docker-registry`` holding the same
images is the second, the origin.  Each pull through the mirror must give
the pushed bytes, and the cache must hold only files whose sha256 matches
their name.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    mirror_config_upstreams,
)
from .images import MANIFEST_ACCEPT, Catalog, Image, assert_layout_matches
from .servers import FakeUpstream

pytestmark = pytest.mark.e2e

StartMirror = Callable[..., MirrorProcess]
StartProgram = Callable[[FakeUpstream], FakeUpstream]

#: where ``--drop-after`` cuts the big layer's first transfer
DROP_AFTER = 8 * 1024 * 1024


@dataclass(frozen=True)
class Faulty:
    """A mirror in front of the fault injector (first) and the origin."""

    mirror: MirrorProcess
    fake: FakeUpstream
    origin: RegistryProcess

    def fake_blob_gets(self) -> list[dict[str, Any]]:
        return [
            r
            for r in self.fake.records()
            if r["method"] == "GET" and "/blobs/" in r["path"]
        ]


@pytest.fixture
def faulty(
    tmp_path: Path,
    upstream: RegistryProcess,
    start_program: StartProgram,
    start_mirror: StartMirror,
) -> Callable[..., Faulty]:
    """
    ``faulty(image, layout, upstream_keys={...}, **faults)``: start the
    fault injector serving *layout* as *image*'s repository with *faults*
    (keyword arguments of :class:`FakeUpstream`), and a mirror whose
    docker.io upstreams are ``faulty`` (with *upstream_keys*) then
    ``origin``.
    """

    def start(
        image: Image,
        layout: Path,
        *,
        upstream_keys: Mapping[str, str] | None = None,
        **faults: Any,
    ) -> Faulty:
        fake = start_program(
            FakeUpstream(
                tmp_path / "fake", images=[(image.repository, layout)], **faults
            )
        )
        mirror = start_mirror(
            lambda port: mirror_config_upstreams(
                port,
                {
                    "faulty": {"url": fake.url, **(upstream_keys or {})},
                    "origin": {"url": upstream.url},
                },
                origin="origin",
            )
        )
        return Faulty(mirror, fake, upstream)

    return start


def _pull_and_check(
    skopeo: Skopeo, setup: Faulty, image: Image, destination: Path
) -> None:
    """Pull *image* by tag through the mirror; check it and the cache."""
    skopeo.pull(setup.mirror.host, image.reference, destination, image.tag)
    assert_layout_matches(destination, image, image.tag)
    _assert_cache_sound(setup.mirror, image)


def _assert_cache_sound(mirror: MirrorProcess, image: Image) -> None:
    cached = mirror.cached_blobs()
    corrupt = {name: real for name, real in cached.items() if name != real}
    assert not corrupt, f"cached files whose content is not their name: {corrupt}"
    missing = set(image.contents()) - set(cached)
    assert not missing, f"not cached: {sorted(missing)}; cached: {sorted(cached)}"


def test_blob_cut_mid_transfer_is_resumed_with_range(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    big_layout: Path,
    faulty: Callable[..., Faulty],
) -> None:
    """
    The first upstream cuts the connection after 8 MiB of the ~40 MiB
    layer: the mirror logs ``resuming`` and carries on from where it
    stopped with a ``Range`` request to the next upstream, the origin (not
    back to the one that broke), and the client gets the whole layer,
    correct, in one pull.
    """
    image = catalog.big
    layer = image.layers[0]
    setup = faulty(image, big_layout, drop_after=DROP_AFTER)
    _pull_and_check(skopeo, setup, image, tmp_path / "out")

    resumed = setup.mirror.wait_for_log(
        rf"resuming {layer.digest} at byte \d+ from origin"
    )
    offsets = [int(m[1]) for x in resumed if (m := re.search(r"at byte (\d+)", x))]
    assert len(offsets) == 1 and 0 < offsets[0] <= DROP_AFTER, resumed
    asked = [r for r in setup.fake_blob_gets() if layer.digest in r["path"]]
    assert [r["range"] for r in asked] == [None], asked
    assert setup.origin.count_blob_gets(layer.digest) == 1


@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, "30"), (500, None)], ids=["429", "500"]
)
def test_blob_error_status_fails_over_to_next_upstream(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    small_layout: Path,
    faulty: Callable[..., Faulty],
    status: int,
    retry_after: str | None,
) -> None:
    """
    The first upstream answers its manifests but every blob request with
    ``429`` (``Retry-After: 30``) or ``500``: the pull succeeds, every blob
    coming from the next upstream (the origin).
    """
    image = catalog.small
    setup = faulty(
        image,
        small_layout,
        status=status,
        retry_after=retry_after,
        fault_path="/blobs/",
    )
    _pull_and_check(skopeo, setup, image, tmp_path / "out")

    asked = setup.fake_blob_gets()
    assert 1 <= len(asked) <= len(image.blobs), asked
    log = "\n".join(setup.origin.access_log())
    for blob in image.blobs:
        assert setup.origin.count_blob_gets(blob.digest) == 1, (blob.digest, log)
    if status == 500:
        errors = setup.mirror.metric(
            "regmirror_upstream_errors_total", upstream="faulty", kind="status"
        )
        assert errors >= 1


def test_html_page_instead_of_blob_fails_over(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    small_layout: Path,
    faulty: Callable[..., Faulty],
) -> None:
    """
    The first upstream answers blob requests ``200`` with an HTML page (a
    captive portal): that is no blob, so each comes from the origin instead,
    and the HTML is never cached.
    """
    image = catalog.small
    setup = faulty(image, small_layout, html_blobs=True)
    _pull_and_check(skopeo, setup, image, tmp_path / "out")

    assert setup.fake_blob_gets()
    for blob in image.blobs:
        assert setup.origin.count_blob_gets(blob.digest) == 1
    assert (
        setup.mirror.metric(
            "regmirror_upstream_errors_total", upstream="faulty", kind="invalid"
        )
        >= 1
    )
    assert set(setup.mirror.cached_blobs()) == set(image.contents())


def test_manifest_with_wrong_digest_comes_from_origin(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    small_layout: Path,
    faulty: Callable[..., Faulty],
) -> None:
    """
    The first upstream answers a manifest by digest with other bytes
    (claiming the asked digest): the mirror hashes them, rejects them and
    takes the manifest from the origin; the blobs, which the first upstream
    serves correctly, still come from it.
    """
    image = catalog.small
    digest = image.root.digest
    setup = faulty(image, small_layout, wrong_manifests=True)
    _pull_and_check(skopeo, setup, image, tmp_path / "out")

    by_digest = setup.mirror.request(
        "GET", f"/v2/{image.repository}/manifests/{digest}", {"Accept": MANIFEST_ACCEPT}
    )
    assert by_digest.status == 200
    assert by_digest.body == image.root.data
    asked = [
        r
        for r in setup.fake.records()
        if r["method"] == "GET" and r["path"].endswith(f"/manifests/{digest}")
    ]
    assert asked, setup.fake.records()
    assert (
        setup.origin.count_requests(
            "GET", rf"/v2/{image.repository}/manifests/{re.escape(digest)}"
        )
        == 1
    )
    assert (
        setup.mirror.metric(
            "regmirror_upstream_errors_total", upstream="faulty", kind="invalid"
        )
        >= 1
    )
    assert setup.mirror.wait_for_log(rf"manifest is sha256:\w+, not {digest}")
    for blob in image.blobs:
        assert setup.origin.count_blob_gets(blob.digest) == 0


def test_stalled_blob_body_is_resumed_from_origin(
    tmp_path: Path,
    catalog: Catalog,
    skopeo: Skopeo,
    small_layout: Path,
    faulty: Callable[..., Faulty],
) -> None:
    """
    The first upstream sends a blob's headers and then nothing, ever (on
    every attempt, ``Range`` or not), with ``idle_timeout = 2s`` on it: the
    mirror gives up on it after the idle timeout and completes the
    transfers from the origin, well within the client's patience.
    """
    image = catalog.small
    setup = faulty(
        image, small_layout, hold_after=0, upstream_keys={"idle_timeout": "2s"}
    )
    started = time.monotonic()
    _pull_and_check(skopeo, setup, image, tmp_path / "out")
    elapsed = time.monotonic() - started

    assert setup.mirror.wait_for_log(r"upstream faulty stalled on sha256:")
    stalled = {r["path"].rsplit("/", 1)[1] for r in setup.fake_blob_gets()}
    for digest in stalled:
        assert setup.origin.count_blob_gets(digest) >= 1, digest
    assert elapsed < 60, f"the pull took {elapsed:.1f}s"
