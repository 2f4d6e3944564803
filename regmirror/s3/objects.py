"""
The few S3 operations the cache needs, on one bucket, each request signed
(``signing``) and sent over an injected ``IAgent``; large files go up as
multipart uploads, aborted when anything fails.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from attrs import define, field, frozen
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse

from regmirror._timeout import Idle
from regmirror.responses import discard, header, read_small
from regmirror.s3.bodies import BytesBody, FileSliceBody, Slice
from regmirror.s3.errors import NoSuchKey, S3Error
from regmirror.s3.location import DEFAULT_PORTS, S3Location
from regmirror.s3.signing import (
    EMPTY_SHA256,
    UNSIGNED_PAYLOAD,
    HeaderSigner,
    QuerySigner,
    aws_quote,
    timestamp,
)

#: S3's smallest part (all but the last) and largest part count.
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10_000
#: A presigned URL lives at most a week (SigV4's limit).
MAX_PRESIGN_EXPIRY = 7 * 24 * 3600
#: Error documents and the small answers of multipart calls stop here.
MAX_ANSWER = 64 * 1024


@frozen
class ObjectInfo:
    """What a ``HEAD`` says of an object."""

    size: int
    content_type: str | None


def _local(tag: str) -> str:
    """An XML tag without its namespace."""
    return tag.rsplit("}", 1)[-1]


def _parse_xml(body: bytes) -> ElementTree.Element | None:
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None


def _child_text(element: ElementTree.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


def _error_code(body: bytes) -> str | None:
    """The ``Code`` of an S3 ``<Error>`` document, or ``None``."""
    root = _parse_xml(body)
    if root is None or _local(root.tag) != "Error":
        return None
    code = _child_text(root, "Code")
    # Only a plain word: the document is the server's, the message ours.
    if code and len(code) <= 64 and code.isascii() and code.isalnum():
        return code
    return None


Body = bytes | Slice | None


@define(eq=False)
class ObjectStore:
    """
    Raw S3 operations on one bucket, SigV4-signed, over an ``IAgent``.

    :ivar agent: carries TLS settings and the connection pool.
    :ivar clock: for timeouts and signing times.
    :ivar timeout: seconds a request may go without progress (no answer
        yet, no body chunk sent, no answer byte read) before it is
        cancelled.  A response handed to the caller by :meth:`get` is
        the caller's to read and time.
    :ivar part_size: files larger than this go up as multipart uploads in
        parts of this size (at least 5 MiB; more when a file would need
        more than 10,000 parts).
    """

    agent: IAgent
    clock: IReactorTime
    location: S3Location
    timeout: float = field(default=30.0, kw_only=True)
    part_size: int = field(default=64 * 1024**2, kw_only=True)
    _scheme: str = field(init=False, repr=False)
    _host: str = field(init=False, repr=False)
    _prefix: str = field(init=False, repr=False)
    log = Logger()

    def __attrs_post_init__(self) -> None:
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        parts = urlsplit(self.location.endpoint)
        self._scheme = parts.scheme
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if self.location.addressing == "virtual":
            host = f"{self.location.bucket}.{host}"
        if parts.port is not None and parts.port != DEFAULT_PORTS[parts.scheme]:
            host = f"{host}:{parts.port}"
        self._host = host
        self._prefix = parts.path.rstrip("/")

    # -- URLs and signing -------------------------------------------------------

    def _url(self, key: str | None, query: str = "") -> str:
        """The URL of *key* (of the bucket for ``None``), encoded as sent."""
        path = self._prefix
        if self.location.addressing == "path":
            path += "/" + aws_quote(self.location.bucket)
        if key is not None:
            path += "/" + aws_quote(key, safe="/")
        url = f"{self._scheme}://{self._host}{path or '/'}"
        return f"{url}?{query}" if query else url

    def _credentials(self) -> Any:
        return Credentials(
            self.location.access_key.reveal(), self.location.secret_key.reveal()
        )

    def _signed(
        self, method: str, url: str, headers: dict[str, str], payload: str
    ) -> Headers:
        """The headers to send, ``Authorization`` included."""
        request = AWSRequest(method=method, url=url, headers=headers)
        request.context["timestamp"] = timestamp(self.clock.seconds())
        request.context["payload"] = payload
        HeaderSigner(self._credentials(), "s3", self.location.region).add_auth(request)
        sent = Headers()
        for name, value in request.headers.items():
            sent.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        return sent

    # -- requests ---------------------------------------------------------------

    async def _request(
        self,
        operation: str,
        key: str,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: Body = None,
    ) -> IResponse:
        """
        Send one signed request and return the response once its headers
        are in.

        :raises S3Error: when there is no answer in time.
        """
        unsigned = dict(headers or {})
        unsigned["Host"] = self._host
        deadline = Idle(self.clock, self.timeout)
        producer: IBodyProducer | None
        if isinstance(body, Slice):
            payload = UNSIGNED_PAYLOAD
            producer = FileSliceBody(body, self.clock, deadline.touch)
        elif body is not None:
            payload = hashlib.sha256(body).hexdigest()
            producer = BytesBody(body)
        else:
            payload, producer = EMPTY_SHA256, None
        sent = self._signed(method, url, unsigned, payload)
        try:
            response: IResponse = await deadline.watch(
                self.agent.request(
                    method.encode("ascii"), url.encode("ascii"), sent, producer
                )
            )
        except TimeoutError as e:
            raise S3Error(operation, key, detail=str(e)) from None
        except Exception as e:
            if _cancelled(e):
                raise CancelledError() from None  # our caller gave up
            raise S3Error(operation, key, detail=_describe(e)) from None
        return response

    async def _read(
        self, response: IResponse, limit: int, operation: str, key: str
    ) -> bytes:
        """A body that should be small, at most *limit* bytes."""
        try:
            return await read_small(response, limit, self.clock, self.timeout)
        except ValueError as e:
            raise S3Error(operation, key, detail=str(e)) from None

    async def _drain(self, response: IResponse, operation: str, key: str) -> None:
        """Read and drop an answer we do not need, keeping the connection."""
        await self._read(response, MAX_ANSWER, operation, key)

    async def _error(self, response: IResponse, operation: str, key: str) -> S3Error:
        """The :class:`S3Error` for a failed answer (its body is read)."""
        try:
            body = await self._read(response, MAX_ANSWER, operation, key)
        except S3Error:
            body = b""
        code = _error_code(body)
        detail = None
        region = header(response, "x-amz-bucket-region")
        if region is not None and region.isascii() and len(region) < 64:
            detail = f"the bucket is in region {region!r}"
        kind = (
            NoSuchKey
            if response.code == 404 and code in (None, "NoSuchKey")
            else S3Error
        )
        return kind(operation, key, code, response.code, detail)

    # -- objects ----------------------------------------------------------------

    async def head(self, key: str) -> ObjectInfo | None:
        """Size and content type of *key*, or ``None`` when it is not there."""
        response = await self._request("HeadObject", key, "HEAD", self._url(key))
        if response.code == 404:
            await self._drain(response, "HeadObject", key)
            return None
        if response.code != 200:
            raise await self._error(response, "HeadObject", key)
        await self._drain(response, "HeadObject", key)
        length = header(response, "Content-Length")
        if length is None or not length.strip().isdigit():
            raise S3Error("HeadObject", key, detail="answer without Content-Length")
        return ObjectInfo(int(length), header(response, "Content-Type"))

    async def get(self, key: str, start: int = 0, end: int | None = None) -> IResponse:
        """
        The object's bytes from *start* up to *end* (exclusive; the end of
        the object for ``None``) as a response whose body is not read yet:
        ``200`` for the whole object, ``206`` for a range.

        :raises NoSuchKey: when there is no such object.
        :raises S3Error: for any other failure.
        """
        if start < 0 or (end is not None and end <= start):
            raise ValueError(f"invalid range {start}..{end}")
        headers = {}
        ranged = start > 0 or end is not None
        if ranged:
            last = "" if end is None else str(end - 1)
            headers["Range"] = f"bytes={start}-{last}"
        response = await self._request("GetObject", key, "GET", self._url(key), headers)
        if response.code != (206 if ranged else 200):
            if response.code == 200:
                discard(response)
                raise S3Error("GetObject", key, detail="the Range was ignored")
            raise await self._error(response, "GetObject", key)
        return response

    async def get_bytes(self, key: str, limit: int) -> tuple[bytes, str | None] | None:
        """
        A small object whole, with its content type; ``None`` when it is not
        there.

        :raises S3Error: when it is over *limit* bytes, among others.
        """
        try:
            response = await self.get(key)
        except NoSuchKey:
            return None
        body = await self._read(response, limit, "GetObject", key)
        return body, header(response, "Content-Type")

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        """Store a small object (its body is hashed into the signature)."""
        response = await self._request(
            "PutObject",
            key,
            "PUT",
            self._url(key),
            {"Content-Type": content_type},
            data,
        )
        await self._expect(response, 200, "PutObject", key)

    async def put_file(self, key: str, path: str, size: int, content_type: str) -> None:
        """
        Store the *size* bytes of the file at *path*: one ``PUT`` up to
        :attr:`part_size`, else a multipart upload of parts sent one after
        the other, aborted if anything fails.  Bodies are not hashed
        (``UNSIGNED-PAYLOAD``): the file was verified against its digest.
        """
        actual = os.stat(path).st_size
        if actual != size:
            raise ValueError(f"{path} has {actual} bytes, not {size}")
        if size <= self.part_size:
            response = await self._request(
                "PutObject",
                key,
                "PUT",
                self._url(key),
                {"Content-Type": content_type},
                Slice(path, 0, size),
            )
            await self._expect(response, 200, "PutObject", key)
            return
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        upload = await self._create_upload(key, content_type)
        try:
            etags = []
            for number, offset in enumerate(range(0, size, part_size), start=1):
                part = Slice(path, offset, min(part_size, size - offset))
                etags.append(await self._upload_part(key, upload, number, part))
            await self._complete_upload(key, upload, etags)
        except Exception:
            await self._abort_upload(key, upload)
            raise

    async def _expect(
        self, response: IResponse, status: int, operation: str, key: str
    ) -> None:
        if response.code != status:
            raise await self._error(response, operation, key)
        await self._drain(response, operation, key)

    async def _create_upload(self, key: str, content_type: str) -> str:
        operation = "CreateMultipartUpload"
        response = await self._request(
            operation,
            key,
            "POST",
            self._url(key, "uploads"),
            {"Content-Type": content_type},
        )
        if response.code != 200:
            raise await self._error(response, operation, key)
        root = _parse_xml(await self._read(response, MAX_ANSWER, operation, key))
        upload = None if root is None else _child_text(root, "UploadId")
        if not upload:
            raise S3Error(operation, key, detail="answer without an UploadId")
        return upload

    def _upload_query(self, upload: str, number: int | None = None) -> str:
        query = f"uploadId={aws_quote(upload)}"
        return query if number is None else f"partNumber={number}&{query}"

    async def _upload_part(
        self, key: str, upload: str, number: int, part: Slice
    ) -> str:
        url = self._url(key, self._upload_query(upload, number))
        response = await self._request("UploadPart", key, "PUT", url, body=part)
        await self._expect(response, 200, "UploadPart", key)
        etag = header(response, "ETag")
        if not etag:
            raise S3Error("UploadPart", key, detail=f"part {number} without an ETag")
        return etag

    async def _complete_upload(self, key: str, upload: str, etags: list[str]) -> None:
        operation = "CompleteMultipartUpload"
        parts = "".join(
            f"<Part><PartNumber>{number}</PartNumber><ETag>{escape(etag)}</ETag></Part>"
            for number, etag in enumerate(etags, start=1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>"
        response = await self._request(
            operation,
            key,
            "POST",
            self._url(key, self._upload_query(upload)),
            {"Content-Type": "application/xml"},
            body.encode("utf-8"),
        )
        if response.code != 200:
            raise await self._error(response, operation, key)
        # S3 may answer 200 and still fail, in the body.
        answer = await self._read(response, MAX_ANSWER, operation, key)
        root = _parse_xml(answer)
        if root is None or _local(root.tag) != "CompleteMultipartUploadResult":
            raise S3Error(
                operation, key, _error_code(answer), 200, "no result in the answer"
            )

    async def _abort_upload(self, key: str, upload: str) -> None:
        """Abort a multipart upload; failing to is logged, not raised."""
        operation = "AbortMultipartUpload"
        try:
            response = await self._request(
                operation, key, "DELETE", self._url(key, self._upload_query(upload))
            )
            if response.code not in (204, 200, 404):
                raise await self._error(response, operation, key)
            await self._drain(response, operation, key)
        except Exception as e:
            self.log.warn(
                "could not abort the multipart upload of {key}; a bucket lifecycle "
                "rule (AbortIncompleteMultipartUpload) removes its parts: {why}",
                key=key,
                why=str(e),
            )

    async def delete(self, key: str) -> None:
        """Delete *key*; one that is not there is fine."""
        response = await self._request("DeleteObject", key, "DELETE", self._url(key))
        if response.code not in (200, 204, 404):
            raise await self._error(response, "DeleteObject", key)
        await self._drain(response, "DeleteObject", key)

    def presign_get(self, key: str, expires: int) -> str:
        """
        A URL anyone holding it may ``GET`` *key* with for *expires*
        seconds (query-string SigV4).  For the client it is given to only:
        it must not be logged.
        """
        if not 1 <= expires <= MAX_PRESIGN_EXPIRY:
            raise ValueError(f"expires must be 1 to {MAX_PRESIGN_EXPIRY} seconds")
        request = AWSRequest(
            method="GET", url=self._url(key), headers={"Host": self._host}
        )
        request.context["timestamp"] = timestamp(self.clock.seconds())
        QuerySigner(
            self._credentials(), "s3", self.location.region, expires=expires
        ).add_auth(request)
        return str(request.url)

    async def check(self) -> None:
        """
        :raises S3Error: unless the bucket answers a ``HEAD`` with 200 (it
            exists, and the credentials may use it).
        """
        bucket = self.location.bucket
        response = await self._request("HeadBucket", bucket, "HEAD", self._url(None))
        await self._expect(response, 200, "HeadBucket", bucket)


def _cancelled(error: Exception) -> bool:
    """Whether *error* is, or wraps, a cancellation."""
    if isinstance(error, CancelledError):
        return True
    reasons = getattr(error, "reasons", None) or []
    return any(reason.check(CancelledError) for reason in reasons)


def _describe(error: Exception) -> str:
    """A transport failure in a few words (no URL, so no query string)."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "connection failed: " + ", ".join(
            reason.getErrorMessage() for reason in reasons
        )
    return f"cannot connect: {error.__class__.__name__}: {error}"
