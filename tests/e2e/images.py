"""
Deterministic test images, written as OCI image layouts on disk.

Every byte is computed here (fixed tar headers, gzip with ``mtime=0``, JSON
with sorted keys, seeded pseudo-random data), so each run produces the same
digests and the tests know in advance what a correct pull must yield.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

#: Every manifest media type a client may accept.
MANIFEST_ACCEPT = ", ".join(
    (
        OCI_INDEX,
        OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)

_TAR_MTIME = 1_700_000_000
#: the ``created`` time of every image unless one is given
DEFAULT_CREATED = "2023-11-14T22:13:20Z"
BIG_LAYER_SIZE = 40 * 1024 * 1024


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Blob:
    """Content-addressed bytes: a manifest, an index, a config or a layer."""

    media_type: str
    data: bytes = field(repr=False)
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", sha256_digest(self.data))

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
            **extra,
        }


@dataclass(frozen=True)
class Image:
    """
    One tag of a repository and everything reachable from it.

    ``root`` is what the tag points at (a manifest or an index),
    ``manifests`` the platform manifests below an index (empty for a
    single-arch image) and ``blobs`` the configs and layers.
    """

    repository: str
    tag: str
    root: Blob
    manifests: tuple[Blob, ...]
    blobs: tuple[Blob, ...]
    layers: tuple[Blob, ...]

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def is_index(self) -> bool:
        return self.root.media_type == OCI_INDEX

    def contents(self) -> dict[str, Blob]:
        """Every blob a full (``--all``) pull must produce, by digest."""
        every = (self.root, *self.manifests, *self.blobs)
        return {blob.digest: blob for blob in every}


def layer_tar(files: Mapping[str, bytes]) -> bytes:
    """An uncompressed tar of *files* with fixed owners, modes and times."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = _TAR_MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def uncompressed_layer(files: Mapping[str, bytes]) -> Blob:
    return Blob(OCI_LAYER_TAR, layer_tar(files))


def gzip_layer(files: Mapping[str, bytes]) -> Blob:
    return Blob(OCI_LAYER_TAR_GZIP, gzip.compress(layer_tar(files), mtime=0))


def _diff_id(layer: Blob) -> str:
    if layer.media_type == OCI_LAYER_TAR_GZIP:
        return sha256_digest(gzip.decompress(layer.data))
    return layer.digest


def _config(
    architecture: str,
    layers: Sequence[Blob],
    label: str,
    created: str = DEFAULT_CREATED,
) -> Blob:
    document = {
        "architecture": architecture,
        "os": "linux",
        "created": created,
        "config": {"Cmd": ["/bin/true"], "Labels": {"regmirror.test": label}},
        "rootfs": {"type": "layers", "diff_ids": [_diff_id(x) for x in layers]},
        "history": [{"created": created, "created_by": label}],
    }
    return Blob(OCI_CONFIG, canonical_json(document))


def _manifest(config: Blob, layers: Sequence[Blob]) -> Blob:
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    return Blob(OCI_MANIFEST, canonical_json(document))


def single_arch_image(
    repository: str,
    tag: str,
    layers: Sequence[Blob],
    architecture: str = "amd64",
    *,
    created: str = DEFAULT_CREATED,
) -> Image:
    """One image manifest; *created* is its config's creation time."""
    config = _config(architecture, layers, f"{repository}:{tag}", created)
    manifest = _manifest(config, layers)
    return Image(
        repository=repository,
        tag=tag,
        root=manifest,
        manifests=(),
        blobs=(config, *layers),
        layers=tuple(layers),
    )


def multi_arch_image(
    repository: str, tag: str, platforms: Mapping[str, Sequence[Blob]]
) -> Image:
    """An OCI index with one linux manifest per architecture in *platforms*."""
    manifests: list[Blob] = []
    blobs: list[Blob] = []
    entries: list[dict[str, Any]] = []
    for architecture, layers in platforms.items():
        config = _config(architecture, layers, f"{repository}:{tag}/{architecture}")
        manifest = _manifest(config, layers)
        manifests.append(manifest)
        blobs.extend((config, *layers))
        platform = {"architecture": architecture, "os": "linux"}
        entries.append(manifest.descriptor(platform=platform))
    index = Blob(
        OCI_INDEX,
        canonical_json(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        ),
    )
    return Image(
        repository=repository,
        tag=tag,
        root=index,
        manifests=tuple(manifests),
        blobs=tuple(blobs),
        layers=tuple(b for b in blobs if b.media_type != OCI_CONFIG),
    )


