"""
``[namespace:NAME] allow`` and ``deny`` (issue 18, item 4): a namespace
serves only the repositories its rules allow, refusing the others with
``403 DENIED`` naming the rule before any upstream is asked; and in such a
namespace a digest is served through an allowed repository only when that
repository references it (a manifest served through it, or its upstream
confirming it there), never because another repository brought it into
the cache.

The harness's docker.io is given ``allow = library/*`` and ``deny =
*/*-debug``; ghcr.io has no rules.  The fake upstreams serve any blob and
manifest under any repository, so :func:`linked` makes them answer as a
registry does: a digest by repository only where it is linked.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from fakeregistry import FakeRegistry
from memory import LAYER, Harness, error_code, image, result
from test_isolation import Paused, get
from twisted.web.server import Request

from regmirror.cli import main
from regmirror.config import ConfigError, NamespaceConfig
from regmirror.ini import load
from regmirror.reference import OCI_MANIFEST
from regmirror.repositories import refusal

RULES = {"allow": ("library/*",), "deny": ("*/*-debug",)}
DENY_RULE = "[namespace:docker.io] deny = */*-debug"
#: the other layer of ``library/app-debug``, only there
DEBUG_LAYER = b"debug symbols " * 500
#: the other layer of ``library/other``, only there
OTHER_LAYER = b"another image's layer " * 300


def namespace(**rules: tuple[str, ...]) -> NamespaceConfig:
    return NamespaceConfig("docker.io", ("hub",), "hub", **rules)


# -- the rules -----------------------------------------------------------------


def test_deny_wins_over_allow_and_names_the_glob_that_matched() -> None:
    """A name both lists match is refused by ``deny``, named with the
    glob; one that ``allow`` lists and ``deny`` does not is served."""
    rules = namespace(allow=("library/*", "myorg/*"), deny=("*/*-debug", "*/x"))
    assert refusal(rules, "library/app-debug") == (
        "library/app-debug is refused by [namespace:docker.io] deny = */*-debug"
    )
    assert refusal(rules, "library/app") is None
    assert refusal(rules, "myorg/app") is None


def test_with_allow_a_name_it_does_not_match_is_refused_naming_the_list() -> None:
    rules = namespace(allow=("library/*", "myorg/*"))
    assert refusal(rules, "evil/app") == (
        "evil/app is refused by [namespace:docker.io] allow = library/* myorg/* "
        "(it matches none of them)"
    )


def test_a_star_matches_slashes_and_matching_is_case_sensitive() -> None:
    """fnmatchcase: ``library/*`` takes ``library/a/b`` too; ``*/*-debug``
    refuses ``a/b/c-debug``; ``?`` is one character; case counts."""
    rules = namespace(allow=("library/*", "ab?"), deny=("*/*-debug",))
    assert refusal(rules, "library/a/b") is None
    assert refusal(rules, "a/b/c-debug") is not None
    assert refusal(rules, "abc") is None
    assert refusal(rules, "abcd") is not None
    assert refusal(namespace(deny=("library/app",)), "library/APP") is None


def test_without_lists_every_repository_is_served() -> None:
    assert refusal(namespace(), "anything/at/all-debug") is None


# -- the mirror ----------------------------------------------------------------


def linked(fake: FakeRegistry, where: dict[str, set[str]]) -> None:
    """
    Make *fake* answer a digest by repository as a registry does: 404 for
    a blob or manifest by digest under a repository of *where* that does
    not hold it (a registry links content into the repositories pushed
    with it).
    """

    def fault(request: Request) -> tuple[int, bytes] | None:
        path = request.path.decode()
        for repository, digests in where.items():
            for kind in ("blobs", "manifests"):
                prefix = f"/v2/{repository}/{kind}/sha256:"
                if path.startswith(prefix) and path[len(prefix) - 7 :] not in digests:
                    return 404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}'
        return None

    fake.fault = fault


def debug_image(fake: FakeRegistry) -> dict[str, str]:
    """``library/app-debug:latest``: ``library/app``'s layer and its own."""
    base = image(fake, "library/app")
    debug = fake.add_blob(DEBUG_LAYER)
    document = json.loads(fake.manifests[base["manifest"]][1])
    document["layers"].append(
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": debug,
            "size": len(DEBUG_LAYER),
        }
    )
    manifest, _ = fake.add_manifest(
        "library/app-debug", "latest", document, OCI_MANIFEST
    )
    return {**base, "debug_layer": debug, "debug_manifest": manifest}


