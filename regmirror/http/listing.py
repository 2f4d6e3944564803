"""
Lists passed through from upstream: ``/v2/<name>/tags/list`` (paged here
when the upstream ignores ``n`` and ``last``) and
``/v2/<name>/referrers/<digest>`` (from the upstream's referrers API, or
else the referrers tag schema).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from twisted.web.iweb import IResponse
from twisted.web.server import Request

from regmirror.errors import (
    ManifestUnknown,
    NameUnknown,
    PaginationInvalid,
    UpstreamBadGateway,
)
from regmirror.fetch import Fetcher
from regmirror.http.request import query, write_body
from regmirror.pool import NotFoundAnywhere, UpstreamPool
from regmirror.reference import (
    INDEX_TYPES,
    OCI_INDEX,
    Digest,
    load_json,
    referrers_tag,
    validate_tag,
)
from regmirror.responses import header
from regmirror.routing import Route
from regmirror.upstream import Upstream, UpstreamFailure

__all__ = ["referrers", "tag_source", "tags"]


def tag_source(route: Route, upstream: str) -> str:
    """The ``Regmirror-Tag-Source`` of a tag answered by *upstream*."""
    return "origin" if upstream == route.pool.origin.name else upstream


# -- tags/list ----------------------------------------------------------------


async def tags(request: Request, route: Route) -> None:
    """Answer ``tags/list`` for *route*'s repository."""
    wanted: dict[str, str] = {}
    n = query(request, "n")
    if n is not None:
        # isascii: isdigit takes other scripts' digits (²), int() not all.
        if not (n.isascii() and n.isdigit()):
            raise PaginationInvalid(f"n must be a number, not {n[:20]!r}")
        wanted["n"] = n
    last = query(request, "last")
    if last is not None:
        wanted["last"] = validate_tag(last)
    pool = route.pool
    order = [pool.origin, *pool.mirrors]
    try:
        upstream, response = await pool.first_answer(
            order, "GET", f"{route.repository}/tags/list", query=wanted
        )
    except NotFoundAnywhere:
        raise NameUnknown(f"repository {route.client_name} is unknown") from None
    try:
        document = _tag_list(await _read(upstream, response), upstream)
    except UpstreamBadGateway as e:
        pool.invalid(upstream, str(e))
        raise
    pool.answered(upstream)
    # The repository as the namespace's registry names it, not as an
    # upstream with a path prefix does (a mirror of mirrors: ghcr.io/org/app).
    document["name"] = route.repository
    link = header(response, "Link")
    if link:
        target = re.match(r"\s*<([^>]*)>", link)
        if target is not None:
            params = parse_qs(urlsplit(target.group(1)).query)
            following = {k: v[0] for k, v in params.items() if k in ("n", "last")}
            request.setHeader("Link", _next_link(request, route, following))
    elif n is not None or last is not None:
        # Some registries (distribution 2.8 among them) ignore n and
        # last: paginate their full list here, as the spec describes
        # (n is optional with last).
        limit = None if n is None else int(n)
        document, following_last = _paginate(document, limit, last)
        if n is not None and following_last is not None:
            following = {"n": n, "last": following_last}
            request.setHeader("Link", _next_link(request, route, following))
    _write_json(request, "application/json", document)


def _tag_list(body: bytes, upstream: Upstream) -> dict[str, Any]:
    """
    *body* as a tag list: a JSON object whose ``tags``, if any, are strings.

    :raises UpstreamBadGateway: for anything else (a page, a JSON array):
        only JSON the mirror wrote itself is passed on.
    """
    document = load_json(body)
    tags = document.get("tags") if isinstance(document, dict) else None
    if not isinstance(document, dict) or not (
        tags is None
        or (isinstance(tags, list) and all(isinstance(t, str) for t in tags))
    ):
        raise UpstreamBadGateway(
            f"upstream {upstream.name}'s answer is not a JSON tag list"
        )
    # ``null`` (a Go registry's empty list) or none at all: no tags, as
    # the spec's array.
    return {**document, "tags": tags or []}


def _write_json(request: Request, content_type: str, document: Any) -> None:
    """
    Answer with *document* as JSON the mirror wrote (ASCII, whatever the
    upstream's encoding), under *content_type*, never the upstream's type,
    and not to be sniffed as anything else.
    """
    request.setHeader("X-Content-Type-Options", "nosniff")
    # Never NaN or Infinity, which are no JSON (load_json refuses them).
    body = json.dumps(document, separators=(",", ":"), allow_nan=False).encode("ascii")
    write_body(request, content_type, body)


def _next_link(request: Request, route: Route, following: dict[str, str]) -> str:
    """
    A ``Link`` to the next page of tags on this mirror, with the name the
    client used (upstream names lack our namespace prefix).
    """
    ns = query(request, "ns")
    if ns is not None:
        following = {**following, "ns": ns}
    return f'</v2/{route.client_name}/tags/list?{urlencode(following)}>; rel="next"'


