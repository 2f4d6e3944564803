"""
JSON lines for log shippers.

``twistd --logger regmirror.logs.json_lines regmirror -c …`` writes every
event, access-log lines included (:mod:`regmirror.http.site`), as one JSON
object per line on standard output, with its structured fields (namespace,
cache, upstream, bytes, duration, client) as keys.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver

__all__ = ["json_lines"]


def json_lines() -> ILogObserver:
    """An observer writing JSON lines to standard output (for ``--logger``)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
