"""
One upstream registry, spoken to through a Twisted ``IAgent`` (not treq's
``HTTPClient``: see :meth:`Upstream._send`).

:class:`Upstream` sends requests under ``/v2/`` (and its path prefix, with
its ``ns``: a mirror of several registries), answers the registry's
``WWW-Authenticate: Bearer`` challenge with an (anonymous) token from the
named realm, caches tokens per scope, and turns transport problems into
:class:`UpstreamFailure`.  It knows nothing of the cache.
"""

from __future__ import annotations

import base64
import re
from collections import OrderedDict
from collections.abc import Iterator
from urllib.parse import urlencode, urljoin, urlsplit

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from regmirror._flight import SingleFlight
from regmirror.breaker import Breaker
from regmirror.config import DEFAULT_DENY, Network, UpstreamConfig
from regmirror.hosts import is_denied, same_host, same_site
from regmirror.reference import load_json
from regmirror.responses import header, read_small

#: Bodies read whole (errors, tokens, manifests, tag lists) stop here.
MAX_SMALL_BODY = 4 * 1024 * 1024
#: Token lifetime when the realm does not say (the token spec's default).
DEFAULT_TOKEN_LIFETIME = 60.0
#: How long a 429 without Retry-After keeps an upstream aside, and the most
#: any Retry-After may ask for.
DEFAULT_BACKOFF = 60.0
MAX_BACKOFF = 3600.0
#: Redirect statuses that are followed, and how many hops at most.
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
#: Tokens are renewed this long before they expire.
TOKEN_MARGIN = 10.0
#: The most tokens one upstream keeps: one per repository (scope) clients
#: ask for, so the clients choose how many there are.
MAX_TOKENS = 4096


class UpstreamFailure(Exception):
    """
    An upstream could not give a usable answer.

    :ivar upstream: the upstream's name.
    :ivar reason: ``"connect"``, ``"timeout"``, ``"status"``, ``"invalid"``.
    :ivar status: the HTTP status, when there was one.
    :ivar retry_after: seconds from ``Retry-After``, for a 429.
    :ivar credentials_refused: a token realm refused the credentials sent
        to it (a wrong password), not merely a repository.
    """

    credentials_refused = False

    def __init__(
        self,
        upstream: str,
        reason: str,
        detail: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"upstream {upstream}: {detail}")
        self.upstream = upstream
        self.reason = reason
        self.detail = detail
        self.status = status
        self.retry_after = retry_after


@frozen
class Challenge:
    """One ``WWW-Authenticate`` challenge."""

    scheme: str
    params: dict[str, str]


_PARAM = re.compile(
    r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*,?'
)
_SCHEME = re.compile(r"[\s,]*([A-Za-z][A-Za-z0-9_.-]*)(?=[\s,]|$)\s*")


def parse_challenges(header: str) -> list[Challenge]:
    """
    Parse a ``WWW-Authenticate`` header value into its challenges, e.g.
    ``Bearer realm="https://auth.example/token",service="x",scope="a,b"``.
    """
    challenges: list[Challenge] = []
    position = 0
    while position < len(header):
        scheme_match = _SCHEME.match(header, position)
        if scheme_match is None:
            break
        position = scheme_match.end()
        params: dict[str, str] = {}
        while position < len(header):
            param = _PARAM.match(header, position)
            if param is None:
                break
            name, quoted, token = param.groups()
            value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else token
            params[name.lower()] = value
            position = param.end()
        challenges.append(Challenge(scheme_match.group(1).lower(), params))
    return challenges


def retry_after(response: IResponse) -> float | None:
    """``Retry-After`` in seconds (delta form only), or ``None``."""
    values = response.headers.getRawHeaders(b"retry-after") or []
    for value in values:
        try:
            return max(0.0, float(value.decode("ascii").strip()))
        except (UnicodeDecodeError, ValueError):
            continue
    return None


