"""
:mod:`regmirror.s3` against a real Ceph RGW: multipart uploads of known
length with ``UNSIGNED-PAYLOAD``, byte-exact and ranged reads, HEAD and
DELETE, presigned URLs fetched by a plain HTTP client, manifests and blobs
by digest, and the errors RGW gives.

Each operation runs in its own process with the real reactor
(``programs/s3_client.py``); the keys reach it through its environment and
must never show up in what it prints.

Path addressing only: virtual-host addressing needs ``rgw dns name`` in
RGW's configuration and a resolver for ``<bucket>.<host>``; the unit tests
pin it against the in-memory S3.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .engines import CephRGW
from .servers import PROGRAMS

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
CLIENT_TIMEOUT = 120.0
HTTP_TIMEOUT = 30.0
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class S3Failed(AssertionError):
    """The program reported an S3 error (its JSON is ``.answer``)."""

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__(json.dumps(answer))
        self.answer = answer


class S3Client:
    """Runs ``programs/s3_client.py`` against one bucket of an RGW."""

    def __init__(
        self,
        rgw: CephRGW,
        bucket: str,
        *,
        part_size: int | None = None,
        secret_key: str | None = None,
        region: str | None = None,
    ) -> None:
        self.rgw = rgw
        self.secret_key = rgw.secret_key if secret_key is None else secret_key
        self.env = dict(os.environ)
        self.env.update(
            S3_ENDPOINT=rgw.endpoint,
            S3_BUCKET=bucket,
            S3_REGION=rgw.region if region is None else region,
            S3_ACCESS_KEY=rgw.access_key,
            S3_SECRET_KEY=self.secret_key,
            S3_TIMEOUT="30",
        )
        if part_size is not None:
            self.env["S3_PART_SIZE"] = str(part_size)

    def _run(self, args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, str(PROGRAMS / "s3_client.py"), *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
        )
        for secret in {self.secret_key, self.rgw.secret_key}:
            assert secret not in done.stdout + done.stderr, "a secret key was printed"
        return done

    def __call__(self, *args: str) -> Any:
        """The operation's answer; :class:`S3Failed` for an S3 error."""
        done = self._run(args)
        if done.returncode == 3:
            raise S3Failed(json.loads(done.stdout))
        assert done.returncode == 0, f"s3_client {args[0]} failed:\n{done.stderr}"
        return json.loads(done.stdout)

    def fails(self, *args: str) -> dict[str, Any]:
        """The error answer of an operation that must fail."""
        with pytest.raises(S3Failed) as failed:
            self(*args)
        return failed.value.answer


def some_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_rgw_multipart_upload_reads_back_byte_exact(
    tmp_path: Path, ceph_rgw: CephRGW, s3_bucket: str
) -> None:
    """A 12 MiB file with 5 MiB parts goes up as a three-part multipart
    upload (RGW's ETag says ``-3``), every part a body of known length with
    an unsigned payload, and comes back byte for byte."""
    s3 = S3Client(ceph_rgw, s3_bucket, part_size=5 * MiB)
    data = some_bytes(12 * MiB, 1)
    s3("put-file", "blobs/big", write(tmp_path / "big", data))
    assert s3("head", "blobs/big") == {
        "size": len(data),
        "content_type": "application/octet-stream",
    }
    answer = s3("get", "blobs/big", str(tmp_path / "back"))
    assert answer["code"] == 200 and answer["length"] == len(data)
    assert answer["etag"].strip('"').endswith("-3"), answer
    assert (tmp_path / "back").read_bytes() == data


def test_rgw_single_put_and_ranged_gets(
    tmp_path: Path, ceph_rgw: CephRGW, s3_bucket: str
) -> None:
    """A file under the part size is one PUT (a plain ETag); ranged GETs
    with an exclusive end answer 206 with exactly those bytes."""
    s3 = S3Client(ceph_rgw, s3_bucket)
    data = some_bytes(6 * MiB + 17, 2)
    s3("put-file", "blobs/one", write(tmp_path / "one", data))
    for start, end in ((0, 1), (1000, 5 * MiB + 17), (len(data) - 10, None)):
        out = tmp_path / f"range-{start}"
        args = ["get", "blobs/one", str(out), "--start", str(start)]
        if end is not None:
            args += ["--end", str(end)]
        answer = s3(*args)
        last = len(data) - 1 if end is None else end - 1
        assert answer["code"] == 206
        assert answer["content_range"] == f"bytes {start}-{last}/{len(data)}"
        assert "-" not in answer["etag"].strip('"')
        assert out.read_bytes() == data[start:end]