def other_image(fake: FakeRegistry) -> dict[str, str]:
    """``library/other:latest``: ``library/app``'s layer and its own."""
    base = image(fake, "library/app")
    own = fake.add_blob(OTHER_LAYER)
    document = json.loads(fake.manifests[base["manifest"]][1])
    document["layers"].append(
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": own,
            "size": len(OTHER_LAYER),
        }
    )
    manifest, _ = fake.add_manifest("library/other", "latest", document, OCI_MANIFEST)
    return {**base, "other_layer": own, "other_manifest": manifest}


@pytest.fixture
def hub() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def ruled(tmp_path: Path, hub: FakeRegistry) -> Harness:
    """A mirror whose docker.io (upstream ``hub``) has ``RULES``."""
    return Harness(str(tmp_path / "cache"), {"hub": hub}, docker=dict(RULES))


def denied(harness: Harness, response: Any) -> str:
    """The message of a ``403 DENIED`` answer (asserted)."""
    assert response.code == 403
    document = json.loads(harness.body(response))
    assert document["errors"][0]["code"] == "DENIED"
    return str(document["errors"][0]["message"])


def test_an_allowed_repository_is_pulled_as_before(
    ruled: Harness, hub: FakeRegistry
) -> None:
    """``library/app``: manifest by tag, its layer; 200 and the bytes."""
    app = image(hub)
    manifest = ruled.request("GET", "/v2/library/app/manifests/latest")
    assert manifest.code == 200
    assert ruled.body(manifest) == app["body"].encode()
    blob = ruled.request("GET", f"/v2/library/app/blobs/{app['layer']}")
    assert blob.code == 200 and ruled.body(blob) == LAYER


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_denied_repository_is_refused_everywhere_without_asking_upstream(
    ruled: Harness, hub: FakeRegistry, method: str
) -> None:
    """
    ``library/app-debug``, which ``deny`` names: its manifest by tag and by
    digest, its blobs, its tag list and its referrers are 403 DENIED naming
    the rule, for GET and HEAD, even once its content is cached through an
    allowed repository; the upstream is asked nothing for it.
    """
    debug = debug_image(hub)
    assert ruled.request("GET", "/v2/library/app/manifests/latest").code == 200
    asked = list(hub.requests)
    for endpoint in (
        "manifests/latest",
        f"manifests/{debug['debug_manifest']}",
        f"manifests/{debug['manifest']}",
        f"blobs/{debug['layer']}",
        f"blobs/{debug['debug_layer']}",
        "tags/list",
        f"referrers/{debug['manifest']}",
    ):
        response = ruled.request(method, f"/v2/library/app-debug/{endpoint}")
        if method == "HEAD":
            assert response.code == 403, endpoint
        else:
            assert (
                denied(ruled, response)
                == f"library/app-debug is refused by {DENY_RULE}"
            )
    assert hub.requests == asked


