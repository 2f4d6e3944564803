"""
``regmirror prefetch``: warm the cache with images, through a running
mirror (``--mirror``) or through one run in this process on a loopback
port (``-c``).
"""

from __future__ import annotations

import argparse
import base64
import hmac
import http.client
import json
import os
import secrets
from collections.abc import Callable, Sequence
from typing import Any, TextIO
from urllib.parse import urlsplit

import attrs
from twisted.web.resource import NoResource, Resource

from regmirror._cli import Failed, human_size
from regmirror.config import Config
from regmirror.reference import INDEX_TYPES, MANIFEST_TYPES, parse_digest
from regmirror.service import validate

ACCEPT = ", ".join(MANIFEST_TYPES)
CHUNK = 1024 * 1024


def run_prefetch(arguments: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    if arguments.mirror:
        headers = {}
        if arguments.user:
            password = _password(arguments)
            pair = f"{arguments.user}:{password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        return prefetch(
            arguments.mirror,
            arguments.images,
            arguments.platform,
            out,
            arguments.json,
            headers,
        )
    if arguments.user or arguments.password_file:
        raise Failed("--user goes with --mirror: -c fills the cache as its owner")
    config = validate(arguments.config)
    return _prefetch_directly(config, arguments, out)


def _password(arguments: argparse.Namespace) -> str:
    """The --user's password: never on the command line, where ps shows it."""
    if arguments.password_file:
        try:
            with open(arguments.password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as e:
            raise Failed(
                f"cannot read {arguments.password_file}: {e.strerror}"
            ) from None
    password = os.environ.get("REGMIRROR_PASSWORD")
    if password is None:
        raise Failed("--user needs REGMIRROR_PASSWORD or --password-file")
    return password


#: The header that the in-process mirror of ``prefetch -c`` wants.
PREFETCH_HEADER = "Regmirror-Prefetch"


class _OwnerOnly(Resource):
    """
    The in-process mirror of ``prefetch -c`` answers only requests that
    carry this run's secret: it serves every namespace without the
    configuration's access rules (the command's user can read the
    configuration and the cache anyway), so nobody else on the machine may
    use its loopback port meanwhile.
    """

    def __init__(self, inner: Resource, secret: str) -> None:
        super().__init__()
        self._inner = inner
        self._secret = secret.encode("ascii")

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        given = request.getHeader(PREFETCH_HEADER.lower().encode("ascii")) or b""
        if not hmac.compare_digest(given, self._secret):
            return NoResource("not this prefetch's mirror")
        child: Resource = self._inner.getChildWithDefault(path, request)
        return child


def _prefetch_directly(
    config: Config, arguments: argparse.Namespace, out: TextIO
) -> dict[str, Any]:
    """
    Run a mirror in this process on a loopback port and prefetch through it,
    without the configuration's access rules; then check that what was
    fetched is still in the cache (a ``max_size`` smaller than the images
    evicts them again).
    """
    from twisted.internet import reactor, threads
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.task import react
    from twisted.web.server import Site

    from regmirror.service import build_mirror

    outcome: dict[str, Any] = {}
    secret = secrets.token_urlsafe(32)

    async def run(_: Any) -> None:
        mirror = build_mirror(attrs.evolve(config, access=None), reactor)
        mirror.store.open(clean=False)
        site = Site(_OwnerOnly(mirror.site.resource, secret))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        url = f"http://127.0.0.1:{port.getHost().port}"
        try:
            result = await threads.deferToThread(
                prefetch,
                url,
                arguments.images,
                arguments.platform,
                out,
                arguments.json,
                {PREFETCH_HEADER: secret},
            )
            store = mirror.store
            if store.over_limit():
                # What each download's own eviction would do a moment later.
                store.evict(await threads.deferToThread(store.by_last_use))
            gone = [
                digest
                for digest in result["digests"]
                if store.blob_size(parse_digest(digest)) is None
            ]
            if gone:
                limit = mirror.store.max_size
                raise Failed(
                    f"{len(gone)} of {len(result['digests'])} blobs were evicted "
                    f"again: the cache's max_size ({human_size(limit or 0)}) is "
                    "smaller than what was prefetched"
                )
            outcome["result"] = result
        except Failed as error:
            outcome["error"] = error
        finally:
            await port.stopListening()

    def start(reactor_: Any) -> Any:
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(run(reactor_))

    try:
        react(start)
    except SystemExit:
        pass  # react always exits; the outcome says how it went
    if "result" not in outcome:
        raise outcome.get("error", Failed("prefetch failed"))
    result: dict[str, Any] = outcome["result"]
    return result


def prefetch(
    mirror: str,
    images: Sequence[str],
    platform: str | None,
    out: TextIO,
    quiet: bool = False,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """
    Pull every manifest and blob of *images* through the mirror at *mirror*,
    reading and discarding the bytes; *headers* go with every request.

    :raises Failed: after trying every image, naming those that could not
        be fetched.
    """
    parts = urlsplit(mirror)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Failed(f"--mirror must be an http(s) URL, not {mirror!r}")
    factory: Callable[..., http.client.HTTPConnection] = (
        http.client.HTTPSConnection
        if parts.scheme == "https"
        else http.client.HTTPConnection
    )
    connection = factory(parts.hostname, parts.port, timeout=300)

    def get(path: str, accept: str | None = None) -> http.client.HTTPResponse:
        sent = {**(headers or {}), **({"Accept": accept} if accept else {})}
        connection.request("GET", path, headers=sent)
        response = connection.getresponse()
        if response.status != 200:
            body = response.read(64 * 1024).decode("utf-8", "replace")
            connection.close()  # the rest of the body is not read
            raise Failed(f"GET {path}: {response.status} {body.strip()[:200]}")
        return response

    summary: dict[str, Any] = {"images": [], "bytes": 0, "blobs": 0, "digests": []}
    progress = _Progress(out, enabled=not quiet)
    failed = []
    for image in images:
        name, separator, reference = image.rpartition("@" if "@" in image else ":")
        if not separator:
            name, reference = image, "latest"
        try:
            digest = _fetch_image(get, name, reference, platform, summary, progress)
        except (Failed, OSError, http.client.HTTPException, ValueError) as e:
            connection.close()  # opened again by the next request
            failed.append(f"{image} ({e})")
            progress.line(f"{image}: {e}")
            continue
        summary["images"].append({"image": image, "digest": digest})
        progress.line(f"{image}: {digest}")
    connection.close()
    progress.line(
        f"{len(summary['images'])} images, {summary['blobs']} blobs, "
        f"{human_size(summary['bytes'])}"
    )
    if failed:
        raise Failed(
            f"{len(failed)} of {len(images)} images failed: {'; '.join(failed)}"
        )
    return summary


Get = Callable[..., http.client.HTTPResponse]


def _fetch_image(
    get: Get,
    name: str,
    reference: str,
    platform: str | None,
    summary: dict[str, Any],
    progress: _Progress,
) -> str:
    """Fetch one image (every platform of an index, or *platform*'s); its
    digest.  Blobs already in ``summary["digests"]`` are not fetched again."""
    response = get(f"/v2/{name}/manifests/{reference}", ACCEPT)
    body = response.read()
    digest = response.getheader("Docker-Content-Digest") or ""
    media_type = (response.getheader("Content-Type") or "").split(";")[0]
    document = json.loads(body)
    if media_type in INDEX_TYPES:
        for entry in document.get("manifests", []):
            described = entry.get("platform", {})
            label = f"{described.get('os')}/{described.get('architecture')}"
            if described.get("variant"):
                label += f"/{described['variant']}"
            if (
                platform is None
                or label == platform
                or label.startswith(platform + "/")
            ):
                _fetch_image(get, name, entry["digest"], None, summary, progress)
        return digest
    blobs = [document.get("config", {}), *document.get("layers", [])]
    for blob in blobs:
        blob_digest = blob.get("digest")
        if not blob_digest or blob_digest in summary["digests"]:
            continue
        response = get(f"/v2/{name}/blobs/{blob_digest}")
        total = int(response.getheader("Content-Length") or 0)
        received = 0
        while chunk := response.read(CHUNK):
            received += len(chunk)
            progress.bar(blob_digest, received, total)
        summary["digests"].append(blob_digest)
        summary["bytes"] += received
        summary["blobs"] += 1
        progress.done(blob_digest, received)
    return digest


class _Progress:
    """One line per blob; a live bar when the output is a terminal."""

    def __init__(self, out: TextIO, enabled: bool) -> None:
        self._out = out
        self._enabled = enabled
        self._live = enabled and out.isatty()

    def bar(self, digest: str, received: int, total: int) -> None:
        if not self._live:
            return
        share = received / total if total else 0
        filled = int(share * 30)
        print(
            f"\r  {digest[:19]}  [{'#' * filled}{'.' * (30 - filled)}] "
            f"{human_size(received)} / {human_size(total)}",
            end="",
            file=self._out,
            flush=True,
        )

    def done(self, digest: str, received: int) -> None:
        if self._enabled:
            prefix = "\r" if self._live else ""
            print(
                f"{prefix}  {digest[:19]}  {human_size(received)}" + " " * 40,
                file=self._out,
            )

    def line(self, text: str) -> None:
        if self._enabled:
            print(text, file=self._out)