def test_rgw_head_and_delete(tmp_path: Path, ceph_rgw: CephRGW, s3_bucket: str) -> None:
    """HEAD gives size and content type; after DELETE it gives nothing, a
    GET raises NoSuchKey, and deleting again is fine."""
    s3 = S3Client(ceph_rgw, s3_bucket)
    s3(
        "put-bytes",
        "x/small.json",
        write(tmp_path / "small", b'{"a": 1}'),
        "--content-type",
        "application/json",
    )
    assert s3("head", "x/small.json") == {"size": 8, "content_type": "application/json"}
    s3("delete", "x/small.json")
    assert s3("head", "x/small.json") is None
    failure = s3.fails("get", "x/small.json", str(tmp_path / "gone"))
    assert failure["error"] == "NoSuchKey" and failure["code"] == "NoSuchKey"
    assert failure["status"] == 404 and "GetObject 'x/small.json'" in failure["message"]
    s3("delete", "x/small.json")


def test_rgw_presigned_url_serves_a_plain_http_client(
    tmp_path: Path, ceph_rgw: CephRGW, s3_bucket: str
) -> None:
    """A presigned URL fetched with urllib (no credentials of its own) gives
    the object's bytes; the same URL with its signature changed is refused."""
    s3 = S3Client(ceph_rgw, s3_bucket)
    data = some_bytes(300_000, 3)
    s3("put-file", "blobs/p q", write(tmp_path / "p", data))
    url = s3("presign", "blobs/p q", "300")["url"]
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=300" in url
    assert ceph_rgw.secret_key not in url
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        assert response.status == 200 and response.read() == data
    signature = url.rsplit("X-Amz-Signature=", 1)[1]
    forged = url.replace(signature, "0" * len(signature))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged, timeout=HTTP_TIMEOUT)
    assert refused.value.code == 403


def test_rgw_shared_manifests_and_blobs_by_digest(
    tmp_path: Path, ceph_rgw: CephRGW, s3_bucket: str
) -> None:
    """put_manifest and manifest round-trip a manifest with its media type
    under its digest; an absent one is None.  put_blob shares a blob under
    its digest, blob_size and a ranged open_blob read it back."""
    s3 = S3Client(ceph_rgw, s3_bucket)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []})
    raw = body.encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    s3("put-manifest", digest, OCI_MANIFEST, write(tmp_path / "m", raw))
    assert s3("manifest", digest, str(tmp_path / "m-back")) == {
        "media_type": OCI_MANIFEST
    }
    assert (tmp_path / "m-back").read_bytes() == raw
    absent = "sha256:" + hashlib.sha256(b"absent").hexdigest()
    assert s3("manifest", absent, str(tmp_path / "none")) is None

    blob = some_bytes(MiB + 5, 4)
    blob_digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert s3("blob-size", blob_digest) is None
    s3("put-blob", blob_digest, write(tmp_path / "blob", blob))
    assert s3("blob-size", blob_digest) == len(blob)
    answer = s3(
        "open-blob", blob_digest, str(tmp_path / "part"), "--start", "7", "--end", "70"
    )
    assert answer["code"] == 206 and (tmp_path / "part").read_bytes() == blob[7:70]


def test_rgw_errors_name_the_code_and_never_the_secret(
    tmp_path: Path, ceph_rgw: CephRGW, s3_bucket: str
) -> None:
    """The bucket passes check(); a missing bucket and a wrong secret key
    fail it and other operations with S3's status and Code, and the keys
    appear in no output (checked on every run)."""
    S3Client(ceph_rgw, s3_bucket)("check")
    missing = S3Client(ceph_rgw, s3_bucket + "-missing")
    failure = missing.fails("check")
    assert failure["status"] == 404 and "HeadBucket" in failure["message"]
    failure = missing.fails("get", "k", str(tmp_path / "k"))
    assert failure["error"] == "S3Error" and failure["code"] == "NoSuchBucket"
    wrong = S3Client(
        ceph_rgw, s3_bucket, secret_key="wrong-" + ceph_rgw.secret_key[::-1]
    )
    assert wrong.fails("check")["status"] == 403
    failure = wrong.fails("put-bytes", "k", write(tmp_path / "k", b"x"))
    assert failure["code"] == "SignatureDoesNotMatch" and failure["status"] == 403