def test_a_repository_allow_does_not_name_is_refused_naming_allow(
    ruled: Harness, hub: FakeRegistry
) -> None:
    """``org/app`` matches no ``allow`` glob: 403, upstream not asked."""
    image(hub, "org/app")
    message = denied(ruled, ruled.request("GET", "/v2/org/app/manifests/latest"))
    assert message == (
        "org/app is refused by [namespace:docker.io] allow = library/* "
        "(it matches none of them)"
    )
    assert hub.requests == []


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        # Docker Hub's one-word name: the rules see library/app-debug.
        ("/v2/app-debug/manifests/latest", {}),
        ("/v2/docker.io/library/app-debug/manifests/latest", {}),
        ("/v2/docker.io/app-debug/manifests/latest", {}),
        ("/v2/index.docker.io/app-debug/manifests/latest", {}),
        ("/v2/library/app-debug/manifests/latest?ns=docker.io", {}),
        ("/v2/app-debug/manifests/latest?ns=index.docker.io", {}),
        ("/v2/docker.io/app-debug/manifests/latest?ns=docker.io", {}),
        ("/v2/library/app-debug/manifests/latest", {"Host": "hub.mirror.test"}),
        ("/v2/app-debug/blobs/{layer}", {"Host": "HUB.mirror.test."}),
    ],
)
def test_every_way_of_naming_a_denied_repository_is_refused(
    ruled: Harness, hub: FakeRegistry, path: str, headers: dict[str, str]
) -> None:
    """Bare names (``library/`` added), path prefixes and aliases, ``ns``
    and ``Host``: the same repository, the same 403 naming the rule."""
    debug = debug_image(hub)
    response = ruled.request(
        "GET",
        path.format(layer=debug["debug_layer"]),
        headers={k: [v] for k, v in headers.items()},
    )
    assert denied(ruled, response) == f"library/app-debug is refused by {DENY_RULE}"
    assert hub.requests == []


@pytest.mark.parametrize(
    "path",
    [
        "/v2/Library/App-Debug/manifests/latest",
        "/v2/library/APP-DEBUG/manifests/latest",
        "/v2/library/app/../app-debug/manifests/latest",
        "/v2/library/app-debug/./manifests/latest",
        "/v2/library%2fapp-debug/manifests/latest",
        "/v2/library/app%2d%64ebug/manifests/latest",
        "/v2/library//app-debug/manifests/latest",
        "/v2/docker.io/../library/app-debug/manifests/latest",
        "/v2/library/app-debug%00/manifests/latest",
    ],
)
def test_spellings_that_dodge_the_rules_are_refused_as_invalid_names(
    ruled: Harness, hub: FakeRegistry, path: str
) -> None:
    """Upper case, ``..`` and ``.`` components, percent-encoding (``%2f``
    a slash, letters), empty components: no valid name, 400 NAME_INVALID,
    nothing asked upstream (never a name the rules did not see); what
    they spell is refused as itself."""
    debug_image(hub)
    response = ruled.request("GET", path)
    assert response.code == 400
    assert error_code(ruled, response) == "NAME_INVALID"
    plain = ruled.request("GET", "/v2/library/app-debug/manifests/latest")
    assert denied(ruled, plain) == f"library/app-debug is refused by {DENY_RULE}"
    assert hub.requests == []


def test_the_rules_are_the_namespace_s_own(ruled: Harness, hub: FakeRegistry) -> None:
    """docker.io refuses ``org/app-debug``; ghcr.io, without rules, serves
    it (its upstream is the same fake here)."""
    app = image(hub, "org/app-debug")
    refused = ruled.request("GET", "/v2/org/app-debug/manifests/latest")
    assert denied(ruled, refused).startswith("org/app-debug is refused by")
    assert hub.requests == []
    response = ruled.request("GET", "/v2/ghcr.io/org/app-debug/manifests/latest")
    assert response.code == 200
    assert ruled.body(response) == app["body"].encode()


# -- the digest walk-around ------------------------------------------------------------


