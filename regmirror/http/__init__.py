"""
The HTTP face of the mirror: the hardened connection (``channel``), the
site and its access log (``site``), the per-request state (``request``),
the one mapping of domain errors to answers (``errors``), and the
twisted.web resources: ``/v2/`` (``api``, with ``blobs`` and ``listing``),
``/token`` (``token``), the root and health probes (``health``), and the
read-only base the other resources share (``resource``).
"""

__all__ = [
    "api",
    "blobs",
    "channel",
    "errors",
    "health",
    "listing",
    "request",
    "resource",
    "site",
    "token",
]
