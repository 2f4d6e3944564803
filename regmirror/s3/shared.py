"""
Blobs and manifests by digest in the bucket, shared by every node, on top
of :class:`~regmirror.s3.objects.ObjectStore`.
"""

from __future__ import annotations

from attrs import define
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from regmirror.reference import MAX_MANIFEST_SIZE, Digest, manifest_media_type
from regmirror.s3.objects import ObjectStore


def _blob_key(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


def _manifest_key(digest: Digest) -> str:
    return f"manifests/{digest.algorithm}/{digest.hex}"


@define(eq=False)
class SharedStore:
    """
    Blobs and manifests by digest in object storage, shared by every node:
    ``blobs/<algorithm>/<hex>`` and ``manifests/<algorithm>/<hex>`` (the
    manifest's media type as its ``Content-Type``).

    Objects are written only after their bytes were verified against the
    digest; manifests, being small, are checked again when read.
    """

    objects: ObjectStore
    log = Logger()

    async def blob_size(self, digest: Digest) -> int | None:
        """The blob's size, or ``None`` when it is not shared yet."""
        info = await self.objects.head(_blob_key(digest))
        return None if info is None else info.size

    async def open_blob(
        self, digest: Digest, start: int = 0, end: int | None = None
    ) -> IResponse:
        """
        The blob's bytes from *start* to *end* (exclusive), unread.

        :raises NoSuchKey: when it is not shared.
        """
        return await self.objects.get(_blob_key(digest), start, end)

    async def put_blob(self, digest: Digest, path: str, size: int) -> None:
        """
        Share the verified blob at *path*, unless another node already has
        (same key, same size: content-addressed, so the same bytes).
        """
        key = _blob_key(digest)
        info = await self.objects.head(key)
        if info is not None and info.size == size:
            return
        await self.objects.put_file(key, path, size, "application/octet-stream")

    async def manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        """
        ``(media type, body)`` of a shared manifest, or ``None`` when it is
        not there, what came back does not match *digest*, or it is no
        manifest (:func:`~regmirror.reference.manifest_media_type`, as for
        an upstream's answer).
        """
        key = _manifest_key(digest)
        found = await self.objects.get_bytes(key, MAX_MANIFEST_SIZE)
        if found is None:
            return None
        body, content_type = found
        hasher = digest.hasher()
        hasher.update(body)
        if hasher.hexdigest() != digest.hex:
            self.log.warn(
                "shared manifest {digest} does not match its digest; ignored",
                digest=str(digest),
            )
            return None
        # The check an upstream's answer gets: the object's Content-Type
        # only where the document agrees with it.
        media_type = manifest_media_type(body, content_type)
        if media_type is None:
            self.log.warn(
                "shared manifest {digest} is no manifest of a known type"
                " (its shape, its mediaType and its Content-Type {declared!r});"
                " ignored",
                digest=str(digest),
                declared=(content_type or "")[:100],
            )
            return None
        return media_type, body

    async def put_manifest(self, digest: Digest, media_type: str, body: bytes) -> None:
        """
        Share a manifest.

        :raises ValueError: when *body* does not match *digest* or is over
            the manifest size limit: such bytes are never shared.
        """
        hasher = digest.hasher()
        hasher.update(body)
        if hasher.hexdigest() != digest.hex:
            raise ValueError(f"manifest body does not match {digest}")
        if len(body) > MAX_MANIFEST_SIZE:
            raise ValueError(f"manifest {digest} is over {MAX_MANIFEST_SIZE} bytes")
        await self.objects.put_bytes(_manifest_key(digest), body, media_type)

    async def delete_blob(self, digest: Digest) -> None:
        """Stop sharing a blob."""
        await self.objects.delete(_blob_key(digest))

    def blob_url(self, digest: Digest, expires: int) -> str:
        """A presigned ``GET`` URL of the blob, for a client's redirect."""
        return self.objects.presign_get(_blob_key(digest), expires)