def test_a_layer_cached_from_a_denied_repository_before_the_rule_is_not_served(
    tmp_path: Path, hub: FakeRegistry
) -> None:
    """
    ``library/app-debug`` was pulled before ``deny`` was added; through
    ``library/app`` its own layer (cached) is 404 BLOB_UNKNOWN and its
    manifest 404 MANIFEST_UNKNOWN: the namespace's old record (it vouched
    for the digest) does not count for a repository, whose upstream is
    asked (``HEAD``) and has no such content; ``library/app-debug`` is
    asked nothing.  The layer both share is served, once
    ``library/app``'s upstream confirms it.
    """
    debug = debug_image(hub)
    before = Harness(str(tmp_path / "cache"), {"hub": hub})
    assert before.request("GET", "/v2/library/app-debug/manifests/latest").code == 200
    for layer in ("layer", "debug_layer"):
        got = before.request("GET", f"/v2/library/app-debug/blobs/{debug[layer]}")
        assert got.code == 200
    linked(hub, {"library/app": {debug["layer"], debug["config"], debug["manifest"]}})
    hub.requests.clear()
    after = Harness(str(tmp_path / "cache"), {"hub": hub}, docker=dict(RULES))
    blob = after.request("GET", f"/v2/library/app/blobs/{debug['debug_layer']}")
    assert blob.code == 404 and error_code(after, blob) == "BLOB_UNKNOWN"
    head = after.request("HEAD", f"/v2/library/app/blobs/{debug['debug_layer']}")
    assert head.code == 404
    manifest = after.request(
        "GET", f"/v2/library/app/manifests/{debug['debug_manifest']}"
    )
    assert manifest.code == 404 and error_code(after, manifest) == "MANIFEST_UNKNOWN"
    shared = after.request("GET", f"/v2/library/app/blobs/{debug['layer']}")
    assert shared.code == 200 and after.body(shared) == LAYER
    assert [p for _, p in hub.requests if "app-debug" in p] == []
    assert hub.count("HEAD", f"/v2/library/app/blobs/{debug['debug_layer']}") >= 1
    assert hub.count("GET", "/blobs/") == 0, "served from the cache, not fetched"


def test_a_digest_an_allowed_repository_cached_is_not_served_through_another(
    ruled: Harness, hub: FakeRegistry
) -> None:
    """
    ``library/other`` (allowed) was pulled; ``library/app`` asks for its own
    layer and its manifest by digest: 404, its upstream having none of
    them there, and nothing new in the cache.
    """
    other = other_image(hub)
    linked(hub, {"library/app": {other["layer"], other["config"], other["manifest"]}})
    assert ruled.request("GET", "/v2/library/other/manifests/latest").code == 200
    got = ruled.request("GET", f"/v2/library/other/blobs/{other['other_layer']}")
    assert got.code == 200
    cached = ruled.cached_files()
    blob = ruled.request("GET", f"/v2/library/app/blobs/{other['other_layer']}")
    assert blob.code == 404 and error_code(ruled, blob) == "BLOB_UNKNOWN"
    manifest = ruled.request(
        "GET", f"/v2/library/app/manifests/{other['other_manifest']}"
    )
    assert manifest.code == 404
    assert ruled.cached_files() == cached


def test_a_repository_does_not_join_another_s_download_starting_meanwhile(
    tmp_path: Path,
) -> None:
    """
    ``library/other``'s request for its own layer is starting (the upstream
    holds its answer) when ``library/app`` asks for the same digest: it
    does not join that start as a request of the same namespace would, but
    asks its own repository upstream (``HEAD``), which has no such layer:
    404; ``library/other`` gets its layer.
    """
    hub = Paused()
    other = other_image(hub)
    linked(hub, {"library/app": {other["layer"], other["config"], other["manifest"]}})
    harness = Harness(str(tmp_path / "cache"), {"hub": hub}, docker=dict(RULES))
    first = get(harness, f"/v2/library/other/blobs/{other['other_layer']}")
    harness.settle()
    second = get(harness, f"/v2/library/app/blobs/{other['other_layer']}")
    harness.settle()
    assert hub.paused, "the first start is not waiting"
    hub.go()
    harness.settle()
    assert harness.body(result(first)) == OTHER_LAYER
    refused = result(second)
    assert refused.code == 404
    assert error_code(harness, refused) == "BLOB_UNKNOWN"


def test_what_a_served_manifest_references_costs_no_upstream_check(
    ruled: Harness, hub: FakeRegistry
) -> None:
    """
    The manifest served through ``library/app`` records its references
    for that repository: its layer and config come without a ``HEAD``;
    the same layer, cached, through ``library/other`` (which references it
    too) costs one ``HEAD`` of ``library/other``, and then none.
    """
    other = other_image(hub)
    app = ruled.request("GET", "/v2/library/app/manifests/latest")
    assert app.code == 200
    for digest in (other["layer"], other["config"]):
        assert ruled.request("GET", f"/v2/library/app/blobs/{digest}").code == 200
    assert hub.count("HEAD", "/blobs/") == 0
    for _ in range(2):
        shared = ruled.request("GET", f"/v2/library/other/blobs/{other['layer']}")
        assert shared.code == 200 and ruled.body(shared) == LAYER
    assert hub.count("HEAD", f"/v2/library/other/blobs/{other['layer']}") == 1
    assert hub.count("GET", f"/blobs/{other['layer']}") == 1


