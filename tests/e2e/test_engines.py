"""
The cluster's engines as the tests start them: Redis answers and survives
a restart at the same address; Ceph RGW stores and serves objects over
signed S3 requests (plain, ranged, multipart) and refuses unsigned ones.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import xml.etree.ElementTree as ET
from urllib.parse import quote

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from .engines import CephRGW, RedisServer

MiB = 1 << 20
_S3 = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def test_redis_answers_ping(redis: RedisServer) -> None:
    """The session's Redis answers PING at the URL it advertises."""
    assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
    assert redis.command("PING") == b"PONG"


def test_redis_is_flushed_before_each_test(redis: RedisServer) -> None:
    """A test starts with an empty Redis, and values round-trip."""
    assert redis.command("DBSIZE") == 0
    assert redis.command("SET", "lease", "worker-1") == b"OK"
    assert redis.command("GET", "lease") == b"worker-1"


def test_redis_restarts_on_the_same_port(redis: RedisServer) -> None:
    """
    Stopped, Redis refuses connections; started again it answers on the
    same port, empty (no persistence).
    """
    port = redis.port
    redis.command("SET", "key", "value")
    redis.stop()
    assert not redis.running
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    redis.start()
    assert redis.port == port
    assert redis.command("PING") == b"PONG"
    assert redis.command("GET", "key") is None


def test_redis_fixture_starts_a_stopped_server_again(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    """
    A test may stop Redis: the ``redis`` fixture of the next test starts it
    again, empty.
    """
    redis_server.stop()
    assert not redis_server.running
    redis = request.getfixturevalue("redis")
    assert redis.running
    assert redis.command("PING") == b"PONG"
    assert redis.command("DBSIZE") == 0


def _upload_id(rgw: CephRGW, bucket: str, key: str) -> str:
    response = rgw.request("POST", f"/{bucket}/{key}?uploads")
    assert response.status == 200, response.body
    upload_id = ET.fromstring(response.body).findtext(f"{_S3}UploadId")
    assert upload_id
    return quote(upload_id, safe="")


def _multipart(rgw: CephRGW, bucket: str, key: str, parts: list[bytes]) -> int:
    """Upload *parts* as one multipart object; the completion's status."""
    upload = _upload_id(rgw, bucket, key)
    listing = []
    for number, part in enumerate(parts, start=1):
        response = rgw.request(
            "PUT", f"/{bucket}/{key}?partNumber={number}&uploadId={upload}", part
        )
        assert response.status == 200, response.body
        listing.append(
            f"<Part><PartNumber>{number}</PartNumber>"
            f"<ETag>{response.header('ETag')}</ETag></Part>"
        )
    completion = (
        "<CompleteMultipartUpload>" + "".join(listing) + "</CompleteMultipartUpload>"
    )
    return rgw.request(
        "POST", f"/{bucket}/{key}?uploadId={upload}", completion.encode()
    ).status


def test_rgw_round_trips_an_object(ceph_rgw: CephRGW, s3_bucket: str) -> None:
    """
    A signed PUT with a known length stores the bytes (ETag = MD5); a
    signed GET gives the same bytes back.
    """
    body = os.urandom(300_000)
    put = ceph_rgw.request("PUT", f"/{s3_bucket}/blobs/sha256/one", body)
    assert put.status == 200, put.body
    assert put.header("ETag") == f'"{hashlib.md5(body).hexdigest()}"'
    get = ceph_rgw.request("GET", f"/{s3_bucket}/blobs/sha256/one")
    assert get.status == 200
    assert get.body == body


def test_rgw_serves_a_range(ceph_rgw: CephRGW, s3_bucket: str) -> None:
    """A ranged GET answers 206 with exactly the range and its Content-Range."""
    body = bytes(range(256)) * 40
    assert ceph_rgw.request("PUT", f"/{s3_bucket}/ranged", body).status == 200
    get = ceph_rgw.request(
        "GET", f"/{s3_bucket}/ranged", headers={"Range": "bytes=1000-1999"}
    )
    assert get.status == 206
    assert get.body == body[1000:2000]
    assert get.header("Content-Range") == f"bytes 1000-1999/{len(body)}"


def test_rgw_refuses_unsigned_and_badly_signed_requests(
    ceph_rgw: CephRGW, s3_bucket: str
) -> None:
    """
    Buckets are private: an unsigned GET of an object that exists is
    refused with 403, and so is one signed with the wrong secret.
    """
    assert ceph_rgw.request("PUT", f"/{s3_bucket}/private", b"secret").status == 200
    unsigned = ceph_rgw.request("GET", f"/{s3_bucket}/private", signed=False)
    assert unsigned.status == 403
    assert b"secret" not in unsigned.body
    url = f"{ceph_rgw.endpoint}/{s3_bucket}/private"
    request = AWSRequest(method="GET", url=url, data=b"")
    credentials = Credentials(ceph_rgw.access_key, "not-" + ceph_rgw.secret_key)
    S3SigV4Auth(credentials, "s3", ceph_rgw.region).add_auth(request)
    forged = ceph_rgw.request(
        "GET", f"/{s3_bucket}/private", headers=dict(request.headers), signed=False
    )
    assert forged.status == 403
    assert b"SignatureDoesNotMatch" in forged.body


def test_rgw_completes_a_multipart_upload(ceph_rgw: CephRGW, s3_bucket: str) -> None:
    """
    A multipart upload of a 5 MiB part and a short last part completes, and
    the object reads back as the parts joined.
    """
    parts = [os.urandom(5 * MiB), os.urandom(12_345)]
    assert _multipart(ceph_rgw, s3_bucket, "multi", parts) == 200
    get = ceph_rgw.request("GET", f"/{s3_bucket}/multi")
    assert get.status == 200
    assert len(get.body) == 5 * MiB + 12_345
    assert get.body == b"".join(parts)


def test_rgw_refuses_small_parts_at_completion(
    ceph_rgw: CephRGW, s3_bucket: str
) -> None:
    """
    Parts under 5 MiB (but the last) are taken one by one and refused only
    when the upload is completed (400 EntityTooSmall): the S3 store must
    size its parts.
    """
    parts = [os.urandom(MiB), os.urandom(10)]
    assert _multipart(ceph_rgw, s3_bucket, "small-parts", parts) == 400
    assert ceph_rgw.request("GET", f"/{s3_bucket}/small-parts").status == 404


def test_rgw_refuses_chunked_uploads(ceph_rgw: CephRGW, s3_bucket: str) -> None:
    """A PUT without a length (chunked transfer encoding) is refused with 411."""
    connection = http.client.HTTPConnection("127.0.0.1", ceph_rgw.port, timeout=10)
    try:
        connection.request(
            "PUT", f"/{s3_bucket}/chunked", body=iter([b"abc"]), encode_chunked=True
        )
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 411
