"""
``regmirror``: the operator's command line.

::

    regmirror check-config -c etc/mirror.ini
    regmirror cache stats|ls|verify|gc -c etc/mirror.ini
    regmirror cache purge -c etc/mirror.ini sha256:… docker.io/library/busybox:latest
    regmirror prefetch --mirror http://127.0.0.1:5000 ghcr.io/org/app:v1
    regmirror prefetch -c etc/mirror.ini busybox:latest   (no running mirror)

Every command prints for people by default and JSON with ``--json``; the
exit status is 0 on success, 1 on failure, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import http.client
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO
from urllib.parse import urlsplit

import attrs
from twisted.web.resource import NoResource, Resource

from regmirror.config import Config, ConfigError
from regmirror.errors import RegistryError
from regmirror.reference import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    parse_digest,
    validate_name,
    validate_tag,
)
from regmirror.service import validate
from regmirror.store import Store


class Failed(Exception):
    """A command failed; the message says why, in one line."""


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; the process's exit status."""
    out = out or sys.stdout
    parser = _parser()
    arguments = parser.parse_args(argv)
    try:
        result = arguments.run(arguments, out)
    except (Failed, ConfigError) as error:
        if arguments.json:
            print(json.dumps({"ok": False, "error": str(error)}), file=out)
        else:
            print(f"regmirror: {error}", file=sys.stderr)
        return 1
    # A command that did its work but found something wrong (cache verify
    # finding corrupt files) says so with "ok": false and status 1.
    ok = bool(result.pop("ok", True))
    if arguments.json:
        print(json.dumps({"ok": ok, **result}, indent=2, sort_keys=True), file=out)
    return 0 if ok else 1


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "-c", "--config", required=True, help="the INI file (e.g. etc/mirror.ini)"
    )

    parser = argparse.ArgumentParser(
        prog="regmirror", description="Operate a regmirror pull-through cache."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check-config",
        parents=[common, config],
        help="validate the configuration as start-up does",
    )
    check.set_defaults(run=check_config)

    cache = commands.add_parser("cache", help="look at and tend the cache")
    actions = cache.add_subparsers(required=True, metavar="ACTION")
    for name, run, text in (
        ("stats", cache_stats, "size and counts"),
        ("ls", cache_ls, "cached tags (and blobs with --blobs)"),
        ("verify", cache_verify, "re-hash everything, remove corrupt files"),
        ("gc", cache_gc, "evict to the limits, expire old tag records"),
    ):
        action = actions.add_parser(name, parents=[common, config], help=text)
        action.set_defaults(run=run)
        if name == "ls":
            action.add_argument("--blobs", action="store_true", help="list blobs too")
    purge = actions.add_parser(
        "purge",
        parents=[common, config],
        help="remove digests or tag records",
    )
    purge.add_argument(
        "refs", nargs="+", metavar="REF", help="sha256:… or [namespace/]repo:tag"
    )
    purge.set_defaults(run=cache_purge)

    prefetch = commands.add_parser(
        "prefetch",
        parents=[common],
        help="warm the cache with images",
    )
    prefetch.add_argument("images", nargs="+", metavar="IMAGE", help="[ns/]repo:tag")
    where = prefetch.add_mutually_exclusive_group(required=True)
    where.add_argument("--mirror", help="URL of a running mirror")
    where.add_argument("-c", "--config", help="fill this config's cache directly")
    prefetch.add_argument(
        "--platform", help="only this platform of an index, e.g. linux/amd64"
    )
    prefetch.add_argument(
        "--user",
        help="with --mirror: log in as this [access] htpasswd user; the password "
        "is read from the REGMIRROR_PASSWORD environment variable or "
        "--password-file",
    )
    prefetch.add_argument(
        "--password-file", help="the --user's password (its first line)"
    )
    prefetch.set_defaults(run=run_prefetch)
    return parser


# -- check-config, cache ------------------------------------------------------


