"""
JSON lines for log shippers.

``twistd --logger regmirror.logs.json_lines regmirror -c …`` writes every
event, access-log lines included (:mod:`regmirror.http.site`), as one
compact JSON object per line on standard output: ``time`` (ISO 8601, UTC),
``level``, ``logger`` (the event's namespace: ``namespace`` is the registry
namespace of the events that have one), ``message`` (the text the text log
shows), the event's own fields as JSON values (anything else as its text),
``traceback`` for a failure.

Worker processes send their events to the parent as Twisted's JSON
(:func:`worker_lines`, read back with ``eventFromJSON`` in
:mod:`regmirror.workers`); their fields are made JSON values there, before
the worker's own objects are out of reach.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["json_line", "json_lines", "worker_lines"]

#: What ``twisted.python.log`` adds to an event, for its own observers:
#: copies of what the line's fixed keys already say.
_LEGACY = frozenset({"message", "time", "system", "format", "isError", "failure"})
#: Nesting deeper than this is written as text.
_DEPTH = 8


def json_lines(out: IO[str] | None = None) -> ILogObserver:
    """An observer writing JSON lines to *out*, standard output by default
    (for ``--logger``)."""
    return FileLogObserver(sys.stdout if out is None else out, json_line)


def json_line(event: LogEvent) -> str:
    """*event* as one line of the operator's JSON log, with its newline."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _timestamp(event.get("log_time")),
        "level": getattr(level, "name", "info"),
        "logger": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    system = event.get("log_system")
    if system not in (None, "-"):
        record["system"] = str(system)
    for name, value in event.items():
        # The fixed keys above win: no field of ours is named so.
        if _own(name) and name not in record:
            record[name] = jsonable(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = _traceback(failure)
    return json.dumps(record, separators=(",", ":")) + "\n"


@implementer(ILogObserver)
class _Portable:
    """Twisted's JSON observer, given events whose fields are JSON values."""

    def __init__(self, out: IO[str]) -> None:
        self._observer = jsonFileLogObserver(out, recordSeparator="")

    def __call__(self, event: LogEvent) -> None:
        portable = {
            name: jsonable(value) if _own(name) else value
            for name, value in event.items()
        }
        # The message rendered from the objects themselves (a repr stays a
        # repr), as a format that renders to itself.
        message = formatEvent(event)
        portable["log_format"] = message.replace("{", "{{").replace("}", "}}")
        self._observer(portable)


def worker_lines(out: IO[str]) -> ILogObserver:
    """
    The observer of a worker process, writing its events to the parent on
    *out*: Twisted's JSON lines (``eventFromJSON`` reads them back, failures
    whole), each field a JSON value, an object its text, where Twisted's
    would write ``{"unpersistable": true}``; the message is rendered here,
    from the objects themselves.
    """
    return _Portable(out)


def jsonable(value: object, depth: int = 0) -> object:
    """
    *value* as a JSON value: strings, numbers, booleans, ``None``, lists
    and objects of them as they are; anything else (an exception, a
    failure, bytes, an object) as its text.  A :class:`~regmirror.config.Secret`
    is ``Secret(***)``, as in the text log.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < _DEPTH:
        if isinstance(value, (list, tuple)):
            return [jsonable(item, depth + 1) for item in value]
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return {k: jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, Failure):
        return value.getErrorMessage()
    try:
        if isinstance(value, BaseException):
            return str(value) or type(value).__name__
        return str(value)
    except Exception:
        return f"<{type(value).__name__}>"


def _own(name: str) -> bool:
    """Whether *name* is a field of the event's own, not Twisted's."""
    return not name.startswith("log_") and name not in _LEGACY


def _timestamp(when: object) -> str | None:
    if not isinstance(when, (int, float)):
        return None
    moment = datetime.fromtimestamp(when, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _traceback(failure: Any) -> str:
    try:
        return str(failure.getTraceback())
    except Exception as e:
        return f"(no traceback: {e})"