@define(eq=False)
class Tokens:
    """
    Bearer tokens by scope, bounded in size and age: a token past its
    expiry is dropped when it is looked up or reaches the front of the
    line, and past *limit* tokens the oldest go first.  Tokens of one
    upstream share a lifetime as a rule, so the oldest is the first to
    expire.
    """

    clock: IReactorTime
    limit: int = MAX_TOKENS
    _entries: OrderedDict[str, tuple[str, float]] = field(factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def get(self, scope: str) -> str | None:
        """The token for *scope* while it is good, else ``None``."""
        entry = self._entries.get(scope)
        if entry is None:
            return None
        if self.clock.seconds() >= entry[1]:
            del self._entries[scope]
            return None
        return entry[0]

    def put(self, scope: str, token: str, expires: float) -> None:
        """Keep *token* for *scope* until *expires*, as the newest."""
        self._entries.pop(scope, None)
        self._entries[scope] = (token, expires)
        now = self.clock.seconds()
        while self._entries:
            oldest = next(iter(self._entries))
            if len(self._entries) <= self.limit and self._entries[oldest][1] > now:
                break
            del self._entries[oldest]


@define(eq=False)
class Upstream:
    """
    One registry endpoint.

    :ivar config: its configuration.
    :ivar agent: the ``IAgent`` (``treq.testing.RequestTraversalAgent`` in
        tests) that carries the connect timeout, TLS settings, proxy and the
        connection pool.
    :ivar clock: for timeouts, token lifetimes and back-off.
    :ivar rate_limit: the last ``(limit, remaining)`` pull quota the
        upstream announced (Docker Hub's ``RateLimit-*`` headers).
    :ivar health_record: the file where every process using it keeps this
        upstream's breaker and 429 back-off (``None``: this object keeps
        them in memory); see :class:`Breaker`.
    """

    config: UpstreamConfig
    agent: IAgent
    clock: IReactorTime
    rate_limit: tuple[int, int] | None = None
    #: hosts redirects and token realms may not lead to
    deny: tuple[Network | str, ...] = DEFAULT_DENY
    health_record: str | None = None
    #: tokens are reused this long at most, whatever the realm says
    #: (a client's own, passed through: not past ``access_check_ttl``)
    token_lifetime: float | None = None
    breaker: Breaker = field(init=False)
    _tokens: Tokens = field(init=False)
    _token_flight: SingleFlight[str, str] = field(factory=SingleFlight)
    #: the upstream asked for Basic credentials: send them up front
    _basic: bool = False
    log = Logger()

    def __attrs_post_init__(self) -> None:
        self.breaker = Breaker(
            self.clock,
            self.config.breaker_failures,
            self.config.breaker_backoff,
            record=self.health_record,
        )
        self._tokens = Tokens(self.clock)

    @property
    def name(self) -> str:
        return self.config.name

    async def read(self, response: IResponse, limit: int = MAX_SMALL_BODY) -> bytes:
        """
        Read a body that should be small (an error, a token, a manifest, a
        tag list) from this upstream.

        :raises ValueError: if it is over *limit* bytes, goes silent for
            ``idle_timeout``, or breaks off; the connection is closed then.
        """
        return await read_small(response, limit, self.clock, self.config.idle_timeout)

    async def drain(self, response: IResponse) -> None:
        """Read and drop a small body so the connection can be reused."""
        try:
            await self.read(response, 64 * 1024)
        except ValueError:
            pass

    async def recover(self) -> None:
        """
        While the breaker is open, ask ``/v2/`` once per ``breaker_backoff``
        (not the doubled back-off of client requests: this costs no client
        a failed attempt), by one process of all that share the breaker.
        Any answer but a 5xx, a 429 or a web page closes the breaker, so an
        upstream that came back is used again, and readiness returns, even
        while no client asks for anything (a load balancer sends none to a
        node it took out).  A failed look leaves the breaker as it is.
        """
        breaker = self.breaker
        if not breaker.look(self.config.breaker_backoff):
            return
        try:
            response = await self.request("GET", "")
        except UpstreamFailure as failure:
            self.log.debug(
                "upstream {upstream} still down: {why}",
                upstream=self.name,
                why=failure.detail,
            )
            return
        await self.drain(response)
        if response.code >= 500 or response.code == 429:
            return
        if "html" in (header(response, "Content-Type") or "").lower():
            return  # a portal's or a site's page: no registry answered
        if breaker.succeeded():
            self.log.info("upstream {upstream} is back", upstream=self.name)

    def backing_off(self) -> float | None:
        """Seconds left of a 429 back-off, or ``None``."""
        return self.breaker.backing_off()

    async def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        *,
        query: dict[str, str] | None = None,
    ) -> IResponse:
        """
        Send *method* to ``/v2/<path>`` and return the response once its
        headers are in; its body is not read.  Authentication challenges
        are answered once; redirects are followed.

        The upstream's ``prefix`` goes before *path* (``/v2/ghcr.io/org/app/
        ...``, the API root ``/v2/ghcr.io/``) and its ``ns`` into the query,
        in every request made here; the token scope is the repository so
        named, which a challenge's own scope overrides.

        :raises UpstreamFailure: when the upstream cannot be reached in time.
        """
        if self.config.prefix:
            path = f"{self.config.prefix}/{path}"
        if self.config.ns is not None:
            query = {"ns": self.config.ns, **(query or {})}
        url = f"{self.config.url}/v2/{path}"
        if query:
            url += "?" + urlencode(query)
        sent = dict(headers or {})
        scope = _scope_for(path)
        authorization = self._authorization(scope)
        if authorization is not None:
            sent["Authorization"] = authorization
        response = await self._send(method, url, sent)
        if response.code == 401 and self.config.token is None:
            retry = await self._answer_challenge(
                response, scope, sent.get("Authorization")
            )
            if retry is not None:
                sent["Authorization"] = retry
                response = await self._send(method, url, sent)
        self._observe(response)
        return await self._follow(method, url, headers or {}, response)

    def _authorization(self, scope: str) -> str | None:
        """What to send up front: a static or cached token, or Basic."""
        if self.config.token is not None:
            return f"Bearer {self.config.token.reveal()}"
        cached = self._tokens.get(scope)
        if cached is not None:
            return f"Bearer {cached}"
        if self._basic:
            return self._basic_credentials()
        return None

    @property
    def sends_basic(self) -> bool:
        """Does it send the configured account as Basic credentials (the
        upstream asked for them)?  A 401 then refuses that account."""
        return self._basic and self._basic_credentials() is not None

    def _basic_credentials(self) -> str | None:
        if self.config.username is None or self.config.password is None:
            return None
        pair = f"{self.config.username}:{self.config.password.reveal()}"
        return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")

    async def _answer_challenge(
        self, response: IResponse, scope: str, sent: str | None
    ) -> str | None:
        """The Authorization to retry with after a 401, or ``None``."""
        challenges = parse_challenges(header(response, "WWW-Authenticate") or "")
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None and "realm" in bearer.params:
            await self.drain(response)
            # A request sent before a concurrent one fetched a token: use it.
            fresh = self._authorization(scope)
            if fresh is not None and fresh.startswith("Bearer ") and fresh != sent:
                return fresh
            return f"Bearer {await self._token(bearer, scope)}"
        basic = self._basic_credentials()
        if basic is not None and any(c.scheme == "basic" for c in challenges):
            await self.drain(response)
            self._basic = True
            return basic
        return None

    def _observe(self, response: IResponse) -> None:
        """Record pull quotas and 429 back-offs."""
        limit = _quota(header(response, "RateLimit-Limit"))
        remaining = _quota(header(response, "RateLimit-Remaining"))
        if limit is not None and remaining is not None:
            if self.rate_limit != (limit, remaining):
                low = remaining * 5 < limit
                (self.log.warn if low else self.log.info)(
                    "upstream {upstream} pull quota: {remaining} of {limit} left",
                    upstream=self.name,
                    remaining=remaining,
                    limit=limit,
                )
            self.rate_limit = (limit, remaining)
        if response.code == 429:
            wait = retry_after(response)
            wait = DEFAULT_BACKOFF if wait is None else min(wait, MAX_BACKOFF)
            self.breaker.rate_limited(self.clock.seconds() + wait)
            self.log.warn(
                "upstream {upstream} is rate limiting (429): not asking it for {wait}s",
                upstream=self.name,
                wait=int(wait),
            )

    async def _follow(
        self, method: str, url: str, headers: dict[str, str], response: IResponse
    ) -> IResponse:
        """
        Follow redirects (blobs live on CDNs) by hand, a bounded number of
        times, sending only the request's own headers: never Authorization,
        whatever host the redirect names.  https targets only, unless the
        upstream itself is plain http.
        """
        for _ in range(MAX_REDIRECTS):
            location = header(response, "Location")
            if response.code not in REDIRECTS or not location:
                return response
            await self.drain(response)
            try:
                url = urljoin(url, location)
            except ValueError:  # an unclosed or bad IPv6 bracket
                raise UpstreamFailure(
                    self.name, "invalid", "redirected to a URL that cannot be parsed"
                ) from None
            allowed = (
                ("https", "http") if self.config.url.startswith("http:") else ("https",)
            )
            if urlsplit(url).scheme not in allowed:
                raise UpstreamFailure(
                    self.name, "invalid", "redirected to a scheme that is not allowed"
                )
            self._refuse_denied(url, "redirected")
            if response.code == 303:
                method = "GET"
            response = await self._send(method, url, headers)
        raise UpstreamFailure(
            self.name, "invalid", f"more than {MAX_REDIRECTS} redirects"
        )

    async def _send(self, method: str, url: str, headers: dict[str, str]) -> IResponse:
        # The agent itself, not treq's HTTPClient: that one would ask for
        # gzip and decompress bodies (blob digests are of the bytes as
        # served; a gzip bomb must not be inflated) and keep cookies.
        sent = Headers(
            {k.encode("latin-1"): [v.encode("latin-1")] for k, v in headers.items()}
        )
        sent.setRawHeaders(b"accept-encoding", [b"identity"])
        try:
            target = url.encode("ascii")
        except UnicodeEncodeError:
            raise UpstreamFailure(
                self.name, "invalid", "a URL that is not ASCII"
            ) from None
        try:
            d = self.agent.request(method.encode("ascii"), target, sent, None)
        except Exception as e:  # a URL the agent cannot even try
            raise UpstreamFailure(self.name, "invalid", _describe(e)) from None
        # The timeout cancels the request; once connected, the agent fails
        # it with ResponseNeverReceived (its reason a bare CancelledError),
        # not the CancelledError addTimeout would turn into a TimeoutError.
        timed_out = False

        def timeout(result: object, seconds: float) -> object:
            nonlocal timed_out
            timed_out = True
            return result

        d.addTimeout(self.config.response_timeout, self.clock, timeout)
        try:
            response: IResponse = await d
        except Exception as e:
            if timed_out:
                raise UpstreamFailure(
                    self.name,
                    "timeout",
                    f"no response within {self.config.response_timeout:g}s",
                ) from None
            if _cancelled(e):
                # Cancelled from outside (a client gone): no upstream fault.
                raise CancelledError() from None
            if isinstance(e, ConnectError | ConnectingCancelledError | DNSLookupError):
                raise UpstreamFailure(self.name, "connect", _describe(e)) from None
            if isinstance(e, ResponseFailed | ResponseNeverReceived):
                raise UpstreamFailure(self.name, "connect", _describe(e)) from None
            # e.g. SchemeNotSupported, a malformed URI
            raise UpstreamFailure(self.name, "invalid", _describe(e)) from None
        return response

    def _refuse_denied(self, url: str, how: str, listed: tuple[str, ...] = ()) -> None:
        """
        :raises UpstreamFailure: when *url*'s host is on the deny list
            (loopback, private networks, cloud metadata services and the
            like, however the address is spelled), unless it is the
            upstream's own host or among *listed*: an upstream may not send
            the mirror anywhere else on its own machine or networks.
        """
        try:
            host = (urlsplit(url).hostname or "").lower().rstrip(".")
        except ValueError:
            raise UpstreamFailure(self.name, "invalid", f"{how} to a bad URL") from None
        if host in listed or same_host(host, self.config.host):
            return
        if is_denied(host, self.deny):
            self.log.warn(
                "upstream {upstream} {how} to a denied host {host}",
                upstream=self.name,
                how=how,
                host=host,
            )
            raise UpstreamFailure(self.name, "invalid", f"{how} to a denied host")

    def _may_receive_credentials(self, realm_host: str) -> bool:
        """Credentials go only to the upstream's own site or allowed realms."""
        return realm_host.lower() in self.config.token_realms or same_site(
            realm_host, self.config.host
        )

    async def _token(self, challenge: Challenge, scope: str) -> str:
        """A token for *scope* from the challenge's realm, shared by a burst."""

        async def fetch() -> str:
            return await self._fetch_token(challenge, scope)

        token: str = await self._token_flight.run(scope, fetch)
        return token

    async def _fetch_token(self, challenge: Challenge, scope: str) -> str:
        realm = challenge.params["realm"]
        try:
            scheme = urlsplit(realm).scheme
        except ValueError:  # an unclosed or bad IPv6 bracket
            scheme = ""
        if scheme not in ("http", "https"):
            raise UpstreamFailure(
                self.name, "invalid", "token realm is not an http(s) URL"
            )
        if scheme == "http" and urlsplit(self.config.url).scheme == "https":
            # Credentials, and the token itself, would travel in clear.
            self.log.warn(
                "upstream {upstream}: its token realm on {realm} is plain http; "
                "refused (an https upstream gets tokens over https only)",
                upstream=self.name,
                realm=urlsplit(realm).hostname,
            )
            raise UpstreamFailure(self.name, "invalid", "token realm is plain http")
        self._refuse_denied(realm, "sent for a token", self.config.token_realms)
        query = {"service": challenge.params.get("service", "")}
        query["scope"] = challenge.params.get("scope", scope)
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = {}
        credentials = self._basic_credentials()
        if credentials is not None:
            if self._may_receive_credentials(urlsplit(realm).hostname or ""):
                headers["Authorization"] = credentials
            else:
                self.log.warn(
                    "upstream {upstream}: token realm {realm} is outside its domain; "
                    "asking it for an anonymous token (see token_realms)",
                    upstream=self.name,
                    realm=urlsplit(realm).hostname,
                )
        response = await self._send("GET", url, headers)
        try:
            body = await self.read(response, 64 * 1024)
            document = load_json(body)
            token = document.get("token") or document.get("access_token")
            lifetime = float(document.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
            if self.token_lifetime is not None:
                lifetime = min(lifetime, self.token_lifetime + TOKEN_MARGIN)
        except (ValueError, AttributeError, TypeError):
            raise UpstreamFailure(
                self.name,
                "invalid",
                f"unusable token answer (status {response.code})",
                status=response.code,
            ) from None
        if response.code != 200 or not isinstance(token, str):
            failure = UpstreamFailure(
                self.name,
                "status",
                f"token realm answered {response.code}",
                status=response.code,
            )
            sent = "Authorization" in headers
            failure.credentials_refused = sent and response.code in (401, 403)
            raise failure
        expires = self.clock.seconds() + max(0.0, lifetime - TOKEN_MARGIN)
        self._tokens.put(scope, token, expires)
        return token


def _quota(value: str | None) -> int | None:
    """``76;w=21600`` → 76."""
    if not value:
        return None
    head = value.split(";", 1)[0].strip()
    # isascii: isdigit takes other scripts' digits (²), which int() refuses.
    return int(head) if head.isascii() and head.isdigit() else None


def _scope_for(path: str) -> str:
    """The token scope for a ``/v2/`` path: pulling its repository."""
    parts = path.split("/")
    for marker in ("manifests", "blobs", "tags", "referrers"):
        if marker in parts[1:]:
            index = len(parts) - 1 - parts[::-1].index(marker)
            return f"repository:{'/'.join(parts[:index])}:pull"
    return ""


def _cancelled(error: BaseException) -> bool:
    """Did *error* come of the request being cancelled?"""
    if isinstance(error, CancelledError | ConnectingCancelledError):
        return True
    if isinstance(error, ResponseFailed | ResponseNeverReceived):
        return any(r.check(CancelledError) for r in error.reasons)
    return False


def _describe(error: BaseException) -> str:
    if isinstance(error, ResponseFailed | ResponseNeverReceived):
        reasons = ", ".join(r.getErrorMessage() for r in error.reasons)
        return f"connection failed: {reasons}"
    return f"cannot connect: {error.__class__.__name__}: {error}"