def check_config(arguments: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    config = validate(arguments.config)
    result = {
        "config": config.path,
        "namespaces": [n.name for n in config.namespaces],
        "upstreams": sorted(config.upstreams),
        "listen": list(config.server.listen),
    }
    if not arguments.json:
        print(
            f"{config.path}: ok ({len(config.namespaces)} namespaces, "
            f"{len(config.upstreams)} upstreams)",
            file=out,
        )
    return result


def _store(arguments: argparse.Namespace) -> tuple[Config, Store]:
    config = validate(arguments.config)
    store = Store(
        config.cache.directory,
        max_size=config.cache.max_size,
        min_free=config.cache.min_free,
    )
    store.size = sum(entry.size for entry in store.entries())
    return config, store


def cache_stats(arguments: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    config, store = _store(arguments)
    entries = list(store.entries())
    tags: dict[str, int] = {}
    for namespace, _, _, _ in store.tags():
        tags[namespace] = tags.get(namespace, 0) + 1
    manifests = sum(1 for e in entries if store.manifest(e.digest) is not None)
    result: dict[str, Any] = {
        "directory": store.root,
        "bytes": store.size,
        "max_size": config.cache.max_size,
        "files": len(entries),
        "manifests": manifests,
        "blobs": len(entries) - manifests,
        "tags": tags,
        "free_bytes": store.free_space(),
    }
    if not arguments.json:
        limit = f" of {_size(config.cache.max_size)}" if config.cache.max_size else ""
        print(f"cache      {store.root}", file=out)
        print(f"size       {_size(store.size)}{limit}", file=out)
        print(f"blobs      {result['blobs']}", file=out)
        print(f"manifests  {manifests}", file=out)
        for namespace, count in sorted(tags.items()):
            print(f"tags       {count} in {namespace}", file=out)
        print(f"free       {_size(result['free_bytes'])}", file=out)
    return result


def cache_ls(arguments: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    _, store = _store(arguments)
    tags: list[dict[str, Any]] = [
        {
            "namespace": namespace,
            "repository": repository,
            "tag": tag,
            "digest": str(record.digest),
            "confirmed": record.confirmed,
        }
        for namespace, repository, tag, record in sorted(
            store.tags(), key=lambda t: t[:3]
        )
    ]
    blobs: list[dict[str, Any]] = [
        {"digest": str(e.digest), "size": e.size, "used": e.used}
        for e in store.entries()
    ]
    if not arguments.json:
        for item in tags:
            confirmed = time.strftime("%Y-%m-%d %H:%M", time.gmtime(item["confirmed"]))
            print(
                f"{item['namespace']}/{item['repository']}:{item['tag']}  "
                f"{item['digest']}  (origin, {confirmed} UTC)",
                file=out,
            )
        if arguments.blobs:
            for blob in blobs:
                print(f"{blob['digest']}  {_size(blob['size'])}", file=out)
    return {"tags": tags, **({"blobs": blobs} if arguments.blobs else {})}


def cache_verify(arguments: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    _, store = _store(arguments)
    checked, corrupt = 0, []
    for entry, sound in store.verify():
        checked += 1
        if not sound:
            corrupt.append(str(entry.digest))
            if not arguments.json:
                print(f"corrupt, removed: {entry.digest}", file=out)
    if not arguments.json:
        print(f"{checked} files checked, {len(corrupt)} corrupt", file=out)
    return {"ok": not corrupt, "checked": checked, "corrupt": corrupt}


def cache_gc(arguments: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    config, store = _store(arguments)
    evicted = store.evict() if store.over_limit() else []
    keep = max(n.max_stale for n in config.namespaces)
    expired = store.expire_tags(time.time() - keep)
    if not arguments.json:
        freed = sum(e.size for e in evicted)
        print(
            f"evicted {len(evicted)} files ({_size(freed)}), expired {expired} "
            f"tag records; cache now {_size(store.size)}",
            file=out,
        )
    return {"evicted": [str(e.digest) for e in evicted], "expired_tags": expired}


def cache_purge(arguments: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    config, store = _store(arguments)
    removed = []
    for ref in arguments.refs:
        if (
            ":" in ref
            and "/" not in ref.split(":", 1)[0]
            and "." not in ref.split(":")[0]
        ):
            try:
                digest = parse_digest(ref)
            except RegistryError:
                digest = None
            if digest is not None:
                if store.remove(digest):
                    removed.append(ref)
                continue
        namespace, repository, tag = _split_reference(config, ref)
        if store.remove_tag(namespace, repository, tag):
            removed.append(ref)
    missing = [ref for ref in arguments.refs if ref not in removed]
    if not arguments.json:
        for ref in removed:
            print(f"removed {ref}", file=out)
        for ref in missing:
            print(f"not cached: {ref}", file=out)
    return {"removed": removed, "not_cached": missing}


def _split_reference(config: Config, ref: str) -> tuple[str, str, str]:
    """``[namespace/]repo:tag`` → (namespace, repository, tag), as routed."""
    name, colon, tag = ref.rpartition(":")
    if not colon or "/" in tag:
        raise Failed(f"{ref!r} is neither a digest nor repo:tag")
    try:
        validate_tag(tag)
        validate_name(name)
    except RegistryError as e:
        raise Failed(f"{ref!r}: {e.message}") from None
    first, slash, rest = name.partition("/")
    namespace = config.default_namespace
    for candidate in config.namespaces:
        if slash and first in (candidate.name, *candidate.aliases):
            namespace, name = candidate, rest
            break
    if namespace.library and "/" not in name:
        name = f"library/{name}"
    return namespace.name, name, tag


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{count} B"


# -- prefetch -----------------------------------------------------------------

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
                    f"again: the cache's max_size ({_size(limit or 0)}) is smaller "
                    "than what was prefetched"
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
        f"{_size(summary['bytes'])}"
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
            f"{_size(received)} / {_size(total)}",
            end="",
            file=self._out,
            flush=True,
        )

    def done(self, digest: str, received: int) -> None:
        if self._enabled:
            prefix = "\r" if self._live else ""
            print(
                f"{prefix}  {digest[:19]}  {_size(received)}" + " " * 40, file=self._out
            )

    def line(self, text: str) -> None:
        if self._enabled:
            print(text, file=self._out)


def entry_point() -> None:
    """The ``regmirror`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
