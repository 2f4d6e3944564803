"""
Upstreams that are one registry of a mirror of several (issue 21): a path
prefix in ``[upstream:NAME] url`` (``https://m.daocloud.io/ghcr.io``, a
regmirror's ``/v2/ghcr.io/...``) and ``ns`` (containerd's ``?ns=``).  The
configuration's reading and refusals, then in memory (``treq.testing``,
a ``Clock``): every request to such an upstream carries both, the token
scope is the challenge's, a redirect is followed as usual, and the
failover order and the stale-mirror defence treat it like any other.
The end-to-end counterpart (two regmirrors in a chain) is
``tests/e2e/test_chained.py``.
"""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from fakeregistry import FakeRegistry
from memory import LAYER, Harness, image, result
from twisted.internet.defer import Deferred
from twisted.web.server import Request

from regmirror import cli
from regmirror.config import ConfigError, UpstreamConfig
from regmirror.ini import parse

OLD = "2020-01-01T00:00:00Z"
NEW = "2024-06-01T12:30:00.123456789Z"


# -- the configuration ---------------------------------------------------------


def config_text(url: str, extra: str = "", namespaces: str = "") -> str:
    return (
        "[cache]\ndirectory = cache\n\n"
        f"[upstream:hq]\nurl = {url}\n{extra}\n"
        "[upstream:origin]\nurl = https://ghcr.io\n\n"
        "[namespace:ghcr.io]\nupstreams = hq origin\n\n"
        "[namespace:docker.io]\nupstreams = origin\ndefault = true\n" + namespaces
    )


def hq(url: str, extra: str = "") -> UpstreamConfig:
    return parse(config_text(url, extra), "/etc/regmirror/mirror.ini").upstreams["hq"]


@pytest.mark.parametrize(
    ("url", "root", "prefix"),
    [
        ("https://m.daocloud.io/ghcr.io", "https://m.daocloud.io", "ghcr.io"),
        ("https://m.daocloud.io/ghcr.io/", "https://m.daocloud.io", "ghcr.io"),
        ("https://m.daocloud.io/ghcr.io//", "https://m.daocloud.io", "ghcr.io"),
        ("https://M.DaoCloud.io/GHCR.io", "https://m.daocloud.io", "ghcr.io"),
        (
            "https://harbor.example/proxy/ghcr.io",
            "https://harbor.example",
            "proxy/ghcr.io",
        ),
        ("https://m.daocloud.io/ghcr%2Eio", "https://m.daocloud.io", "ghcr.io"),
        (
            "http://127.0.0.1:5001/registry.local:5000",
            "http://127.0.0.1:5001",
            "registry.local:5000",
        ),
        ("https://registry-1.docker.io", "https://registry-1.docker.io", ""),
        ("https://registry-1.docker.io/", "https://registry-1.docker.io", ""),
    ],
)
def test_url_path_is_a_repository_prefix(url: str, root: str, prefix: str) -> None:
    """The path of ``url`` becomes the upstream's prefix: slashes at its end
    dropped, percent-escapes decoded, lower-cased (a host name, or a
    repository component, which is lower-case); the URL keeps the root."""
    upstream = hq(url)
    assert (upstream.url, upstream.prefix, upstream.ns) == (root, prefix, None)
    assert upstream.host == root.split("://")[1].split(":")[0]


def test_ns_is_a_host_name() -> None:
    upstream = hq("https://regional.example", "ns = Quay.IO")
    assert (upstream.url, upstream.prefix, upstream.ns) == (
        "https://regional.example",
        "",
        "quay.io",
    )
    assert upstream.base == "https://regional.example/v2/?ns=quay.io"
    assert (
        hq("https://m.daocloud.io/ghcr.io").base == "https://m.daocloud.io/v2/ghcr.io/"
    )


