"""
``regmirror``: the operator's command line.

::

    regmirror check-config -c etc/mirror.ini
    regmirror cache stats|ls|verify|gc -c etc/mirror.ini
    regmirror cache purge -c etc/mirror.ini sha256:… docker.io/library/busybox:latest
    regmirror prefetch --mirror http://127.0.0.1:5000 ghcr.io/org/app:v1
    regmirror prefetch -c etc/mirror.ini busybox:latest   (no running mirror)
    regmirror healthcheck -c etc/mirror.ini   (/healthz where it listens)

Every command prints for people by default and JSON with ``--json``; the
exit status is 0 on success, 1 on failure, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from regmirror._cli import Failed, human_size
from regmirror.config import Config, ConfigError
from regmirror.errors import RegistryError
from regmirror.healthcheck import add_command as add_healthcheck
from regmirror.prefetch import run_prefetch
from regmirror.reference import (
    is_immutable,
    parse_digest,
    split_tagged,
)
from regmirror.service import validate
from regmirror.store import Store


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
    add_healthcheck(commands)
    return parser


# -- check-config, cache ------------------------------------------------------


def check_config(arguments: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    config = validate(arguments.config)
    result = {
        "config": config.path,
        "namespaces": [n.name for n in config.namespaces],
        "upstreams": sorted(config.upstreams),
        # Where each upstream's requests go: its path prefix and ns shown.
        "upstream_bases": {n: u.base for n, u in sorted(config.upstreams.items())},
        "listen": list(config.server.listen),
        # Each namespace's repository rules: what it will and will not serve.
        "repositories": {
            n.name: {"allow": list(n.allow), "deny": list(n.deny)}
            for n in config.namespaces
        },
    }
    if not arguments.json:
        print(
            f"{config.path}: ok ({len(config.namespaces)} namespaces, "
            f"{len(config.upstreams)} upstreams)",
            file=out,
        )
        for namespace in config.namespaces:
            rules = [
                f"{key} = {' '.join(patterns)}"
                for key, patterns in (
                    ("allow", namespace.allow),
                    ("deny", namespace.deny),
                )
                if patterns
            ]
            shown = "; ".join(rules) if rules else "every repository"
            print(f"  [namespace:{namespace.name}] {shown}", file=out)
        for name, upstream in sorted(config.upstreams.items()):
            print(f"  [upstream:{name}] {upstream.base}", file=out)
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
        limit = (
            f" of {human_size(config.cache.max_size)}" if config.cache.max_size else ""
        )
        print(f"cache      {store.root}", file=out)
        print(f"size       {human_size(store.size)}{limit}", file=out)
        print(f"blobs      {result['blobs']}", file=out)
        print(f"manifests  {manifests}", file=out)
        for namespace, count in sorted(tags.items()):
            print(f"tags       {count} in {namespace}", file=out)
        print(f"free       {human_size(result['free_bytes'])}", file=out)
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
                print(f"{blob['digest']}  {human_size(blob['size'])}", file=out)
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
    patterns = {n.name: n.immutable_tags for n in config.namespaces}
    expired = store.expire_tags(
        time.time() - keep,
        lambda namespace, tag: is_immutable(patterns.get(namespace, ()), tag),
    )
    if not arguments.json:
        freed = sum(e.size for e in evicted)
        print(
            f"evicted {len(evicted)} files ({human_size(freed)}), expired {expired} "
            f"tag records; cache now {human_size(store.size)}",
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
    try:
        tagged = split_tagged(ref)
    except RegistryError as e:
        raise Failed(f"{ref!r}: {e.message}") from None
    if tagged is None:
        raise Failed(f"{ref!r} is neither a digest nor repo:tag")
    name, tag = tagged
    first, slash, rest = name.partition("/")
    namespace = config.default_namespace
    for candidate in config.namespaces:
        if slash and first in (candidate.name, *candidate.aliases):
            namespace, name = candidate, rest
            break
    if namespace.library and "/" not in name:
        name = f"library/{name}"
    return namespace.name, name, tag


def entry_point() -> None:
    """The ``regmirror`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
