"""The S3 layer against an in-memory S3 that checks every signature:
signing, addressing, single and multipart uploads, ranged reads, errors,
presigned URLs, timeouts, and the shared store of blobs and manifests."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pytest
import treq
from fakes3 import FakeS3
from memory import result
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent
from twisted.web.iweb import IResponse

from regmirror.config import Secret
from regmirror.reference import (
    DOCKER_MANIFEST,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
)
from regmirror.s3.errors import NoSuchKey, S3Error
from regmirror.s3.location import S3Location
from regmirror.s3.objects import ObjectInfo, ObjectStore
from regmirror.s3.shared import SharedStore

T = TypeVar("T")

ACCESS = "AKIDEXAMPLE7Q"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"
REGION = "eu-test-1"
BUCKET = "cache"
MiB = 1024 * 1024
# 2021-01-01T00:00:00Z: signing times come from the injected clock.
START = 1_609_459_200.0


class World:
    """An :class:`ObjectStore` over a :class:`FakeS3`, with a ``Clock``."""

    def __init__(
        self,
        addressing: str = "path",
        secret: str = SECRET,
        endpoint: str = "http://s3.test:7480",
        part_size: int = 5 * MiB,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.fake = FakeS3(ACCESS, SECRET, REGION, {BUCKET}, self.clock.seconds)
        self.agent = RequestTraversalAgent(self.fake)
        self.location = S3Location(
            endpoint,
            BUCKET,
            REGION,
            Secret(ACCESS),
            Secret(secret),
            addressing,
        )
        self.objects = ObjectStore(
            self.agent, self.clock, self.location, part_size=part_size
        )
        self.shared = SharedStore(self.objects)

    def settle(self, d: Deferred[Any]) -> None:
        for _ in range(10_000):
            self.agent.flush()
            self.clock.advance(0)
            if d.called:
                self.agent.flush()
                return

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run *coroutine* to its end over the in-memory connections."""
        d = Deferred.fromCoroutine(coroutine)
        self.settle(d)
        value: T = result(d)
        return value

    def failure(self, coroutine: Coroutine[Any, Any, Any]) -> BaseException:
        with pytest.raises(Exception) as caught:
            self.run(coroutine)
        return caught.value

    def body(self, response: IResponse) -> bytes:
        d = treq.content(response)
        self.settle(d)
        data: bytes = result(d)
        return data


