"""
Property-based fuzzing of the whole in-memory mirror (``memory.Harness``):
arbitrary bytes as the request method, the request path and the ``Range``,
``Accept``, ``Host``, ``Authorization`` and ``X-Forwarded-For`` headers,
written as raw HTTP/1.1 into the real twisted.web site (the mirror's own
``MirrorSite`` over ``twisted.test.iosim``, so that nothing normalises the
bytes on the way), with and without access control.

For every request: no unhandled exception is logged, the status is one the
mirror is meant to give, every 4xx/5xx with a body carries an OCI error
body, and nothing appears on disk outside the cache's layout.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import bcrypt
from fakeregistry import FakeRegistry
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from memory import Harness, image
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim

from regmirror.config import AccessConfig
from regmirror.http.site import MirrorSite
from regmirror.ini_values import parse_networks

#: Statuses the mirror may answer with (README, "Errors"); a 500 would be
#: an internal error, i.e. a bug.
EXPECTED_STATUSES = frozenset(
    {200, 206, 400, 401, 403, 404, 405, 416, 429, 502, 503, 504}
)
OCI_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_UNKNOWN",
        "MANIFEST_INVALID",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
        "UNAVAILABLE",
        "RANGE_INVALID",
        "PAGINATION_NUMBER_INVALID",
        "TAG_INVALID",
        "NOT_FOUND",
    }
)
#: What may exist under the cache folder (README, "Cache layout").
_HEX = r"[0-9a-f]{2}/[0-9a-f]{64}"
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
LAYOUT = re.compile(
    rf"(?:size|blobs/sha256/{_HEX}|manifests/sha256/{_HEX}|vouches/sha256/{_HEX}"
    rf"|tags/(?:docker\.io|ghcr\.io)/{_COMPONENT}(?:/{_COMPONENT})*"
    r"/_tags/[A-Za-z0-9_][A-Za-z0-9._-]{0,127})"
)
PASSWORD = "fuzz password"
EXAMPLES = 500


class _Client(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def _first_answer(raw: bytes, head: bool) -> tuple[int, dict[str, str], bytes] | None:
    """Status, headers and body of the first response in *raw*."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = raw[:end].decode("latin-1").split("\r\n")
    words = lines[0].split(" ", 2)
    assert len(words) >= 2 and words[1].isdigit(), lines[0]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    rest = raw[end + 4 :]
    if head:
        return int(words[1]), headers, b""
    if headers.get("content-length", "").isdigit():
        return int(words[1]), headers, rest[: int(headers["content-length"])]
    if "chunked" in headers.get("transfer-encoding", ""):
        body = b""
        for _ in range(10_000):
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2 :]
        return int(words[1]), headers, body
    return int(words[1]), headers, rest


