"""``/token``: the registry token endpoint."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET, Request

from regmirror.access.gate import Gate
from regmirror.errors import AccessRefused, RegistryError, Unauthorized
from regmirror.http.errors import write_error
from regmirror.http.request import (
    ns,
    refuse_malformed_head,
    route_request,
    start_info,
    text_header,
)
from regmirror.http.resource import ReadOnlyResource
from regmirror.passthrough import Credentials, Passthrough, seal
from regmirror.routing import Route, Router

__all__ = ["TokenResource"]


class TokenResource(ReadOnlyResource):
    """
    ``/token``: the registry token endpoint.  A Basic login gets a token for
    the repositories named in its ``scope`` parameters, an anonymous client
    one for those of them its address may pull anyway.  Each scope's name
    is routed with this request's ``ns`` and ``Host`` by the router that
    routes pulls, and the token names the namespace so decided: it is good
    for that namespace only, however the pull is routed.

    Basic credentials asked for scopes that are all in namespaces with
    ``credentials = passthrough`` (or for no scope, as ``docker login``
    asks, when the mirror has no users of its own) are the client's own
    for the upstream: they are sealed into the token (``own``), which
    grants those scopes, so that the client's pulls carry them to
    whichever process.  First the upstream is asked whether it takes them
    at all (:meth:`regmirror.passthrough.Passthrough.verify`), for each
    namespace of the scopes, or, without a scope, for the namespace the
    request itself routes to by ``ns`` or ``Host``, or the only one that
    passes credentials through: a wrong password is refused here (a
    failed login), so that ``docker login`` says so.  Whether they may
    read a repository is still asked at each pull.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self, gate: Gate, router: Router, passthrough: Passthrough | None = None
    ) -> None:
        super().__init__()
        self._gate = gate
        self._router = router
        self._passthrough = passthrough

    def render_GET(self, request: Request) -> Any:
        d = Deferred.fromCoroutine(self._issue(request))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    async def _issue(self, request: Request) -> None:
        gate = self._gate
        # For the access line: who logged in, and how long it took.
        info = start_info(request, gate.clock.seconds())
        info.endpoint = "token"
        try:
            refuse_malformed_head(request)
            ns(request)
            address = gate.client(request)
            scheme, _, credentials = (
                text_header(request, "Authorization") or ""
            ).partition(" ")
            routes = []
            for value in request.args.get(b"scope", []):
                for scope in value.decode("utf-8", "replace").split(" "):
                    kind, _, rest = scope.partition(":")
                    name, _, actions = rest.rpartition(":")
                    if kind == "repository" and "pull" in actions.split(","):
                        try:
                            routes.append(route_request(self._router, request, name))
                        except RegistryError:
                            continue  # a name no pull could use: no grant
            own = None
            if scheme.lower() == "basic" and gate.passthrough:
                own = Credentials.from_basic(credentials)
            passing = [r for r in routes if r.namespace.name in gate.passthrough]
            if (
                own is not None
                and len(passing) == len(routes)
                and (routes or not gate.has_users)
            ):
                await self._verify(request, own, passing)
                grants = [(r.namespace.name, r.repository) for r in passing]
                sealed = seal(gate.tokens.key, own)
                token, expires = gate.tokens.issue("passthrough", grants, sealed)
                info.user = "passthrough"
                self._answer(request, token, expires)
                return
            user: str | None = None
            if scheme.lower() == "basic" and credentials:
                user = await gate.login(address, credentials.strip())
                if user is None:
                    raise Unauthorized(
                        "wrong user name or password",
                        {"WWW-Authenticate": 'Basic realm="regmirror"'},
                    )
                info.user = user
            # Anonymous clients (the Docker daemon through registry-mirrors)
            # get a token for what their address may pull anyway, as Docker
            # Hub gives anonymous tokens.
            grants = gate.grantable(address, user, routes)
            token, expires = gate.tokens.issue(user, grants)
        except RegistryError as error:
            if not request.finished:
                write_error(request, error)
            return
        except CancelledError:
            return  # the client went away
        except Exception:
            self.log.failure("cannot issue a token")
            if not request.finished:
                write_error(request, RegistryError("internal error"))
            return
        self._answer(request, token, expires)

    async def _verify(
        self, request: Request, own: Credentials, routes: list[Route]
    ) -> None:
        """
        Ask the upstreams whether they take *own* (see the class).

        :raises Unauthorized: one refused them (a failed login).
        :raises TooManyRequests: the client failed too often.
        """
        if self._passthrough is None:
            return
        gate = self._gate
        if not routes:
            try:
                # The namespace a pull of a bare name would go to.
                login = route_request(self._router, request, "login/check")
            except RegistryError:
                return
            if login.via in ("ns", "host") or len(gate.passthrough) == 1:
                routes = [login] if login.namespace.name in gate.passthrough else []
        gate.throttle(request)
        checked = set()
        for route in routes:
            if route.namespace.name in checked:
                continue
            checked.add(route.namespace.name)
            identity = self._passthrough.identity(
                route.pool, own, route.namespace.access_check_ttl
            )
            try:
                await self._passthrough.verify(identity, route.namespace)
            except AccessRefused:
                gate.failed_passthrough_login(request)
                raise Unauthorized(
                    f"{route.namespace.name}: the upstream registry refused "
                    "these credentials",
                    {"WWW-Authenticate": 'Basic realm="regmirror"'},
                ) from None

    def _answer(self, request: Request, token: str, expires: float) -> None:
        gate = self._gate
        body = json.dumps(
            {
                "token": token,
                "access_token": token,
                "expires_in": int(gate.config.token_ttl),
                "issued_at": datetime.fromtimestamp(
                    expires - gate.config.token_ttl, UTC
                ).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        ).encode()
        request.setHeader("Content-Type", "application/json")
        request.setHeader("Cache-Control", "no-store")
        request.write(body)
        request.finish()