def file_of(tmp_path: Path, size: int, name: str = "blob") -> tuple[str, bytes]:
    data = hashlib.sha256(name.encode()).digest() * (size // 32) + b"x" * (size % 32)
    path = tmp_path / name
    path.write_bytes(data)
    return str(path), data


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        assert SECRET not in str(text) and SECRET not in repr(text)


# -- signing and addressing ------------------------------------------------------


def test_requests_carry_a_sigv4_signature_the_server_can_verify() -> None:
    """A small PUT is signed with SigV4 at the clock's time, its payload
    hashed into the signature; the fake recomputes the signature with
    botocore from what it received and accepts it."""
    world = World()
    world.run(world.objects.put_bytes("a/b.json", b"{}", "application/json"))
    assert world.fake.objects[(BUCKET, "a/b.json")] == (b"{}", "application/json")
    seen = world.fake.seen[-1]
    assert seen.signed_by == "header"
    assert seen.headers["x-amz-date"] == "20210101T000000Z"
    assert seen.headers["x-amz-content-sha256"] == hashlib.sha256(b"{}").hexdigest()
    assert seen.headers["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={ACCESS}/20210101/{REGION}/s3/aws4_request, "
    )
    signed = re.search(r"SignedHeaders=([^,]+)", seen.headers["authorization"])
    assert signed is not None
    assert {"host", "x-amz-date", "x-amz-content-sha256", "content-type"} <= set(
        signed.group(1).split(";")
    )
    assert seen.host == "s3.test:7480" and seen.path == "/cache/a/b.json"


def test_a_wrong_secret_fails_verification_and_is_never_shown() -> None:
    """The fake really checks signatures: the wrong secret key gives
    SignatureDoesNotMatch, named in the error with operation and key; no
    secret in the error, the location or the store's repr."""
    other = "0ther/Secret+Key+That+Is+Wrong000000000"
    world = World(secret=other)
    error = world.failure(world.objects.put_bytes("k", b"x", "text/plain"))
    assert isinstance(error, S3Error)
    assert error.code == "SignatureDoesNotMatch" and error.status == 403
    assert str(error) == "S3 PutObject 'k': SignatureDoesNotMatch (HTTP 403)"
    for thing in (error, world.location, world.objects, world.shared):
        assert other not in repr(thing) and other not in str(thing)
        assert_no_secret(thing)


def test_keys_are_encoded_once_and_signed_as_sent() -> None:
    """Keys with spaces, ``+``, ``=``, ``%``, ``~`` and non-ASCII travel
    percent-encoded exactly as S3 canonicalises them, so the signature
    holds and the object lands under the exact key."""
    world = World()
    key = "dir/a b+c=d%e~f/ü.txt"
    world.run(world.objects.put_bytes(key, b"data", "text/plain"))
    assert (BUCKET, key) in world.fake.objects
    assert world.run(world.objects.head(key)) == ObjectInfo(4, "text/plain")
    seen = world.fake.seen[-1]
    assert seen.signed_by == "header" and seen.path == f"/cache/{key}"


def test_virtual_addressing_puts_the_bucket_in_the_host() -> None:
    """``addressing = "virtual"``: ``Host: cache.s3.test:7480``, path ``/key``,
    signed with that Host; the bucket-level HEAD goes to ``/``."""
    world = World(addressing="virtual")
    world.run(world.objects.put_bytes("x/y", b"1", "text/plain"))
    world.run(world.objects.check())
    put, head = world.fake.seen
    assert put.host == "cache.s3.test:7480" and put.path == "/x/y"
    assert head.host == "cache.s3.test:7480" and head.path == "/"
    assert put.signed_by == head.signed_by == "header"
    assert world.fake.objects[(BUCKET, "x/y")] == (b"1", "text/plain")


def test_path_addressing_names_the_bucket_in_the_path() -> None:
    """``addressing = "path"``: the bucket is the first path segment and
    the HEAD of the bucket is ``/cache``; a default port is not in Host."""
    world = World(endpoint="http://s3.test")
    world.run(world.objects.check())
    seen = world.fake.seen[-1]
    assert seen.host == "s3.test" and seen.path == "/cache"


def test_locations_refuse_what_cannot_work() -> None:
    """Unknown addressing, virtual addressing over an IP address or with a
    bucket that cannot be a host name, and non-http endpoints are refused
    when the location is made."""
    key = Secret("k")
    with pytest.raises(ValueError, match="addressing"):
        S3Location("http://s3.test", "b", "r", key, key, "dns")
    with pytest.raises(ValueError, match="host name"):
        S3Location("http://127.0.0.1:7480", "b", "r", key, key, "virtual")
    with pytest.raises(ValueError, match="host name"):
        S3Location("http://s3.test", "My_Bucket", "r", key, key, "virtual")
    with pytest.raises(ValueError, match="http"):
        S3Location("ftp://s3.test", "b", "r", key, key)
    with pytest.raises(ValueError, match="part_size"):
        ObjectStore(
            RequestTraversalAgent(FakeS3("a", "b", "r", set(), Clock().seconds)),
            Clock(),
            S3Location("http://s3.test", "b", "r", key, key),
            part_size=MiB,
        )


# -- uploads ---------------------------------------------------------------------


def test_a_file_up_to_the_part_size_is_one_put_of_known_length(
    tmp_path: Path,
) -> None:
    """A file of exactly ``part_size`` bytes goes up as one PUT with a
    Content-Length (no chunked encoding) and ``UNSIGNED-PAYLOAD``."""
    world = World()
    path, data = file_of(tmp_path, 5 * MiB)
    world.run(world.objects.put_file("blobs/x", path, len(data), "app/octet"))
    assert world.fake.operations() == ["PutObject"]
    seen = world.fake.seen[0]
    assert seen.headers["content-length"] == str(len(data))
    assert "transfer-encoding" not in seen.headers
    assert seen.headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert world.fake.objects[(BUCKET, "blobs/x")] == (data, "app/octet")


def test_a_larger_file_is_a_multipart_upload_of_known_length_parts(
    tmp_path: Path,
) -> None:
    """12 MiB with 5 MiB parts: create, three parts of 5, 5 and 2 MiB, each
    with its Content-Length and unsigned payload, then complete; the
    object is the file byte for byte, with its content type."""
    world = World()
    path, data = file_of(tmp_path, 12 * MiB + 7)
    world.run(world.objects.put_file("blobs/big", path, len(data), "app/octet"))
    assert world.fake.operations() == [
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPart",
        "UploadPart",
        "CompleteMultipartUpload",
    ]
    parts = [s for s in world.fake.seen if s.method == "PUT"]
    assert [s.query["partNumber"] for s in parts] == ["1", "2", "3"]
    assert [s.body_length for s in parts] == [5 * MiB, 5 * MiB, 2 * MiB + 7]
    assert [s.headers["content-length"] for s in parts] == [
        str(5 * MiB),
        str(5 * MiB),
        str(2 * MiB + 7),
    ]
    assert all(s.headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD" for s in parts)
    assert all(s.signed_by == "header" for s in world.fake.seen)
    assert world.fake.objects[(BUCKET, "blobs/big")] == (data, "app/octet")
    assert world.fake.uploads == {}


def test_a_failed_part_aborts_the_upload(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """When part 2 fails, the upload is aborted (no parts left behind), the
    error names the operation, key and S3's Code, and no object appears."""
    world = World()
    world.fake.fail_part = 2
    path, data = file_of(tmp_path, 11 * MiB)
    error = world.failure(world.objects.put_file("blobs/f", path, len(data), "a/b"))
    assert isinstance(error, S3Error)
    assert str(error) == "S3 UploadPart 'blobs/f': InternalError (HTTP 500)"
    assert world.fake.operations() == [
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPart",
        "AbortMultipartUpload",
    ]
    assert world.fake.aborted == ["1"] and world.fake.uploads == {}
    assert (BUCKET, "blobs/f") not in world.fake.objects
    assert_no_secret(error, *(formatEvent(e) for e in logged))


def test_an_error_in_a_200_complete_answer_aborts_the_upload(
    tmp_path: Path,
) -> None:
    """CompleteMultipartUpload may answer 200 with an ``<Error>`` body: that
    is a failure too, and the upload is aborted."""
    world = World()
    world.fake.complete_error = True
    path, data = file_of(tmp_path, 6 * MiB)
    error = world.failure(world.objects.put_file("blobs/c", path, len(data), "a/b"))
    assert isinstance(error, S3Error) and error.code == "InternalError"
    assert "CompleteMultipartUpload" in str(error)
    assert world.fake.operations()[-1] == "AbortMultipartUpload"
    assert world.fake.uploads == {}


def test_a_file_of_another_size_than_promised_is_not_sent(tmp_path: Path) -> None:
    """put_file refuses a file whose size is not the one given, before any
    request: a truncated blob must never be shared."""
    world = World()
    path, data = file_of(tmp_path, 1000)
    error = world.failure(world.objects.put_file("k", path, 999, "a/b"))
    assert isinstance(error, ValueError) and world.fake.seen == []


def test_a_silent_server_times_out_by_the_clock() -> None:
    """No answer within ``timeout`` seconds of the injected clock: the
    request is cancelled and the error says so."""
    world = World()
    world.fake.hang.add("HeadObject")
    d = Deferred.fromCoroutine(world.objects.head("k"))
    world.settle(d)
    assert not d.called
    world.clock.advance(30)
    world.agent.flush()
    with pytest.raises(S3Error, match="no progress within 30s"):
        result(d)


def test_a_stalled_or_cancelled_part_aborts_the_upload(tmp_path: Path) -> None:
    """A part that gets no answer times out and the upload is aborted; so
    it is when the caller cancels the upload while a part is in flight."""
    world = World()
    world.fake.hang.add("UploadPart")
    path, data = file_of(tmp_path, 6 * MiB)
    d = Deferred.fromCoroutine(world.objects.put_file("t", path, len(data), "a/b"))
    world.settle(d)
    assert world.fake.operations() == ["CreateMultipartUpload", "UploadPart"]
    world.clock.advance(30)
    world.settle(d)
    with pytest.raises(S3Error, match="UploadPart 't': no progress within 30s"):
        result(d)
    assert world.fake.operations()[-1] == "AbortMultipartUpload"
    assert world.fake.uploads == {}

    d = Deferred.fromCoroutine(world.objects.put_file("u", path, len(data), "a/b"))
    world.settle(d)
    d.cancel()
    world.settle(d)
    with pytest.raises(CancelledError):
        result(d)
    assert world.fake.operations()[-2:] == ["UploadPart", "AbortMultipartUpload"]
    assert world.fake.uploads == {}
    assert world.clock.getDelayedCalls() == []


# -- reads -----------------------------------------------------------------------


def test_ranged_gets_send_an_inclusive_range_for_an_exclusive_end() -> None:
    """get(key, 10, 20) asks ``bytes=10-19`` and gets 206 with those bytes;
    get(key, 5) asks ``bytes=5-``; get(key) sends no Range and gets 200."""
    world = World()
    data = bytes(range(100))
    world.run(world.objects.put_bytes("r", data, "a/b"))
    response = world.run(world.objects.get("r", 10, 20))
    assert response.code == 206 and world.body(response) == data[10:20]
    assert world.fake.seen[-1].headers["range"] == "bytes=10-19"
    response = world.run(world.objects.get("r", 5))
    assert response.code == 206 and world.body(response) == data[5:]
    assert world.fake.seen[-1].headers["range"] == "bytes=5-"
    response = world.run(world.objects.get("r"))
    assert response.code == 200 and world.body(response) == data
    assert "range" not in world.fake.seen[-1].headers
    with pytest.raises(ValueError):
        world.run(world.objects.get("r", 5, 5))


def test_missing_objects_are_none_or_not_found() -> None:
    """404: head and get_bytes give None, get raises NoSuchKey (a KeyError
    too), delete is fine."""
    world = World()
    assert world.run(world.objects.head("nope")) is None
    assert world.run(world.objects.get_bytes("nope", 100)) is None
    error = world.failure(world.objects.get("nope"))
    assert isinstance(error, NoSuchKey) and isinstance(error, KeyError)
    assert str(error) == "S3 GetObject 'nope': NoSuchKey (HTTP 404)"
    world.run(world.objects.delete("nope"))


def test_errors_name_s3s_code_and_a_missing_bucket_is_no_missing_key() -> None:
    """A bucket that is not there is NoSuchBucket (an S3Error, not
    NoSuchKey); a forbidden one is AccessDenied; check() reports both."""
    world = World()
    world.fake.buckets.clear()
    error = world.failure(world.objects.get("k"))
    assert type(error) is S3Error and error.code == "NoSuchBucket"
    assert str(error) == "S3 GetObject 'k': NoSuchBucket (HTTP 404)"
    error = world.failure(world.objects.check())
    assert isinstance(error, S3Error) and "HeadBucket 'cache'" in str(error)
    world.fake.buckets.add(BUCKET)
    world.run(world.objects.check())
    world.fake.denied.add(BUCKET)
    error = world.failure(world.objects.put_bytes("k", b"", "a/b"))
    assert isinstance(error, S3Error) and error.code == "AccessDenied"
    error = world.failure(world.objects.check())
    assert isinstance(error, S3Error) and error.status == 403
    assert_no_secret(error)


def test_get_bytes_stops_at_its_limit() -> None:
    """An object over the limit is refused, not read whole."""
    world = World()
    world.run(world.objects.put_bytes("big", b"x" * 1000, "a/b"))
    assert world.run(world.objects.get_bytes("big", 1000)) == (b"x" * 1000, "a/b")
    error = world.failure(world.objects.get_bytes("big", 999))
    assert isinstance(error, S3Error) and "over" in str(error)


# -- presigned URLs --------------------------------------------------------------


def test_presigned_urls_are_query_signed_and_expire() -> None:
    """A presigned GET URL carries the SigV4 query parameters (credential
    scope, date from the clock, expiry, signed host, a 64-hex signature)
    and no secret; S3 serves it without headers until it expires."""
    world = World()
    world.run(world.objects.put_bytes("p/q r", b"payload", "a/b"))
    url = world.objects.presign_get("p/q r", 600)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "http",
        "s3.test:7480",
        "/cache/p/q%20r",
    )
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-Credential"] == f"{ACCESS}/20210101/{REGION}/s3/aws4_request"
    assert query["X-Amz-Date"] == "20210101T000000Z"
    assert query["X-Amz-Expires"] == "600"
    assert query["X-Amz-SignedHeaders"] == "host"
    assert re.fullmatch(r"[0-9a-f]{64}", query["X-Amz-Signature"])
    assert SECRET not in url
    response = world.run(_plain_get(world, url))
    assert response.code == 200 and world.body(response) == b"payload"
    assert world.fake.seen[-1].signed_by == "query"
    world.clock.advance(601)
    response = world.run(_plain_get(world, url))
    assert response.code == 403
    with pytest.raises(ValueError):
        world.objects.presign_get("k", 0)
    with pytest.raises(ValueError):
        world.objects.presign_get("k", 7 * 24 * 3600 + 1)


async def _plain_get(world: World, url: str) -> IResponse:
    response: IResponse = await world.agent.request(b"GET", url.encode("ascii"))
    return response


# -- the shared store ------------------------------------------------------------


def test_blobs_live_under_their_digest(tmp_path: Path) -> None:
    """put_blob stores ``blobs/<alg>/<hex>``, skips the upload when the same
    size is already there, and blob_size, open_blob (ranged) and delete_blob
    work on that key."""
    world = World()
    path, data = file_of(tmp_path, 3000)
    digest = Digest.of(data)
    world.run(world.shared.put_blob(digest, path, len(data)))
    key = f"blobs/sha256/{digest.hex}"
    assert world.fake.objects[(BUCKET, key)] == (data, "application/octet-stream")
    before = len(world.fake.seen)
    world.run(world.shared.put_blob(digest, path, len(data)))
    assert world.fake.operations()[before:] == ["HeadObject"]
    assert world.run(world.shared.blob_size(digest)) == 3000
    response = world.run(world.shared.open_blob(digest, 100, 200))
    assert world.body(response) == data[100:200]
    assert f"/cache/{key}?" in world.shared.blob_url(digest, 60)
    world.run(world.shared.delete_blob(digest))
    assert world.run(world.shared.blob_size(digest)) is None


def test_manifests_are_checked_against_their_digest() -> None:
    """put_manifest stores the body with its media type and refuses bytes
    that do not match the digest; manifest() gives them back, and gives
    None for an object that no longer matches its digest."""
    world = World()
    body = b'{"schemaVersion":2,"layers":[]}'
    digest = Digest.of(body)
    world.run(world.shared.put_manifest(digest, OCI_MANIFEST, body))
    key = (BUCKET, f"manifests/sha256/{digest.hex}")
    assert world.fake.objects[key] == (body, OCI_MANIFEST)
    assert world.run(world.shared.manifest(digest)) == (OCI_MANIFEST, body)
    with pytest.raises(ValueError):
        world.run(world.shared.put_manifest(digest, OCI_MANIFEST, body + b" "))
    world.fake.objects[key] = (body + b" ", OCI_MANIFEST)
    assert world.run(world.shared.manifest(digest)) is None
    assert world.run(world.shared.manifest(Digest.of(b"other"))) is None


IMAGE = b'{"schemaVersion":2,"config":{},"layers":[]}'
INDEX = b'{"schemaVersion":2,"manifests":[]}'


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        # The document's shape and mediaType decide, as for an upstream's.
        (IMAGE, OCI_MANIFEST, OCI_MANIFEST),
        (IMAGE, f"{OCI_MANIFEST}; charset=utf-8", OCI_MANIFEST),
        (IMAGE, "text/html", OCI_MANIFEST),
        (INDEX, "", OCI_INDEX),
        (
            b'{"schemaVersion":2,"mediaType":"%s","layers":[]}'
            % DOCKER_MANIFEST.encode(),
            DOCKER_MANIFEST,
            DOCKER_MANIFEST,
        ),
        # No manifest at all, whatever the object's Content-Type says.
        (b"<html>hello</html>", OCI_MANIFEST, None),
        (b'{"schemaVersion":1,"layers":[]}', OCI_MANIFEST, None),
        (b'{"schemaVersion":2,"layers":[],"manifests":[]}', OCI_MANIFEST, None),
        # A Content-Type of another manifest shape than the document's.
        (INDEX, OCI_MANIFEST, None),
        (IMAGE, OCI_INDEX, None),
        (
            b'{"schemaVersion":2,"mediaType":"%s","layers":[]}' % OCI_MANIFEST.encode(),
            DOCKER_MANIFEST,
            None,
        ),
    ],
)
def test_shared_manifests_get_the_check_upstream_manifests_get(
    body: bytes, content_type: str, expected: str | None
) -> None:
    """A manifest read back from the bucket gets the media type and shape
    check an upstream's answer gets (``reference.manifest_media_type``):
    its Content-Type is believed only when the document agrees, and an
    object that is no manifest is ignored, never served as one (issue 16,
    item 10)."""
    world = World()
    digest = Digest.of(body)
    world.fake.objects[(BUCKET, f"manifests/sha256/{digest.hex}")] = (
        body,
        content_type,
    )
    found = world.run(world.shared.manifest(digest))
    assert found == (None if expected is None else (expected, body))


def test_shared_manifests_are_capped() -> None:
    """A shared manifest object over the 4 MiB limit is refused."""
    world = World()
    body = b" " * (MAX_MANIFEST_SIZE + 1)
    world.fake.objects[(BUCKET, f"manifests/sha256/{Digest.of(body).hex}")] = (
        body,
        OCI_MANIFEST,
    )
    error = world.failure(world.shared.manifest(Digest.of(body)))
    assert isinstance(error, S3Error)