class Fuzzed:
    """A memory mirror behind its real site, and what it logged."""

    def __init__(self, root: Path, *, guarded: bool) -> None:
        self.root = root
        self.cache = root / "cache"
        origin = FakeRegistry()
        self.content = image(origin)
        image(origin, name="org/app", tag="v1")
        access = None
        trusted = parse_networks("127.0.0.1 ::1")
        if guarded:
            etc = root / "etc"
            etc.mkdir()
            hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4))
            (etc / "users.htpasswd").write_text(f"alice:{hashed.decode()}\n")
            access = AccessConfig(
                anonymous=parse_networks("10.0.0.0/8 2001:db8::/32"),
                htpasswd=str(etc / "users.htpasswd"),
                trusted_proxies=trusted,
                token_ttl=300.0,
            )
        self.harness = Harness(str(self.cache), {"origin": origin}, access=access)
        resource = self.harness.client._agent._rootResource
        self.site = MirrorSite(resource, self.harness.clock, trusted)
        # Channel timeouts on the test's clock, not the global reactor.
        self.site.reactor = self.harness.clock
        self.before = self._outside_cache()
        self.failures: list[str] = []

    def _outside_cache(self) -> set[str]:
        found = set()
        for folder, _, files in os.walk(self.root):
            for name in files:
                path = Path(folder, name).relative_to(self.root)
                if path.parts[0] != "cache":
                    found.add(str(path))
        return found

    def observe(self, event: LogEvent) -> None:
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            self.failures.append(failure.getTraceback())

    def send(self, raw: bytes) -> bytes:
        """Write *raw* into a fresh connection; what came back."""
        server = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        client = _Client()
        server_transport = iosim.FakeTransport(
            server,
            isServer=True,
            hostAddress=IPv4Address("TCP", "127.0.0.1", 5000),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        client_transport = iosim.FakeTransport(client, isServer=False)
        pump = iosim.connect(
            server,
            server_transport,
            client,
            client_transport,
            greet=False,
            clock=self.harness.clock,
        )
        client_transport.write(raw)
        for _ in range(20):
            seen = len(client.received)
            pump.flush()
            self.harness.settle()
            pump.flush()
            if len(client.received) == seen and seen:
                break
        client_transport.loseConnection()
        pump.flush()
        return client.received

    def check(self, method: bytes, path: bytes, headers: dict[bytes, bytes]) -> None:
        raw = b"".join(
            [
                method + b" " + path + b" HTTP/1.1\r\n",
                *(name + b": " + value + b"\r\n" for name, value in headers.items()),
                b"\r\n",
            ]
        )
        self.failures = []
        globalLogPublisher.addObserver(self.observe)
        try:
            received = self.send(raw)
        finally:
            globalLogPublisher.removeObserver(self.observe)
        assert not self.failures, f"{raw!r} logged:\n" + "\n".join(self.failures)
        answer = _first_answer(received, head=method == b"HEAD")
        assert answer is not None, f"{raw!r}: no answer, got {received[:300]!r}"
        status, got, body = answer
        assert status in EXPECTED_STATUSES, f"{raw!r}: {received[:500]!r}"
        if status >= 400 and body:
            try:
                codes = [e["code"] for e in json.loads(body)["errors"]]
            except (ValueError, KeyError, TypeError):
                codes = []
            assert codes and set(codes) <= OCI_CODES, f"{raw!r}: {received[:500]!r}"
        self.check_disk(raw)

    def check_disk(self, raw: bytes) -> None:
        assert self._outside_cache() == self.before, (
            f"{raw!r} created {self._outside_cache() - self.before}"
        )
        strays = []
        for folder, _, files in os.walk(self.cache):
            for name in files:
                relative = Path(folder, name).relative_to(self.cache).as_posix()
                if not LAYOUT.fullmatch(relative):
                    strays.append(relative)
        assert not strays, f"{raw!r} left files outside the cache layout: {strays}"


_NO_EOL = st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b)
_SEGMENTS = st.sampled_from(
    [
        b"..",
        b".",
        b"",
        b"%2e%2e",
        b"%2f",
        b"%252e%252e",
        b"%00",
        b"\\..\\",
        b"\x00",
        b"\xff",
        b"app",
        b"library",
        b"org",
        b"_tags",
        b"manifests",
        b"blobs",
        b"tags",
        b"list",
        b"referrers",
        b"latest",
        b"v1",
        b"Latest",
        b".hidden",
        b"docker.io",
        b"ghcr.io",
        b"169.254.169.254",
        b"localhost:5000",
        b"sha256:" + b"0" * 64,
        b"sha256:" + b"A" * 64,
        b"md5:d41d8cd98f00b204e9800998ecf8427e",
        b"a" * 130,
        b"?ns=ghcr.io",
        b"?ns=..%2f..",
        b"?n=1&last=..",
        b"?n=-1",
        b"#frag",
    ]
)


def _paths(content: dict[str, str]) -> st.SearchStrategy[bytes]:
    real = st.sampled_from(
        [
            f"/v2/app/blobs/{content['layer']}".encode(),
            f"/v2/library/app/blobs/{content['config']}".encode(),
            f"/v2/app/manifests/{content['manifest']}".encode(),
            b"/v2/app/manifests/latest",
            b"/v2/ghcr.io/org/app/manifests/v1",
            b"/v2/app/tags/list",
            b"/v2/",
            b"/token?scope=repository:app:pull",
        ]
    )
    built = st.lists(st.one_of(_SEGMENTS, _NO_EOL), max_size=8).map(
        lambda parts: b"/v2/" + b"/".join(parts)
    )
    mutated = st.tuples(real, _SEGMENTS, _NO_EOL).map(lambda t: t[0] + t[1] + t[2])
    return st.one_of(real, built, mutated, _NO_EOL)


_METHODS = st.one_of(
    st.sampled_from(
        [
            b"GET",
            b"HEAD",
            b"POST",
            b"PUT",
            b"PATCH",
            b"DELETE",
            b"OPTIONS",
            b"TRACE",
            b"get",
        ]
    ),
    st.binary(min_size=1, max_size=12).filter(lambda b: not set(b) & set(b" \r\n")),
)
_RANGE = st.one_of(
    _NO_EOL,
    st.from_regex(rb"\Abytes=[0-9]{0,25}-[0-9]{0,25}(,[0-9]{0,3}-[0-9]{0,3}){0,3}\Z"),
)
_ACCEPT = st.one_of(
    _NO_EOL,
    st.lists(
        st.sampled_from(
            [
                b"application/vnd.oci.image.index.v1+json",
                b"application/vnd.oci.image.manifest.v1+json",
                b"application/vnd.docker.distribution.manifest.v2+json",
                b"*/*",
                b"text/html;q=0",
                b"application/json; q=0.5",
            ]
        ),
        max_size=4,
    ).map(b", ".join),
)
_AUTHORIZATION = st.one_of(
    _NO_EOL,
    st.sampled_from([b"Basic", b"Bearer", b"basic", b"Digest"]).flatmap(
        lambda scheme: st.one_of(
            st.just(scheme + b" " + base64.b64encode(f"alice:{PASSWORD}".encode())),
            _NO_EOL.map(lambda v: scheme + b" " + v),
            _NO_EOL.map(lambda v: scheme + b" " + base64.b64encode(v)),
            _NO_EOL.map(lambda v: scheme + b" " + v + b"." + v),
        )
    ),
)
_FORWARDED = st.one_of(
    _NO_EOL,
    st.lists(
        st.sampled_from(
            [
                b"10.1.2.3",
                b"192.0.2.1",
                b"2001:db8::1",
                b"::ffff:10.0.0.1",
                b"127.0.0.1",
                b"unknown",
                b"fe80::1%eth0",
                b"",
            ]
        ),
        max_size=4,
    ).map(b", ".join),
)


