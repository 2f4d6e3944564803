"""
A small in-memory S3 as a twisted.web resource, strict where a signing or
framing bug would show: every request's SigV4 signature (header or query
string) is recomputed with botocore from what was received (path and query
decoded and encoded again as S3 does), a payload hash other than
``UNSIGNED-PAYLOAD`` must match the body, and uploads need a
``Content-Length`` (RGW answers chunked ones with 411).

Objects, multipart uploads (parts of at least 5 MiB but the last), ranged
GETs, path and virtual-host addressing; every request is recorded.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote, unquote
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/s3/aws4_request, "
    r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})"
)
MIN_PART = 5 * 1024 * 1024


@dataclass
class Seen:
    """One request as the fake received it."""

    method: str
    host: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body_length: int
    signed_by: str  # "header", "query" or "" (refused)


@dataclass
class Upload:
    bucket: str
    key: str
    content_type: str
    parts: dict[int, tuple[bytes, str]] = field(default_factory=dict)


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(code)
        self.status, self.code, self.message = status, code, message


class FakeS3(Resource):
    """
    One S3 endpoint at ``host`` holding *buckets*.

    :ivar objects: ``(bucket, key)`` → ``(body, content type)``.
    :ivar fail_part: answer ``UploadPart`` of this part number with 500.
    :ivar complete_error: answer ``CompleteMultipartUpload`` with 200 and an
        ``<Error>`` document, as S3 may.
    :ivar hang: operations (``UploadPart``, ``HeadObject``, …) never answered.
    """

    isLeaf = True

    def __init__(
        self,
        access_key: str,
        secret_key: str,
        region: str,
        buckets: set[str],
        now: Callable[[], float],
        host: str = "s3.test",
    ) -> None:
        super().__init__()
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        self.buckets = set(buckets)
        self.now = now
        self.host = host
        self.denied: set[str] = set()
        self.objects: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.uploads: dict[str, Upload] = {}
        self.aborted: list[str] = []
        self.seen: list[Seen] = []
        self.fail_part: int | None = None
        self.complete_error = False
        self.hang: set[str] = set()
        self._ids = itertools.count(1)

    # -- plumbing ---------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        body = request.content.read() if request.content is not None else b""
        raw_path, _, raw_query = request.uri.decode("ascii").partition("?")
        query = dict(parse_qsl(raw_query, keep_blank_values=True))
        host = (request.getHeader("host") or "").lower()
        record = Seen(
            request.method.decode(),
            host,
            unquote(raw_path),
            query,
            {
                name.decode().lower(): b",".join(values).decode("latin-1")
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            len(body),
            "",
        )
        self.seen.append(record)
        if _operation(record) in self.hang:
            return NOT_DONE_YET
        try:
            record.signed_by = self._authenticate(request, raw_path, raw_query, body)
            bucket, key = self._locate(host, unquote(raw_path))
            if bucket in self.denied:
                raise Refused(403, "AccessDenied", "Access Denied")
            return self._dispatch(request, bucket, key, query, body)
        except Refused as refused:
            request.setResponseCode(refused.status)
            if request.method == b"HEAD":
                return b""
            request.setHeader(b"content-type", b"application/xml")
            return (
                "<?xml version='1.0' encoding='UTF-8'?>"
                f"<Error><Code>{refused.code}</Code>"
                f"<Message>{escape(refused.message)}</Message></Error>"
            ).encode()

    def _locate(self, host: str, path: str) -> tuple[str, str | None]:
        name = host.split(":", 1)[0]
        if name != self.host and name.endswith("." + self.host):
            bucket, key = name[: -len(self.host) - 1], path[1:]
        else:
            bucket, _, key = path[1:].partition("/")
        if bucket not in self.buckets:
            raise Refused(404, "NoSuchBucket", "The specified bucket does not exist")
        return bucket, key or None

    def _authenticate(
        self, request: Request, raw_path: str, raw_query: str, body: bytes
    ) -> str:
        """Check the signature as S3 would; how it was signed."""
        method = request.method.decode()
        # S3 decodes the path and encodes it again for the canonical request:
        # a client that signs one spelling and sends another fails here.
        path = quote(unquote(raw_path), safe="/~")
        params = parse_qsl(raw_query, keep_blank_values=True)
        host = request.getHeader("host") or ""
        url = f"http://{host}{path}"
        credentials = Credentials(self.access_key, self.secret_key)
        query = dict(params)
        if "X-Amz-Signature" in query:
            if method not in ("GET", "HEAD"):
                raise Refused(403, "AccessDenied", "query auth for GET only")
            signed = [(k, v) for k, v in params if k != "X-Amz-Signature"]
            access, date, region = self._scope(query.get("X-Amz-Credential", ""))
            stamp = query.get("X-Amz-Date", "")
            expires = int(query.get("X-Amz-Expires", "0"))
            names = query.get("X-Amz-SignedHeaders", "").split(";")
            presigned = AWSRequest(
                method=method, url=url, headers=self._headers(request, names)
            )
            presigned.params = signed
            presigned.context["timestamp"] = stamp
            query_signer = S3SigV4QueryAuth(
                credentials, "s3", self.region, expires=expires
            )
            self._check(
                query_signer,
                presigned,
                access,
                date,
                region,
                stamp,
                query.get("X-Amz-Signature", ""),
            )
            if self.now() > _seconds(stamp) + expires:
                raise Refused(403, "AccessDenied", "Request has expired")
            return "query"
        match = _AUTHORIZATION.fullmatch(request.getHeader("authorization") or "")
        if match is None:
            raise Refused(403, "AccessDenied", "no or malformed Authorization")
        access, date, region, names, signature = match.groups()
        signed_names = names.split(";")
        for needed in ("host", "x-amz-date", "x-amz-content-sha256"):
            if needed not in signed_names:
                raise Refused(403, "AccessDenied", f"{needed} is not signed")
        headers = self._headers(request, signed_names)
        signed_request = AWSRequest(method=method, url=url, headers=headers)
        signed_request.params = params
        stamp = headers["x-amz-date"]
        signed_request.context["timestamp"] = stamp
        signer = S3SigV4Auth(credentials, "s3", self.region)
        self._check(signer, signed_request, access, date, region, stamp, signature)
        payload = headers["x-amz-content-sha256"]
        if (
            payload != "UNSIGNED-PAYLOAD"
            and payload != hashlib.sha256(body).hexdigest()
        ):
            raise Refused(400, "XAmzContentSHA256Mismatch")
        if method in ("PUT", "POST") and request.getHeader("content-length") is None:
            raise Refused(411, "MissingContentLength")
        return "header"

    def _scope(self, credential: str) -> tuple[str, str, str]:
        parts = credential.split("/")
        if len(parts) != 5 or parts[3:] != ["s3", "aws4_request"]:
            raise Refused(403, "AuthorizationQueryParametersError")
        return parts[0], parts[1], parts[2]

    def _headers(self, request: Request, names: list[str]) -> dict[str, str]:
        headers = {}
        for name in names:
            values = request.requestHeaders.getRawHeaders(name.encode())
            if not values:
                raise Refused(403, "AccessDenied", f"signed header {name} missing")
            headers[name] = ",".join(v.decode("latin-1") for v in values)
        return headers

    def _check(
        self,
        signer: S3SigV4Auth,
        request: AWSRequest,
        access: str,
        date: str,
        region: str,
        stamp: str,
        signature: str,
    ) -> None:
        if access != self.access_key:
            raise Refused(403, "InvalidAccessKeyId")
        if region != self.region:
            raise Refused(400, "AuthorizationHeaderMalformed", f"region {region}")
        if date != stamp[:8]:
            raise Refused(403, "SignatureDoesNotMatch", "scope date")
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        if not hmac.compare_digest(expected, signature):
            raise Refused(403, "SignatureDoesNotMatch")

    # -- operations -------------------------------------------------------------

    def _dispatch(
        self,
        request: Request,
        bucket: str,
        key: str | None,
        query: dict[str, str],
        body: bytes,
    ) -> bytes | int:
        method = request.method
        if key is None:
            if method == b"HEAD":
                return b""
            raise Refused(405, "MethodNotAllowed")
        if method == b"POST" and "uploads" in query:
            upload = str(next(self._ids))
            self.uploads[upload] = Upload(
                bucket, key, request.getHeader("content-type") or ""
            )
            return _xml(
                "InitiateMultipartUploadResult",
                f"<Bucket>{bucket}</Bucket><Key>{escape(key)}</Key>"
                f"<UploadId>{upload}</UploadId>",
            )
        if "uploadId" in query:
            return self._multipart(request, query, body)
        if method == b"PUT":
            content_type = request.getHeader("content-type") or ""
            self.objects[(bucket, key)] = (body, content_type)
            request.setHeader(b"etag", _etag(body).encode())
            return b""
        if method == b"DELETE":
            self.objects.pop((bucket, key), None)
            request.setResponseCode(204)
            return b""
        if method not in (b"GET", b"HEAD"):
            raise Refused(405, "MethodNotAllowed")
        stored = self.objects.get((bucket, key))
        if stored is None:
            raise Refused(404, "NoSuchKey", "The specified key does not exist.")
        data, content_type = stored
        if content_type:
            request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"etag", _etag(data).encode())
        wanted = request.getHeader("range")
        if wanted is not None:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
            if match is None or int(match.group(1)) >= len(data):
                raise Refused(416, "InvalidRange")
            start = int(match.group(1))
            end = min(int(match.group(2) or len(data) - 1), len(data) - 1)
            request.setResponseCode(206)
            request.setHeader(
                b"content-range", f"bytes {start}-{end}/{len(data)}".encode()
            )
            data = data[start : end + 1]
        if method == b"HEAD":
            request.setHeader(b"content-length", str(len(data)).encode())
            return b""
        return data

    def _multipart(
        self, request: Request, query: dict[str, str], body: bytes
    ) -> bytes | int:
        upload = self.uploads.get(query["uploadId"])
        if upload is None:
            raise Refused(404, "NoSuchUpload")
        if request.method == b"DELETE":
            del self.uploads[query["uploadId"]]
            self.aborted.append(query["uploadId"])
            request.setResponseCode(204)
            return b""
        if request.method == b"PUT":
            number = int(query["partNumber"])
            if number == self.fail_part:
                raise Refused(500, "InternalError", "We encountered an internal error")
            etag = _etag(body)
            upload.parts[number] = (body, etag)
            request.setHeader(b"etag", etag.encode())
            return b""
        if request.method != b"POST":
            raise Refused(405, "MethodNotAllowed")
        if self.complete_error:
            return _xml("Error", "<Code>InternalError</Code>")
        listed = [
            (int(part.findtext("PartNumber") or 0), part.findtext("ETag") or "")
            for part in ElementTree.fromstring(body)
        ]
        numbers = [number for number, _ in listed]
        if numbers != sorted(numbers) or not listed:
            raise Refused(400, "InvalidPartOrder")
        for index, (number, etag) in enumerate(listed):
            if number not in upload.parts or upload.parts[number][1] != etag:
                raise Refused(400, "InvalidPart")
            if index < len(listed) - 1 and len(upload.parts[number][0]) < MIN_PART:
                raise Refused(400, "EntityTooSmall")
        data = b"".join(upload.parts[number][0] for number in numbers)
        self.objects[(upload.bucket, upload.key)] = (data, upload.content_type)
        del self.uploads[query["uploadId"]]
        return _xml(
            "CompleteMultipartUploadResult",
            f"<Key>{escape(upload.key)}</Key><ETag>{_etag(data)}</ETag>",
        )

    # -- for tests --------------------------------------------------------------

    def operations(self) -> list[str]:
        """The S3 operation of every request so far, by name."""
        return [_operation(seen) for seen in self.seen]


def _operation(seen: Seen) -> str:
    if "uploads" in seen.query:
        return "CreateMultipartUpload"
    if "uploadId" in seen.query:
        return {
            "PUT": "UploadPart",
            "POST": "CompleteMultipartUpload",
            "DELETE": "AbortMultipartUpload",
        }[seen.method]
    return {
        "HEAD": "HeadObject",
        "GET": "GetObject",
        "PUT": "PutObject",
        "DELETE": "DeleteObject",
    }[seen.method]


def _etag(data: bytes) -> str:
    return '"' + hashlib.md5(data).hexdigest() + '"'


def _xml(root: str, inner: str) -> bytes:
    namespace = "http://s3.amazonaws.com/doc/2006-03-01/"
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>'
        f'<{root} xmlns="{namespace}">{inner}</{root}>'
    ).encode()


def _seconds(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