@dataclass(frozen=True)
class Catalog:
    """The images the suite pushes upstream and pulls through the mirror."""

    small: Image
    multi: Image
    big: Image
    shared_one: Image
    shared_two: Image
    busybox: Image
    #: the layer that ``shared_one`` and ``shared_two`` both use
    shared_layer: Blob

    def images(self) -> tuple[Image, ...]:
        return (
            self.small,
            self.multi,
            self.big,
            self.shared_one,
            self.shared_two,
            self.busybox,
        )


def build_catalog() -> Catalog:
    small = single_arch_image(
        "test/small",
        "latest",
        [
            gzip_layer({"hello.txt": b"hello from regmirror's e2e suite\n"}),
            uncompressed_layer({"etc/small.conf": b"answer = 42\n"}),
        ],
    )
    multi = multi_arch_image(
        "test/multi",
        "latest",
        {
            "amd64": [gzip_layer({"arch.txt": b"amd64\n"})],
            "arm64": [gzip_layer({"arch.txt": b"arm64\n"})],
        },
    )
    big_bytes = random.Random(20231114).randbytes(BIG_LAYER_SIZE)
    big = single_arch_image(
        "test/big", "latest", [uncompressed_layer({"big.bin": big_bytes})]
    )
    shared_layer = gzip_layer({"shared.txt": b"one layer, two tags\n" * 64})
    shared_one = single_arch_image(
        "test/shared", "one", [shared_layer, gzip_layer({"which.txt": b"one\n"})]
    )
    shared_two = single_arch_image(
        "test/shared", "two", [shared_layer, gzip_layer({"which.txt": b"two\n"})]
    )
    busybox = single_arch_image(
        "library/busybox", "latest", [gzip_layer({"bin/busybox": b"#!/bin/true\n"})]
    )
    return Catalog(
        small=small,
        multi=multi,
        big=big,
        shared_one=shared_one,
        shared_two=shared_two,
        busybox=busybox,
        shared_layer=shared_layer,
    )


def ghcr_app() -> Image:
    """
    ``org/app:v1``, the image of a second registry (``ghcr.io`` in the
    routing tests): not in the catalog, sharing no blob with it.
    """
    return single_arch_image(
        "org/app", "v1", [gzip_layer({"app.txt": b"served by the ghcr.io upstream\n"})]
    )


def write_layout(directory: Path, images: Iterable[Image]) -> None:
    """Write *images* as one OCI image layout, each root named by its tag."""
    blob_dir = directory / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for image in images:
        for digest, blob in image.contents().items():
            path = blob_dir / digest.removeprefix("sha256:")
            if not path.exists():
                path.write_bytes(blob.data)
        entries.append(image.root.descriptor(annotations={REF_NAME: image.tag}))
    (directory / "oci-layout").write_bytes(
        canonical_json({"imageLayoutVersion": "1.0.0"})
    )
    (directory / "index.json").write_bytes(
        canonical_json({"schemaVersion": 2, "manifests": entries})
    )


def layout_blobs(directory: Path) -> dict[str, str]:
    """Map each blob file's name in a layout to the digest of its content."""
    found: dict[str, str] = {}
    for path in sorted((directory / "blobs" / "sha256").iterdir()):
        hasher = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
        found["sha256:" + path.name] = "sha256:" + hasher.hexdigest()
    return found


def assert_layout_matches(
    directory: Path, image: Image, tag: str, *, platform_manifest: Blob | None = None
) -> None:
    """
    Check a layout written by ``skopeo copy`` against what was pushed.

    Every blob file must hash to its name, and the set of blobs must be
    exactly what the image reaches: all of it for a full copy, or the root
    *platform_manifest* of an index and its config and layers.
    """
    found = layout_blobs(directory)
    corrupt = {name: real for name, real in found.items() if name != real}
    assert not corrupt, f"blobs whose content does not match their name: {corrupt}"
    if platform_manifest is None:
        root = image.root
        expected = set(image.contents())
    else:
        root = platform_manifest
        expected = {root.digest, *_referenced_digests(root)}
    assert set(found) == expected, (
        f"unexpected blobs {sorted(set(found) - expected)}, "
        f"missing blobs {sorted(expected - set(found))}"
    )
    index = json.loads((directory / "index.json").read_bytes())
    roots = [
        (entry["digest"], entry["mediaType"], entry["size"])
        for entry in index["manifests"]
        if entry.get("annotations", {}).get(REF_NAME) == tag
    ]
    assert roots == [(root.digest, root.media_type, root.size)], index


def _referenced_digests(manifest: Blob) -> list[str]:
    document = json.loads(manifest.data)
    return [document["config"]["digest"]] + [x["digest"] for x in document["layers"]]