def test_a_namespace_without_rules_vouches_as_a_whole(
    tmp_path: Path, hub: FakeRegistry
) -> None:
    """
    The contrast: docker.io without ``allow`` nor ``deny`` serves a blob
    cached through ``library/other`` through ``library/app`` with no
    ``HEAD``; the same with a ``deny`` that names neither asks
    ``library/app``'s upstream first.
    """
    other = other_image(hub)
    for rules, heads in (({}, 0), ({"deny": ("nothing/*",)}, 1)):
        hub.requests.clear()
        root = str(tmp_path / f"cache-{heads}")
        harness = Harness(root, {"hub": hub}, docker=dict(rules))
        path = f"/blobs/{other['other_layer']}"
        assert harness.request("GET", f"/v2/library/other{path}").code == 200
        assert harness.request("GET", f"/v2/library/app{path}").code == 200
        assert hub.count("HEAD", f"/v2/library/app{path}") == heads


# -- check-config ----------------------------------------------------------------------


def test_check_config_shows_each_namespace_s_lists(tmp_path: Path) -> None:
    config = tmp_path / "mirror.ini"
    config.write_text(
        "[server]\nlisten = tcp:0:interface=127.0.0.1\n\n"
        "[cache]\ndirectory = cache\n\n"
        "[upstream:hub]\nurl = https://registry-1.docker.io\n\n"
        "[upstream:ghcr]\nurl = https://ghcr.io\n\n"
        "[namespace:docker.io]\nupstreams = hub\ndefault = true\n"
        "allow = library/* myorg/*\ndeny = */*-debug\n\n"
        "[namespace:ghcr.io]\nupstreams = ghcr\n"
    )
    out = io.StringIO()
    assert main(["check-config", "-c", str(config)], out) == 0
    lines = out.getvalue().splitlines()
    assert (
        "  [namespace:docker.io] allow = library/* myorg/*; deny = */*-debug" in lines
    )
    assert "  [namespace:ghcr.io] every repository" in lines
    out = io.StringIO()
    assert main(["check-config", "-c", str(config), "--json"], out) == 0
    assert json.loads(out.getvalue())["repositories"] == {
        "docker.io": {"allow": ["library/*", "myorg/*"], "deny": ["*/*-debug"]},
        "ghcr.io": {"allow": [], "deny": []},
    }


def test_keep_warm_may_not_name_a_refused_repository(tmp_path: Path) -> None:
    """An image kept warm is fetched upstream unasked: a ``keep_warm``
    entry the namespace's rules refuse (a one-word name read with
    ``library/``) is a configuration error naming the key and the rule."""
    config = tmp_path / "mirror.ini"
    base = (
        "[server]\nlisten = tcp:0:interface=127.0.0.1\n\n"
        "[cache]\ndirectory = cache\n\n"
        "[upstream:hub]\nurl = https://registry-1.docker.io\n\n"
        "[namespace:docker.io]\nupstreams = hub\ndefault = true\n"
        "allow = library/*\ndeny = */*-debug\n"
    )
    for warm, rule in (
        ("app-debug:latest", "deny = */*-debug"),
        ("myorg/app:v1", "allow = library/*"),
    ):
        config.write_text(base + f"keep_warm = library/nginx:latest {warm}\n")
        with pytest.raises(ConfigError) as raised:
            load(str(config))
        message = str(raised.value)
        assert "[namespace:docker.io] keep_warm" in message, message
        assert warm in message and rule in message, message
    config.write_text(base + "keep_warm = nginx:latest library/app:v1\n")
    assert load(str(config)).namespaces[0].keep_warm