@pytest.mark.parametrize(
    ("url", "extra", "key", "says"),
    [
        (
            "https://hq.example/v2/ghcr.io",
            "",
            "url",
            "write https://hq.example/ghcr.io",
        ),
        ("https://hq.example/v2", "", "url", "write https://hq.example,"),
        ("https://hq.example/?ns=quay.io", "", "url", "use the ns key"),
        ("https://hq.example/ghcr.io?x=1", "", "url", "no query or fragment"),
        ("https://hq.example/ghcr.io#top", "", "url", "no query or fragment"),
        ("https://hq.example//ghcr.io", "", "url", "path segment ''"),
        ("https://hq.example/ghcr.io/../x", "", "url", "path segment '..'"),
        ("https://hq.example/ghcr.io%2Forg", "", "url", "path segment 'ghcr.io/org'"),
        ("https://hq.example/ghcr.io%00", "", "url", "path segment"),
        ("https://hq.example/gh%cr.io", "", "url", "path segment"),
        ("https://hq.example/ghcr\u00e9.io", "", "url", "path segment"),
        ("https://hq.example/" + "a" * 201, "", "url", "longer than 200"),
        ("https://alice:pw@hq.example/ghcr.io", "", "url", "credentials"),
        ("ftp://hq.example/ghcr.io", "", "url", "must start with"),
        ("https://hq.example", "ns = quay.io/x", "ns", "not a host name"),
        ("https://hq.example", "ns = quay io", "ns", "not a host name"),
        # found by the fresh-eyes review: ports out of range, a path and an
        # ns naming two registries (a mirror routing by ns first serves ns's)
        ("https://hq.example/registry.local:99999", "", "url", "path segment"),
        ("https://hq.example/registry.local:0", "", "url", "path segment"),
        ("https://hq.example", "ns = quay.io:99999", "ns", "not a host name"),
        ("https://hq.example/ghcr.io", "ns = quay.io", "ns", "another registry"),
    ],
)
def test_bad_url_or_ns_is_one_line_naming_file_section_and_key(
    url: str, extra: str, key: str, says: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        hq(url, extra)
    message = str(raised.value)
    assert message.startswith(f"/etc/regmirror/mirror.ini: [upstream:hq] {key}: ")
    assert says in message and "\n" not in message


@pytest.mark.parametrize("extra", ["", "ns = quay.io"])
def test_a_prefixed_or_ns_upstream_serves_one_namespace(extra: str) -> None:
    """``[upstream:hq]`` with a prefix (or ``ns``) in a second namespace
    would answer that namespace's tags from the first registry: refused,
    naming the second namespace's ``upstreams``."""
    url = "https://hq.example" + ("" if extra else "/ghcr.io")
    second = "[namespace:quay.io]\nupstreams = hq\n"
    with pytest.raises(ConfigError) as raised:
        parse(config_text(url, extra, second), "/m.ini")
    message = str(raised.value)
    assert message.startswith("/m.ini: [namespace:quay.io] upstreams: [upstream:hq]")
    assert "serves [namespace:ghcr.io]" in message
    # Control: without prefix or ns, one upstream may serve both.
    parse(config_text("https://hq.example", "", second), "/m.ini")


def test_two_sections_with_one_prefixed_url_are_one_registry() -> None:
    """Two ``[upstream:NAME]`` sections whose requests go to the same place
    (``.../ghcr.io`` and ``.../GHCR.IO/``) are one registry: in a second
    namespace they are refused as one section would be (the fresh-eyes
    review found the section's name was all the rule looked at)."""
    second = (
        "[upstream:hq2]\nurl = https://hq.example/GHCR.IO/\n\n"
        "[namespace:quay.io]\nupstreams = hq2\n"
    )
    with pytest.raises(ConfigError) as raised:
        parse(config_text("https://hq.example/ghcr.io", "", second), "/m.ini")
    assert "[namespace:quay.io] upstreams: [upstream:hq2]" in str(raised.value)
    assert "serves [namespace:ghcr.io]" in str(raised.value)


def test_check_config_shows_each_upstreams_base(tmp_path: Path) -> None:
    path = tmp_path / "mirror.ini"
    path.write_text(
        config_text(
            "https://m.daocloud.io/ghcr.io",
            namespaces="[upstream:regional]\nurl = https://r.example\nns = quay.io\n"
            "[namespace:quay.io]\nupstreams = regional\n",
        )
    )
    out = io.StringIO()
    assert cli.main(["check-config", "-c", str(path)], out) == 0
    lines = out.getvalue().splitlines()
    assert "  [upstream:hq] https://m.daocloud.io/v2/ghcr.io/" in lines
    assert "  [upstream:origin] https://ghcr.io/v2/" in lines
    assert "  [upstream:regional] https://r.example/v2/?ns=quay.io" in lines
    out = io.StringIO()
    assert cli.main(["check-config", "-c", str(path), "--json"], out) == 0
    assert json.loads(out.getvalue())["upstream_bases"] == {
        "hq": "https://m.daocloud.io/v2/ghcr.io/",
        "origin": "https://ghcr.io/v2/",
        "regional": "https://r.example/v2/?ns=quay.io",
    }


def test_the_readmes_office_mirror_example_loads() -> None:
    """README's worked example (an office mirror in front of a regional
    one) is a configuration start-up takes, each upstream asked where the
    README says."""
    readme = (Path(__file__).parent.parent / "README.rst").read_text()
    section = readme[readme.index("\nMirrors of mirrors\n") :]
    block = section[section.index("::\n\n") + 4 :]
    example = textwrap.dedent(block[: block.index("\n\n``")])
    config = parse("[cache]\ndirectory = cache\n" + example, "/m.ini")
    bases = {name: u.base for name, u in config.upstreams.items()}
    assert bases["regional"] == "https://regional.example.internal/v2/?ns=docker.io"
    assert bases["regional-ghcr"] == "https://regional.example.internal/v2/ghcr.io/"
    assert bases["regional-quay"] == "https://regional.example.internal/v2/?ns=quay.io"
    ghcr = next(n for n in config.namespaces if n.name == "ghcr.io")
    assert (ghcr.upstreams, ghcr.origin) == (("regional-ghcr", "ghcr"), "ghcr")


# -- requests ------------------------------------------------------------------


class RecordingRegistry(FakeRegistry):
    """A fake registry that also keeps each request's whole URI (query
    included) and serves ``/token`` however its realm is spelled."""

    def __init__(self) -> None:
        super().__init__()
        self.uris: list[str] = []

    def render(self, request: Request) -> Any:
        self.uris.append(f"{request.method.decode()} {request.uri.decode()}")
        return super().render(request)


def prefixed(tmp_path: Path, **settings: Any) -> tuple[Harness, RecordingRegistry]:
    """A mirror whose only upstream ``hq`` has the prefix ``ghcr.io`` and
    ``ns = ghcr.io`` (both, to see each in every request)."""
    fake = RecordingRegistry()
    harness = Harness(
        str(tmp_path / "cache"),
        {"hq": fake},
        {"hq": {"prefix": "ghcr.io", "ns": "ghcr.io", **settings}},
    )
    return harness, fake


def test_every_request_carries_the_prefix_and_ns(tmp_path: Path) -> None:
    """
    Through an upstream with a prefix and ``ns``: a manifest by tag (HEAD,
    GET), a blob in ranged segments with one broken and resumed, a ``HEAD``
    confirming it for another namespace, tags/list, referrers and the
    breaker's recovery look (``/v2/ghcr.io/``) are all sent under
    ``/v2/ghcr.io/`` with ``ns=ghcr.io``, and all are answered.
    """
    harness, fake = prefixed(tmp_path, segments=4, segment_min_size=4096)
    app = image(fake, "ghcr.io/library/app")
    step = len(LAYER) // 4
    fake.break_range[(app["layer"], step)] = 1000
    response = harness.request("GET", "/v2/app/manifests/latest")
    assert response.code == 200
    assert harness.body(response) == app["body"].encode()
    blob = harness.request("GET", f"/v2/app/blobs/{app['layer']}")
    assert blob.code == 200 and harness.body(blob) == LAYER
    # ghcr.io (the same upstream) does not vouch for it yet: a HEAD asks.
    other = harness.request("GET", f"/v2/ghcr.io/library/app/blobs/{app['layer']}")
    assert other.code == 200 and harness.body(other) == LAYER
    tags = harness.request("GET", "/v2/app/tags/list")
    # The registry's name, not the hq's (prefixed) one.
    assert json.loads(harness.body(tags)) == {
        "name": "library/app",
        "tags": ["latest"],
    }
    referrers = harness.request("GET", f"/v2/app/referrers/{app['manifest']}")
    assert referrers.code == 200
    upstream = harness.upstreams["hq"]
    upstream.breaker.failed(True)
    harness.clock.advance(upstream.config.breaker_backoff)
    done = Deferred.fromCoroutine(upstream.recover())
    harness.settle()
    result(done)
    assert upstream.breaker.allow()  # its 404 there is a registry's answer

    seen = "\n".join(fake.uris)
    for expected in (
        "HEAD /v2/ghcr.io/library/app/manifests/latest?ns=ghcr.io",
        f"GET /v2/ghcr.io/library/app/manifests/{app['manifest']}?ns=ghcr.io",
        f"HEAD /v2/ghcr.io/library/app/blobs/{app['layer']}?ns=ghcr.io",
        f"GET /v2/ghcr.io/library/app/blobs/{app['layer']}?ns=ghcr.io",
        "GET /v2/ghcr.io/library/app/tags/list?ns=ghcr.io",
        f"GET /v2/ghcr.io/library/app/referrers/{app['manifest']}?ns=ghcr.io",
        "GET /v2/ghcr.io/?ns=ghcr.io",
    ):
        assert expected in fake.uris, (expected, seen)
    assert f"bytes={step + 1000}-{2 * step - 1}" in fake.ranges
    assert all(
        uri.split(" ")[1].startswith("/v2/ghcr.io/") and "?ns=ghcr.io" in uri
        for uri in fake.uris
    ), seen


def test_tokens_follow_the_challenge_through_a_prefixed_mirror(
    tmp_path: Path,
) -> None:
    """A prefixed mirror's challenge decides the token request: its realm
    as given (a regmirror's carries ``?ns=``, kept, and no ``ns`` is added
    to it), its scope unchanged; the token then goes with the prefixed
    request."""
    harness, fake = prefixed(tmp_path)
    fake.token = "t0k3n"
    fake.realm = "http://hq.test/token?ns=quay.io"
    app = image(fake, "ghcr.io/library/app")
    response = harness.request("GET", "/v2/app/manifests/latest")
    assert response.code == 200, harness.body(response)
    token_requests = [uri for uri in fake.uris if "/token" in uri]
    assert token_requests == [
        "GET /token?ns=quay.io&service=fake&scope=repository%3Alibrary%2Fapp%3Apull"
    ]
    assert (
        f"/v2/ghcr.io/library/app/manifests/{app['manifest']}",
        "Bearer t0k3n",
    ) in fake.authorizations


def test_a_redirect_from_a_prefixed_mirror_is_followed_as_usual(
    tmp_path: Path,
) -> None:
    """A blob's redirect goes where the mirror says, without the prefix or
    ``ns`` added."""
    harness, fake = prefixed(tmp_path)
    fake.redirect = "http://hq.test"
    app = image(fake, "ghcr.io/library/app")
    blob = harness.request("GET", f"/v2/app/blobs/{app['layer']}")
    assert blob.code == 200 and harness.body(blob) == LAYER
    assert fake.uris[-2:] == [
        f"GET /v2/ghcr.io/library/app/blobs/{app['layer']}?ns=ghcr.io",
        f"GET /cdn/{app['layer']}",
    ]


def test_a_prefixed_mirror_fails_over_to_the_origin_and_its_stale_tag_loses(
    tmp_path: Path,
) -> None:
    """
    A prefixed mirror first, the origin last: the tag is the origin's
    (the mirror's older answer recorded as stale), content by digest comes
    from the mirror under its prefix; once the mirror fails, from the origin.
    """
    mirror_up, origin = RecordingRegistry(), FakeRegistry()
    harness = Harness(
        str(tmp_path / "cache"),
        {"mirror": mirror_up, "origin": origin},
        {"mirror": {"prefix": "docker.io"}},
    )
    image(mirror_up, "docker.io/library/app", created=OLD)
    fresh = image(origin, created=NEW)
    mirror_up.manifests[fresh["manifest"]] = origin.manifests[fresh["manifest"]]
    response = harness.request("GET", "/v2/app/manifests/latest")
    assert response.headers.getRawHeaders("Docker-Content-Digest") == [
        fresh["manifest"]
    ]
    assert response.headers.getRawHeaders("Regmirror-Tag-Source") == ["origin"]
    pool = harness.router_pool("docker.io")
    assert ("mirror", "library/app") in pool.stale
    assert harness.body(harness.request("GET", f"/v2/app/blobs/{fresh['layer']}"))
    assert f"GET /v2/docker.io/library/app/blobs/{fresh['layer']}" in mirror_up.uris
    assert origin.count("GET", "/blobs/") == 0

    mirror_up.fault = lambda request: (500, b"down")
    config = harness.request("GET", f"/v2/app/blobs/{fresh['config']}")
    assert config.code == 200 and harness.body(config)
    assert f"GET /v2/docker.io/library/app/blobs/{fresh['config']}" in mirror_up.uris
    assert origin.count("GET", f"/v2/library/app/blobs/{fresh['config']}") == 1
