"""
Domain errors, each carrying the OCI error code and HTTP status it maps to.

Every part raises these; :mod:`regmirror.http.errors` turns them into the OCI error
body (``{"errors": [{"code": …, "message": …}]}``) in one place.
"""

from __future__ import annotations

import json


class RegistryError(Exception):
    """
    An error a client should see as an OCI error body.

    :ivar code: the OCI error code, e.g. ``"NAME_INVALID"``.
    :ivar status: the HTTP status to answer with.
    :ivar message: a human-readable message: never holds a secret.
    :ivar headers: extra response headers (e.g. ``Retry-After``).
    """

    code = "UNKNOWN"
    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        """The OCI error body for this error."""
        document = {"errors": [{"code": self.code, "message": self.message}]}
        return json.dumps(document).encode("utf-8")


class NameInvalid(RegistryError):
    code = "NAME_INVALID"
    status = 400


class NameUnknown(RegistryError):
    code = "NAME_UNKNOWN"
    status = 404


class ManifestUnknown(RegistryError):
    code = "MANIFEST_UNKNOWN"
    status = 404


class ManifestInvalid(RegistryError):
    code = "MANIFEST_INVALID"
    status = 400


class BlobUnknown(RegistryError):
    code = "BLOB_UNKNOWN"
    status = 404


class DigestInvalid(RegistryError):
    code = "DIGEST_INVALID"
    status = 400


class TagInvalid(RegistryError):
    # Not in the OCI spec's table; the code distribution uses for a tag
    # that breaks the grammar.
    code = "TAG_INVALID"
    status = 400


class PaginationInvalid(RegistryError):
    code = "PAGINATION_NUMBER_INVALID"
    status = 400


class RangeInvalid(RegistryError):
    code = "RANGE_INVALID"
    status = 416


class Unsupported(RegistryError):
    code = "UNSUPPORTED"
    status = 405


class BadRequest(RegistryError):
    """
    A request no honest client sends, such as a header that may appear only
    once (``Host``, ``Authorization``) on several lines.  The spec has no
    code for it; ``UNSUPPORTED`` is what the connection answers malformed
    requests with too.
    """

    code = "UNSUPPORTED"
    status = 400


class NotFound(RegistryError):
    """A path that is not part of the API at all."""

    code = "NOT_FOUND"
    status = 404


class Unauthorized(RegistryError):
    code = "UNAUTHORIZED"
    status = 401


class Denied(RegistryError):
    code = "DENIED"
    status = 403


class TooManyRequests(RegistryError):
    code = "TOOMANYREQUESTS"
    status = 429


class UpstreamUnavailable(RegistryError):
    """No upstream could answer: every one failed or was unreachable."""

    code = "UNAVAILABLE"
    status = 503


class UpstreamBadGateway(RegistryError):
    """An upstream answered, but with something unusable."""

    code = "UNAVAILABLE"
    status = 502


class UpstreamTimeout(RegistryError):
    code = "UNAVAILABLE"
    status = 504


class UpstreamRefusedCredentials(RegistryError):
    """
    An upstream answered 401 to the mirror: it wants credentials the mirror
    has not got, or refused those it has.  Not a 401 to the client, which
    would ask it for credentials it cannot have (its own are the
    mirror's, and none goes upstream): a bad gateway, named as such.
    """

    code = "UNAUTHORIZED"
    status = 502


class AccessRefused(RegistryError):
    """
    The upstream refused a client's own credentials (``credentials =
    passthrough``) this repository: its answer about the client, which the
    web layer turns into the client's challenge (401) or ``DENIED`` (403).

    :ivar credentials_refused: the token realm refused the credentials
        themselves (a wrong password), not just this repository.
    """

    def __init__(self, status: int, credentials_refused: bool = False) -> None:
        super().__init__(f"the upstream registry answered {status}")
        self.status = status
        self.code = "DENIED" if status == 403 else "UNAUTHORIZED"
        self.credentials_refused = credentials_refused


class DownloadFailed(UpstreamBadGateway):
    """An upstream transfer broke, or delivered bytes that fail their digest."""
