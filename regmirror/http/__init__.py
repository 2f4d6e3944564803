"""
The HTTP face of the mirror: the hardened connection, the site and its
access log, and the twisted.web resources of the pull side of the OCI
distribution API.
"""

__all__ = ["channel", "resource", "site"]
