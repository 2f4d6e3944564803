"""
``credentials = passthrough`` in memory: the real resources, gate, fetcher
and store over a fake private registry (token auth, each user granted
some repositories), with ``StubTreq`` on both sides and a ``Clock``.

Pins down what the end-to-end test cannot time for sure: two users with
access pulling one cold layer share one download while a user without
access asking at that moment is refused and joins nothing; the bounds of
:class:`regmirror.passthrough.Passthrough` (identities, confirmations);
``access_check_offline``; refusals not counting against the upstream's
health; the keyed hashes; a refusal after the check passed reaching the
client as its own; the status document naming no repository of such a
namespace.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import treq
from fakeregistry import FakeRegistry
from memory import CONFIG, LAYER, image_manifest, result
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from regmirror import passthrough as passthrough_module
from regmirror.access.gate import Gate
from regmirror.config import (
    EVERYONE,
    AccessConfig,
    NamespaceConfig,
    Secret,
    UpstreamConfig,
)
from regmirror.fetch import Fetcher
from regmirror.http.api import RegistryAPI
from regmirror.http.health import Root
from regmirror.http.token import TokenResource
from regmirror.metrics import Metrics
from regmirror.passthrough import (
    IDENTITY_IDLE,
    MAX_CONFIRMED,
    MAX_IDENTITIES,
    Credentials,
    Passthrough,
)
from regmirror.pool import UpstreamPool
from regmirror.reference import OCI_MANIFEST
from regmirror.routing import Router
from regmirror.status import shown_to
from regmirror.store import Store
from regmirror.upstream import Upstream

NAMESPACE = "private.test"
REPOSITORY = "team/app"
OTHER = "team/other"
#: distinctive, so that finding one anywhere cannot be a coincidence
PASSWORDS = {
    "alice": "pw-alice-5d0c2e91",
    "bob": "pw-bob-a7f3b6e0",
    "carol": "pw-carol-19e4d8c5",
}


def basic(user: str, password: str | None = None) -> str:
    pair = f"{user}:{PASSWORDS[user] if password is None else password}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


class PrivateRegistry(FakeRegistry):
    """
    A registry with token auth: ``/token`` takes each user's Basic
    credentials and issues a fresh token naming the user; ``/v2/`` wants
    such a token and serves a repository only to the users granted it
    (*refusal*: the status for the others, 401 as Docker Hub and
    distribution answer, or 403).

    :ivar grants: user → the repositories it may pull.
    :ivar token_requests: the user each ``/token`` request named, and
        whether its password was right.
    """

    def __init__(self) -> None:
        super().__init__()
        self.grants: dict[str, set[str]] = {}
        self.issued: dict[str, str] = {}
        #: tokens carry the grants of their issue, as a JWT's access does,
        #: rather than the grants of now
        self.tokens_carry_grants = False
        self.carried: dict[str, set[str]] = {}
        self.token_requests: list[tuple[str | None, bool]] = []
        self.refusal = 401
        self.fault = self._authorize

    def render(self, request: Request) -> Any:
        if request.path == b"/token":
            self.requests.append((request.method.decode(), "/token"))
            self.authorizations.append(("/token", request.getHeader("Authorization")))
            user, good = self._user(request.getHeader("Authorization"))
            self.token_requests.append((user, good))
            if user is not None and not good:
                request.setResponseCode(401)
                return b'{"details":"incorrect username or password"}'
            token = f"token-{len(self.issued)}"
            self.issued[token] = user or ""
            self.carried[token] = set(self.grants.get(user or "", ()))
            request.setHeader("Content-Type", "application/json")
            return json.dumps({"token": token, "expires_in": 300}).encode()
        return super().render(request)

    def _user(self, authorization: str | None) -> tuple[str | None, bool]:
        if not authorization or not authorization.startswith("Basic "):
            return None, False
        text = base64.b64decode(authorization[6:]).decode()
        user, _, password = text.partition(":")
        return user, PASSWORDS.get(user) == password

    def _authorize(self, request: Request) -> tuple[int, bytes] | None:
        authorization = request.getHeader("Authorization") or ""
        token = authorization.removeprefix("Bearer ")
        user = self.issued.get(token)
        path = request.path.decode()
        repository = path[len("/v2/") :].rsplit("/", 2)[0]
        if path == "/v2/" and user is not None:
            return 200, b"{}"  # the API root: any user's token
        granted = (
            self.carried.get(token, set())
            if self.tokens_carry_grants
            else self.grants.get(user or "", set())
        )
        if user is None or (self.refusal == 401 and repository not in granted):
            request.setHeader(
                "WWW-Authenticate",
                f'Bearer realm="http://origin.test/token",service="origin",'
                f'scope="repository:{repository}:pull"',
            )
            return 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"no"}]}'
        if repository not in granted:
            return 403, b'{"errors":[{"code":"DENIED","message":"no"}]}'
        return None


class PassthroughMirror:
    """
    A mirror whose one namespace (the default) passes clients'
    credentials through to :class:`PrivateRegistry` at ``origin.test``,
    with an image of one layer in :data:`REPOSITORY` and :data:`OTHER`.
    """

    def __init__(
        self, root: str, refusals_answer: bool = True, **namespace: Any
    ) -> None:
        self.clock = Clock()
        self.store = Store(root, now=self.clock.seconds)
        self.store.open()
        self.fake = PrivateRegistry()
        self.layer = self.fake.add_blob(LAYER)
        config = self.fake.add_blob(CONFIG)
        document = image_manifest(
            (config, len(CONFIG)),
            [(self.layer, len(LAYER))],
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )
        for repository in (REPOSITORY, OTHER):
            self.manifest, _ = self.fake.add_manifest(
                repository, "v1", document, OCI_MANIFEST
            )
        self.stub = RequestTraversalAgent(self.fake)
        self.upstream = Upstream(
            UpstreamConfig("origin", "http://origin.test"), self.stub, self.clock
        )
        self.namespace = NamespaceConfig(
            NAMESPACE,
            ("origin",),
            "origin",
            default=True,
            prefetch=0,
            credentials="passthrough",
            **namespace,
        )
        self.metrics = Metrics()
        self.pool = UpstreamPool(
            NAMESPACE,
            [self.upstream],
            self.upstream,
            metrics=self.metrics,
            per_repository=True,
            refusals_answer=refusals_answer,
        )
        router = Router([(self.namespace, self.pool)])
        self.fetcher = Fetcher(
            self.store, self.clock, tag_ttl=0.0, metrics=self.metrics
        )
        self.gate = Gate(
            AccessConfig(anonymous=EVERYONE),
            self.clock,
            maybeDeferred,
            passthrough=frozenset({NAMESPACE}),
        )
        self.passthrough = Passthrough(self.clock)
        api = RegistryAPI(
            router, self.fetcher, self.clock, self.metrics, self.gate, self.passthrough
        )
        token = TokenResource(self.gate, router, self.passthrough)
        self.root = Root(api, {b"token": token})
        self.client = StubTreq(self.root)

    def settle(self) -> None:
        """Pump both in-memory sides until nothing moves (bounded)."""
        for _ in range(50):
            before = len(self.fake.requests)
            self.stub.flush()
            self.client.flush()
            self.clock.advance(0)
            self.stub.flush()
            self.client.flush()
            if len(self.fake.requests) == before:
                return

    def start(self, path: str, user: str | None = None, **headers: str) -> Any:
        """Send a GET; its Deferred (not yet settled)."""
        if user is not None:
            headers["Authorization"] = basic(user)
        return self.client.request(
            "GET",
            f"http://mirror.test{path}",
            headers={"Accept": OCI_MANIFEST, **headers},
        )

    def get(self, path: str, user: str | None = None, **headers: str) -> Any:
        d = self.start(path, user, **headers)
        self.settle()
        return result(d)

    def body(self, response: Any) -> bytes:
        d = treq.content(response)
        self.settle()
        return result(d)

    def asked(self, method: str, suffix: str = "") -> list[str]:
        """Whose token each *method* request (of a path ending in
        *suffix*) carried: one without, answered by a challenge, is none."""
        whose = [
            self.issued_to(authorization)
            for (sent, _), (path, authorization) in zip(
                self.fake.requests, self.fake.authorizations, strict=True
            )
            if sent == method and path.endswith(suffix) and path != "/token"
        ]
        return [user for user in whose if user]

    def blob_gets(self) -> list[str]:
        """Whose token each download of the layer carried."""
        return self.asked("GET", f"/blobs/{self.layer}")

    def issued_to(self, authorization: str | None) -> str | None:
        token = (authorization or "").removeprefix("Bearer ")
        return self.fake.issued.get(token)

    def heads(self) -> int:
        """The access checks the upstream answered."""
        return len(self.asked("HEAD"))


@pytest.fixture
def mirror(tmp_path: Any) -> PassthroughMirror:
    made = PassthroughMirror(str(tmp_path / "cache"))
    made.fake.grants = {"alice": {REPOSITORY}, "carol": {REPOSITORY}}
    return made


def blob_path(mirror: PassthroughMirror, repository: str = REPOSITORY) -> str:
    return f"/v2/{repository}/blobs/{mirror.layer}"


def manifest_path(mirror: PassthroughMirror, repository: str = REPOSITORY) -> str:
    return f"/v2/{repository}/manifests/{mirror.manifest}"


# -- coalescing -------------------------------------------------------------


def test_two_users_with_access_share_one_download_one_without_gets_nothing(
    mirror: PassthroughMirror,
) -> None:
    """
    Alice and carol (both granted the repository) ask for the same cold
    layer while the upstream holds its body half sent, and bob (not
    granted) asks at the same moment: the upstream sees one GET of the
    blob; bob is refused (the mirror's challenge) while the download is
    still held, and his request joined nothing (the only blob GET is one
    of a granted user's); alice and carol each get the whole layer.
    """
    mirror.fake.hold[mirror.layer] = len(LAYER) // 2
    pending = [
        mirror.start(blob_path(mirror), "alice"),
        mirror.start(blob_path(mirror), "carol"),
        mirror.start(blob_path(mirror), "bob"),
    ]
    mirror.settle()
    assert len(mirror.fake.held) == 1
    downloads = mirror.blob_gets()
    assert len(downloads) == 1 and downloads[0] in ("alice", "carol"), downloads

    refused = result(pending[2])
    assert refused.code == 401
    assert "Bearer" in refused.headers.getRawHeaders("WWW-Authenticate")[0]
    assert LAYER[:64] not in mirror.body(refused)
    assert mirror.blob_gets() == downloads

    mirror.fake.release()
    mirror.settle()
    for d in pending[:2]:
        response = result(d)
        assert response.code == 200
        assert mirror.body(response) == LAYER
    assert mirror.blob_gets() == downloads


# -- refusals -----------------------------------------------------------------


def test_a_refusal_after_the_check_is_the_clients_not_a_bad_gateway(
    mirror: PassthroughMirror,
) -> None:
    """
    Alice is confirmed for the repository (its manifest), then her access
    is revoked upstream: within ``access_check_ttl`` the next request (the
    layer, cold) is refused by the upstream, and alice gets that refusal
    as her own (a ``401`` challenge; ``403 DENIED`` where the upstream
    says 403), not ``502`` naming the mirror's credentials; the next
    request is checked afresh.
    """
    assert mirror.get(manifest_path(mirror), "alice").code == 200
    mirror.fake.grants["alice"] = set()
    response = mirror.get(blob_path(mirror), "alice")
    assert response.code == 401, mirror.body(response)
    assert "insufficient_scope" in response.headers.getRawHeaders("WWW-Authenticate")[0]
    assert LAYER[:64] not in mirror.body(response)
    # The manifest is cached: served, were the confirmation still believed.
    assert not mirror.passthrough._confirmed
    assert mirror.get(manifest_path(mirror), "alice").code == 401

    mirror.fake.refusal = 403
    mirror.fake.grants["alice"] = {REPOSITORY}
    assert mirror.get(manifest_path(mirror), "alice").code == 200
    mirror.fake.grants["alice"] = set()
    response = mirror.get(f"/v2/{REPOSITORY}/tags/list", "alice")
    assert response.code == 403
    assert b"DENIED" in mirror.body(response)


def test_a_revoked_user_lists_no_tags_past_access_check_ttl(
    mirror: PassthroughMirror,
) -> None:
    """
    Tag lists are asked upstream with the client's own tokens, whose access
    the upstream fixed when it issued them: alice's (300 s) still listed
    the tags minutes after her access was revoked, past ``access_check_ttl``
    (60 s; found by the fresh-eyes review).  Her tokens are reused no
    longer than that: the next list, with a fresh token, is refused.
    """
    mirror.fake.tokens_carry_grants = True
    tags = f"/v2/{REPOSITORY}/tags/list"
    assert mirror.get(tags, "alice").code == 200
    mirror.fake.grants["alice"] = set()
    mirror.clock.advance(30)
    assert mirror.get(tags, "alice").code == 200  # within access_check_ttl
    mirror.clock.advance(31)
    refused = mirror.get(tags, "alice")
    assert refused.code == 401, mirror.body(refused)


def test_refusals_leave_the_upstreams_breaker_closed(tmp_path: Any) -> None:
    """
    Bob asks ten times for a repository he may not read, four of them
    with a wrong password: every answer is his refusal (401), the
    upstream's breaker stays closed, and alice is still served.
    """
    mirror = PassthroughMirror(str(tmp_path / "cache"))
    mirror.fake.grants = {"alice": {REPOSITORY}}
    statuses = []
    for attempt in range(10):
        # Four wrong passwords: one short of the failed logins that would
        # make the address (alice's too) wait.
        wrong = attempt < 4
        password = "wrong-password-4b1e" if wrong else None
        headers = {"Authorization": basic("bob", password)}
        statuses.append(mirror.get(manifest_path(mirror), **headers).code)
    assert statuses == [401] * 10, statuses
    assert mirror.upstream.breaker.health().opened == 0
    assert mirror.get(manifest_path(mirror), "alice").code == 200


# -- the tables ---------------------------------------------------------------


def test_identities_are_bounded_and_forgotten_when_idle(
    mirror: PassthroughMirror,
) -> None:
    """
    At most 1,024 clients' credentials are kept (the least recently used
    go first), and credentials unused for ten minutes are dropped.
    """
    assert (MAX_IDENTITIES, IDENTITY_IDLE) == (1024, 600.0)
    table = mirror.passthrough
    first = table.identity(mirror.pool, Credentials("user-0", Secret("secret-0")))
    for n in range(1, MAX_IDENTITIES + 1):
        table.identity(mirror.pool, Credentials(f"user-{n}", Secret(f"secret-{n}")))
    assert len(table) == MAX_IDENTITIES
    again = table.identity(mirror.pool, Credentials("user-0", Secret("secret-0")))
    assert again is not first, "the least recently used was kept"
    assert len(table) == MAX_IDENTITIES

    mirror.clock.advance(IDENTITY_IDLE - 1)
    kept = table.identity(mirror.pool, Credentials("user-0", Secret("secret-0")))
    assert kept is again
    mirror.clock.advance(2)
    table.identity(mirror.pool, Credentials("user-0", Secret("secret-0")))
    assert len(table) == 1


def test_confirmations_last_access_check_ttl_and_are_bounded(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    One check (a token request and a ``HEAD``) per client and repository
    within ``access_check_ttl``; past it, the next request asks again.
    The confirmations are bounded (10,000; here 2), the oldest going
    first, which is then asked again.
    """
    assert MAX_CONFIRMED == 10_000
    mirror = PassthroughMirror(str(tmp_path / "cache"), access_check_ttl=60.0)
    mirror.fake.grants = {"alice": {REPOSITORY, OTHER}, "carol": {REPOSITORY}}
    assert mirror.get(manifest_path(mirror), "alice").code == 200
    assert mirror.heads() == 1
    mirror.clock.advance(59)
    assert mirror.get(blob_path(mirror), "alice").code == 200
    assert mirror.get(manifest_path(mirror), "alice").code == 200
    assert mirror.heads() == 1
    mirror.clock.advance(2)
    assert mirror.get(manifest_path(mirror), "alice").code == 200
    assert mirror.heads() == 2

    monkeypatch.setattr(passthrough_module, "MAX_CONFIRMED", 2)
    # (A HEAD may also vouch for the manifest in the other repository.)
    assert mirror.get(manifest_path(mirror, OTHER), "alice").code == 200
    heads = mirror.heads()
    assert mirror.get(manifest_path(mirror), "carol").code == 200
    assert mirror.heads() == heads + 1
    assert len(mirror.passthrough._confirmed) == 2
    # alice's first repository was the oldest: dropped, so asked again.
    assert mirror.get(manifest_path(mirror), "alice").code == 200
    assert mirror.heads() == heads + 2
    assert mirror.get(manifest_path(mirror), "alice").code == 200
    assert mirror.heads() == heads + 2


def test_tables_are_keyed_by_a_keyed_hash_never_the_secret(
    mirror: PassthroughMirror,
) -> None:
    """
    The identities and confirmations are keyed by an HMAC under the
    process's own random key: neither the password nor the user name nor
    their Basic encoding is in a key or a ``repr``, and another process
    (another key) names the same credentials differently.
    """
    assert mirror.get(manifest_path(mirror), "alice").code == 200
    table = mirror.passthrough
    keys = [*table._identities, *(k for k, _ in table._confirmed)]
    assert keys
    text = repr(keys) + repr(table) + repr(list(table._identities.values()))
    for secret in (PASSWORDS["alice"], basic("alice")[6:], "alice"):
        assert secret not in text
    credentials = Credentials("alice", Secret("secret-0"))
    assert PASSWORDS["alice"] not in repr(credentials)
    one = table.identity(mirror.pool, credentials).key
    other = Passthrough(mirror.clock).identity(mirror.pool, credentials).key
    assert one != other and len(one) == 64


# -- the upstream out of reach ----------------------------------------------


def unreachable(mirror: PassthroughMirror) -> None:
    """The upstream answers every request 503 from now on."""

    def fault(request: Request) -> tuple[int, bytes]:
        return 503, b"down"

    mirror.fake.fault = fault


def test_an_unreachable_upstream_serves_no_cache_by_default(
    mirror: PassthroughMirror,
) -> None:
    """
    Without ``access_check_offline`` (``0s``), once alice's confirmation
    is past ``access_check_ttl`` and the upstream cannot be asked, she
    gets the upstream's failure (a 5xx), not the cached manifest or
    layer, though both are cached.
    """
    assert mirror.get(manifest_path(mirror), "alice").code == 200
    assert mirror.get(blob_path(mirror), "alice").code == 200
    mirror.clock.advance(mirror.namespace.access_check_ttl + 1)
    unreachable(mirror)
    for path in (manifest_path(mirror), blob_path(mirror)):
        response = mirror.get(path, "alice")
        assert response.code >= 500, response.code
        assert LAYER[:64] not in mirror.body(response)


def test_an_unreachable_upstream_serves_what_was_confirmed_within_offline(
    tmp_path: Any,
) -> None:
    """
    With ``access_check_offline = 1h``, while the upstream cannot be
    asked: alice, confirmed 61 s ago, is served the cached manifest and
    layer; carol, granted upstream but never confirmed here, is not; and
    once alice's confirmation is older than the hour, neither is she.
    """
    mirror = PassthroughMirror(str(tmp_path / "cache"), access_check_offline=3600.0)
    mirror.fake.grants = {"alice": {REPOSITORY}, "carol": {REPOSITORY}}
    assert mirror.get(manifest_path(mirror), "alice").code == 200
    assert mirror.get(blob_path(mirror), "alice").code == 200
    mirror.clock.advance(61)
    unreachable(mirror)
    response = mirror.get(blob_path(mirror), "alice")
    assert response.code == 200 and mirror.body(response) == LAYER
    assert mirror.get(manifest_path(mirror), "alice").code == 200
    refused = mirror.get(blob_path(mirror), "carol")
    assert refused.code >= 500 and LAYER[:64] not in mirror.body(refused)

    mirror.clock.advance(3600)
    response = mirror.get(blob_path(mirror), "alice")
    assert response.code >= 500 and LAYER[:64] not in mirror.body(response)


# -- what the mirror says about such a namespace -----------------------------


def test_the_status_document_names_no_repository_of_a_passthrough_namespace(
    mirror: PassthroughMirror,
) -> None:
    """
    Without ``[access]`` (everyone may pull) the status document names no
    repository of a passthrough namespace, to an anonymous client nor to
    one whose token (from ``/token``, which seals whatever it is given)
    names the repository: who may read it is the upstream's to say.
    """
    anonymous = DummyRequest([b""])
    shown = result(
        Deferred.fromCoroutine(shown_to(mirror.gate, anonymous, [NAMESPACE]))
    )
    assert not shown(NAMESPACE, REPOSITORY)

    token = mirror.get(
        f"/token?service=regmirror&scope=repository:{REPOSITORY}:pull",
        "bob",
    )
    assert token.code == 200
    value = json.loads(mirror.body(token))["token"]
    holder = DummyRequest([b""])
    holder.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {value}".encode()])
    shown = result(Deferred.fromCoroutine(shown_to(mirror.gate, holder, [NAMESPACE])))
    assert not shown(NAMESPACE, REPOSITORY)


# -- /token -------------------------------------------------------------------


def test_token_asks_the_upstream_whether_it_takes_the_credentials(
    mirror: PassthroughMirror,
) -> None:
    """
    ``/token`` with a client's own Basic credentials (``docker login``: no
    scope; a pull: the repository's) asks the upstream's realm whether it
    takes them: a wrong password gets ``401`` and no token (counted as a
    failed login), a right one a token, even without access to the
    repository (that is each pull's check); the answer is believed for
    ``access_check_ttl``.
    """
    login = "/token?service=regmirror"
    pull = f"/token?service=regmirror&scope=repository:{REPOSITORY}:pull"
    wrong = {"Authorization": basic("alice", "wrong-password-7c2d")}
    for path in (login, pull):
        response = mirror.get(path, **wrong)
        assert response.code == 401
        assert b"token" not in mirror.body(response)
    assert ("alice", False) in mirror.fake.token_requests
    for user in ("alice", "bob"):
        response = mirror.get(pull, user)
        assert response.code == 200, mirror.body(response)
        assert json.loads(mirror.body(response))["token"]
    asked = len(mirror.fake.token_requests)
    assert mirror.get(login, "alice").code == 200
    assert len(mirror.fake.token_requests) == asked
