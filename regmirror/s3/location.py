"""
Where the shared objects live (endpoint, bucket, region, addressing) and
the credentials for them, validated when built.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from attrs import field, frozen

from regmirror.config import Secret

#: The port a URL of each scheme means when it names none.
DEFAULT_PORTS = {"http": 80, "https": 443}


def _endpoint(instance: Any, attribute: Any, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"S3 endpoint must be an http(s) URL, not {value!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("S3 endpoint takes no query, fragment or user info")
    parts.port  # noqa: B018 -- raises ValueError for a bad port


def _bucket(instance: Any, attribute: Any, value: str) -> None:
    if not value or any(c in value for c in "/?#% \t\r\n"):
        raise ValueError(f"invalid S3 bucket name {value!r}")


def _addressing(instance: S3Location, attribute: Any, value: str) -> None:
    if value not in ("path", "virtual"):
        raise ValueError(f"S3 addressing must be 'path' or 'virtual', not {value!r}")
    if value == "virtual":
        host = urlsplit(instance.endpoint).hostname or ""
        if ":" in host or host.replace(".", "").isdigit():
            raise ValueError("virtual addressing needs an endpoint host name")
        if instance.bucket != instance.bucket.lower() or "_" in instance.bucket:
            raise ValueError(
                f"bucket {instance.bucket!r} cannot be a host name: use path addressing"
            )


def _region(instance: Any, attribute: Any, value: str) -> None:
    if not value or "/" in value or value != value.strip():
        raise ValueError(f"invalid S3 region {value!r}")


@frozen
class S3Location:
    """
    Where the shared objects live, and the credentials for them.

    :ivar endpoint: ``http://127.0.0.1:7480``, ``https://s3.eu-west-1.amazonaws.com``;
        a path after the host is kept as a prefix.
    :ivar addressing: ``"path"`` (``endpoint/bucket/key``) or ``"virtual"``
        (``bucket.host/key``).
    """

    endpoint: str = field(validator=_endpoint)
    bucket: str = field(validator=_bucket)
    region: str = field(validator=_region)
    access_key: Secret
    secret_key: Secret
    addressing: str = field(default="path", validator=_addressing)