def _paginate(
    document: dict[str, Any], n: int | None, last: str | None
) -> tuple[dict[str, Any], str | None]:
    """
    Cut a full tag list (see :func:`_tag_list`) to the page after *last*
    (all of it without) of at most *n* tags (no limit without).

    :return: the page, and the ``last`` of the next page if any.
    """
    names = sorted(document.get("tags") or [])
    if last is not None:
        names = [t for t in names if t > last]
    if n is None:
        return {**document, "tags": names}, None
    more = len(names) > n
    following = names[n - 1] if more and n > 0 else None
    return {**document, "tags": names[:n]}, following


# -- referrers ----------------------------------------------------------------


async def referrers(
    request: Request, route: Route, digest: Digest, fetcher: Fetcher
) -> None:
    """
    The referrers of *digest*, as a registry with the referrers API
    answers: from the upstream's API when it has one, else from the
    referrers tag schema; an empty index when there are none, never 404.
    Filtered by ``artifactType`` here when the upstream did not.
    """
    artifact_type = query(request, "artifactType")
    wanted = {} if artifact_type is None else {"artifactType": artifact_type}
    answer = await _referrers_api(
        route.pool, f"{route.repository}/referrers/{digest}", wanted
    )
    if answer is None:
        # No referrers API (404 is what a registry without it answers):
        # the referrers tag schema.
        entries = await _tagged_referrers(request, route, digest, fetcher)
    else:
        upstream, response = answer
        try:
            body = await _read(upstream, response)
            document = _index(body, f"upstream {upstream.name}'s referrers")
        except UpstreamBadGateway as e:
            route.pool.invalid(upstream, str(e))
            raise
        route.pool.answered(upstream)
        entries = _entries(document)
        applied = header(response, "OCI-Filters-Applied") or ""
        filters = {f.strip().lower() for f in applied.split(",")}
        if artifact_type is None or "artifacttype" in filters:
            if applied:
                request.setHeader("OCI-Filters-Applied", applied)
            _write_json(request, OCI_INDEX, document)
            return
    if artifact_type is not None:
        entries = [e for e in entries if e.get("artifactType") == artifact_type]
        request.setHeader("OCI-Filters-Applied", "artifactType")
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    _write_json(request, OCI_INDEX, document)


async def _tagged_referrers(
    request: Request, route: Route, digest: Digest, fetcher: Fetcher
) -> list[dict[str, Any]]:
    """
    The entries of the index under *digest*'s referrers tag; none when
    the tag does not exist.  The tag is resolved like any other (the
    origin decides, ``tag_ttl``, the policy for an unreachable origin);
    the index it names is content like any other.
    """
    tag = referrers_tag(digest)
    try:
        answer = await fetcher.resolve_tag(route.pool, route.repository, tag)
    except ManifestUnknown:
        return []
    request.setHeader("Regmirror-Tag-Source", tag_source(route, answer.upstream))
    what = f"the referrers tag {tag}"
    try:
        # Named by the namespace's own tag: a digest it vouches for.
        index = await fetcher.manifest(
            route.pool, route.repository, answer.digest, named=True
        )
    except ManifestUnknown:
        raise UpstreamBadGateway(
            f"{what} names {answer.digest}, which no upstream has"
        ) from None
    if index.media_type not in INDEX_TYPES:
        raise UpstreamBadGateway(f"{what} names a {index.media_type}, not an index")
    return _entries(_index(index.body, what))


async def _referrers_api(
    pool: UpstreamPool, path: str, wanted: dict[str, str]
) -> tuple[Upstream, IResponse] | None:
    """
    An answer of the referrers API at *path*, or ``None`` when there is
    none to have.  The list changes as artifacts are pushed, so like a tag
    it is the origin's; the mirrors' APIs are asked, in order, only when the
    origin gives no answer at all (a 404 is an answer: it has no such API).

    :raises RegistryError: when no upstream answered.
    """
    try:
        return pool.origin, await pool.ask(pool.origin, "GET", path, query=wanted)
    except UpstreamFailure as failure:
        if failure.status == 404:
            return None
    try:
        return await pool.first_answer(pool.mirrors, "GET", path, query=wanted)
    except NotFoundAnywhere:
        # The referrers tag, then, under the policy for an unreachable origin.
        return None


def _index(body: bytes, what: str) -> dict[str, Any]:
    """
    *body* as an index document: a JSON object listing ``manifests``.

    :raises UpstreamBadGateway: when *body* (named *what*) is no index.
    """
    document = load_json(body)
    entries = document.get("manifests") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise UpstreamBadGateway(f"{what} is not an image index")
    assert isinstance(document, dict)
    return document


def _entries(index: dict[str, Any]) -> list[dict[str, Any]]:
    """The descriptors an index (see :func:`_index`) lists."""
    return [entry for entry in index["manifests"] if isinstance(entry, dict)]


async def _read(upstream: Upstream, response: IResponse) -> bytes:
    try:
        return await upstream.read(response)
    except ValueError as e:
        raise UpstreamBadGateway(f"upstream {upstream.name}: {e}") from None
