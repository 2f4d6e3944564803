"""
One operation of :mod:`regmirror.s3` against a real S3 service, run by the
end-to-end tests in a process of its own with the real reactor
(``twisted.internet.task.react``), as ``python s3_client.py OPERATION ...``.

The location comes from the environment, the keys too, so that they are on
no command line: ``S3_ENDPOINT``, ``S3_BUCKET``, ``S3_REGION``,
``S3_ACCESS_KEY``, ``S3_SECRET_KEY``, ``S3_ADDRESSING`` (default ``path``),
``S3_PART_SIZE`` (bytes, default the store's) and ``S3_TIMEOUT`` (seconds).

Operations (``ObjectStore`` unless said)::

    check
    head KEY                          -> {"size": N, "content_type": T} | null
    get KEY OUT [--start N] [--end N] -> {"code", "content_range", "etag", "length"}
    put-file KEY PATH [--content-type T]
    put-bytes KEY PATH [--content-type T]
    delete KEY
    presign KEY EXPIRES               -> {"url": U}
    put-blob DIGEST PATH              (SharedStore)
    blob-size DIGEST                  (SharedStore) -> N | null
    open-blob DIGEST OUT [--start N] [--end N]  (SharedStore) -> as get
    put-manifest DIGEST MEDIA PATH    (SharedStore)
    manifest DIGEST OUT               (SharedStore) -> {"media_type": T} | null

The answer is one JSON document on stdout.  A failure prints
``{"error": CLASS, "message": M, "code": C, "status": S}`` and exits 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import react
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from regmirror.config import Secret
from regmirror.reference import parse_digest
from regmirror.s3.errors import S3Error
from regmirror.s3.location import S3Location
from regmirror.s3.objects import ObjectStore
from regmirror.s3.shared import SharedStore


class ToFile(Protocol):
    """Writes a response body to a file."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 -- closed in connectionLost
        self.done: Deferred[int] = Deferred()
        self.length = 0

    def dataReceived(self, data: bytes) -> None:
        self.file.write(data)
        self.length += len(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.file.close()
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.length)
        else:
            self.done.errback(reason)


async def save(response: IResponse, path: str) -> dict[str, Any]:
    sink = ToFile(path)
    response.deliverBody(sink)
    length = await sink.done

    def first(name: bytes) -> str | None:
        values = response.headers.getRawHeaders(name)
        return values[0].decode("latin-1") if values else None

    return {
        "code": response.code,
        "content_range": first(b"content-range"),
        "etag": first(b"etag"),
        "length": length,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("operation")
    parser.add_argument("arguments", nargs="*")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--end", type=int, default=None)
    parser.add_argument("--content-type", default="application/octet-stream")
    return parser.parse_args(argv)


async def run(options: argparse.Namespace) -> Any:
    env = os.environ
    location = S3Location(
        env["S3_ENDPOINT"],
        env["S3_BUCKET"],
        env["S3_REGION"],
        Secret(env["S3_ACCESS_KEY"]),
        Secret(env["S3_SECRET_KEY"]),
        env.get("S3_ADDRESSING", "path"),
    )
    settings: dict[str, Any] = {}
    if "S3_PART_SIZE" in env:
        settings["part_size"] = int(env["S3_PART_SIZE"])
    if "S3_TIMEOUT" in env:
        settings["timeout"] = float(env["S3_TIMEOUT"])
    pool = HTTPConnectionPool(reactor)
    objects = ObjectStore(Agent(reactor, pool=pool), reactor, location, **settings)
    shared = SharedStore(objects)
    operation, args = options.operation, options.arguments
    try:
        if operation == "check":
            await objects.check()
            return None
        if operation == "head":
            info = await objects.head(args[0])
            return (
                None
                if info is None
                else {"size": info.size, "content_type": info.content_type}
            )
        if operation == "get":
            response = await objects.get(args[0], options.start, options.end)
            return await save(response, args[1])
        if operation == "put-file":
            size = os.path.getsize(args[1])
            await objects.put_file(args[0], args[1], size, options.content_type)
            return None
        if operation == "put-bytes":
            with open(args[1], "rb") as f:
                data = f.read()
            await objects.put_bytes(args[0], data, options.content_type)
            return None
        if operation == "delete":
            await objects.delete(args[0])
            return None
        if operation == "presign":
            return {"url": objects.presign_get(args[0], int(args[1]))}
        if operation == "put-blob":
            size = os.path.getsize(args[1])
            await shared.put_blob(parse_digest(args[0]), args[1], size)
            return None
        if operation == "blob-size":
            return await shared.blob_size(parse_digest(args[0]))
        if operation == "open-blob":
            digest = parse_digest(args[0])
            response = await shared.open_blob(digest, options.start, options.end)
            return await save(response, args[1])
        if operation == "put-manifest":
            with open(args[2], "rb") as f:
                body = f.read()
            await shared.put_manifest(parse_digest(args[0]), args[1], body)
            return None
        if operation == "manifest":
            found = await shared.manifest(parse_digest(args[0]))
            if found is None:
                return None
            with open(args[1], "wb") as f:
                f.write(found[1])
            return {"media_type": found[0]}
        raise SystemExit(f"unknown operation {operation!r}")
    finally:
        await pool.closeCachedConnections()


def main(reactor_: Any, argv: list[str]) -> Deferred[None]:
    async def go() -> None:
        try:
            answer = await run(parse(argv))
        except S3Error as e:
            failure = {
                "error": type(e).__name__,
                "message": str(e),
                "code": e.code,
                "status": e.status,
            }
            print(json.dumps(failure), flush=True)
            raise SystemExit(3) from None
        print(json.dumps(answer), flush=True)

    return Deferred.fromCoroutine(go())


if __name__ == "__main__":
    react(main, (sys.argv[1:],))