def _headers() -> st.SearchStrategy[dict[bytes, bytes]]:
    return st.fixed_dictionaries(
        {},
        optional={
            b"Range": _RANGE,
            b"Accept": _ACCEPT,
            b"Host": _NO_EOL,
            b"Authorization": _AUTHORIZATION,
            b"X-Forwarded-For": _FORWARDED,
        },
    )


_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)


def _known(content: dict[str, str]) -> list[tuple[bytes, bytes, dict[bytes, bytes]]]:
    """Inputs always tried, besides the random ones: each once broke a mirror."""
    blob = f"/v2/app/blobs/{content['layer']}".encode()
    tag = b"/v2/app/manifests/latest"
    return [
        (b"GET", blob, {b"Range": b"\x80"}),
        (b"GET", tag, {b"Host": b"\xff"}),
        (b"GET", tag, {b"Accept": b"application/\xe9"}),
        (b"GET", tag, {b"Authorization": b"Basic \x80", b"X-Forwarded-For": b"\xff"}),
        (b"GET", tag, {b"X-Forwarded-For": b"10.1.2.3, \xff"}),
        (b"POST", b"/token?scope=repository:app:pull", {}),
        (b"PUT", b"/token?scope=repository:app:pull", {}),
        (b"DELETE", b"/v2/", {}),
        (b"GET", b"/v2/app/manifests/latest?ns=\xff", {}),
    ]


def _run(root: Path, *, guarded: bool) -> None:
    fuzzed = Fuzzed(root, guarded=guarded)

    def one_request(method: bytes, path: bytes, headers: dict[bytes, bytes]) -> None:
        fuzzed.check(method, path, headers)

    test = given(method=_METHODS, path=_paths(fuzzed.content), headers=_headers())(
        one_request
    )
    for method, path, headers in _known(fuzzed.content):
        test = example(method=method, path=path, headers=headers)(test)
    _SETTINGS(test)()


def test_fuzzed_requests_open_mirror(tmp_path: Path) -> None:
    """
    Arbitrary methods, paths and headers against a mirror open to anyone:
    no unhandled exception, only expected statuses, OCI error bodies, and
    nothing on disk outside ``blobs/``, ``manifests/`` and ``tags/`` (the
    spool empty once each request is done).
    """
    _run(tmp_path, guarded=False)


def test_fuzzed_requests_guarded_mirror(tmp_path: Path) -> None:
    """
    The same against a mirror with ``[access]``: anonymous pulls for
    10.0.0.0/8 only, an htpasswd user, 127.0.0.1 trusted as a proxy (so
    that ``X-Forwarded-For`` decides the client's address) and the mirror's
    own ``/token`` endpoint among the paths.
    """
    _run(tmp_path, guarded=True)


def test_fuzz_harness_sees_what_it_must(tmp_path: Path) -> None:
    """
    The checks themselves: a pull through the raw site gets the layer's
    bytes, a bad name an OCI NAME_INVALID body, and an error logged with a
    failure is caught.
    """
    fuzzed = Fuzzed(tmp_path, guarded=False)
    content = fuzzed.content
    received = fuzzed.send(
        f"GET /v2/app/blobs/{content['layer']} HTTP/1.1\r\nHost: m\r\n\r\n".encode()
    )
    answer = _first_answer(received, head=False)
    assert answer is not None and answer[0] == 200
    assert answer[2] == fuzzed.harness.fakes["origin"].blobs[content["layer"]]
    received = fuzzed.send(b"GET /v2/a/%2e%2e/manifests/x HTTP/1.1\r\nHost: m\r\n\r\n")
    answer = _first_answer(received, head=False)
    assert answer is not None
    assert (answer[0], json.loads(answer[2])["errors"][0]["code"]) == (
        400,
        "NAME_INVALID",
    )
    fuzzed.failures = []
    fuzzed.observe({"log_failure": Failure(ValueError("boom"))})
    assert fuzzed.failures
    (fuzzed.cache / "blobs" / "stray").write_bytes(b"x")
    try:
        fuzzed.check_disk(b"probe")
    except AssertionError:
        pass
    else:
        raise AssertionError("a stray file under the cache went unnoticed")
