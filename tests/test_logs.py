"""
The JSON log (``twistd --logger regmirror.logs.json_lines``) as a log
shipper reads it: one compact object per event, its message rendered, its
fields JSON values, and the events of worker processes the same.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from datetime import UTC, datetime
from typing import Any

from twisted.logger import (
    LogEvent,
    Logger,
    eventAsText,
    eventFromJSON,
    globalLogPublisher,
)
from twisted.python import log as legacy

from regmirror.config import Secret
from regmirror.http.site import ACCESS_FORMAT
from regmirror.logs import json_lines, worker_lines


def written(out: io.StringIO) -> list[dict[str, Any]]:
    text = out.getvalue()
    assert text.endswith("\n"), text
    return [json.loads(line) for line in text.splitlines()]


def observed(*emit: Any) -> tuple[list[dict[str, Any]], list[LogEvent]]:
    """The JSON records, and the events, of what *emit* logs, as
    ``json_lines()`` writes them on standard output."""
    out = io.StringIO()
    events: list[LogEvent] = []
    with redirect_stdout(out):
        observer = json_lines()
    for each in (observer, events.append):
        globalLogPublisher.addObserver(each)
    try:
        for call in emit:
            call()
    finally:
        for each in (observer, events.append):
            globalLogPublisher.removeObserver(each)
    return written(out), events


log = Logger(namespace="regmirror.service")


def text_of(event: LogEvent) -> str:
    """What the text log (twistd's ``--logfile``) says of *event*, after
    its time and ``[namespace#level]``."""
    return eventAsText(event, includeTimestamp=False, includeSystem=False)


def test_an_error_reason_is_its_text_and_the_message_is_rendered() -> None:
    """
    The certificate reload error logged its reason (an exception) as
    ``{"unpersistable": true}`` and the message only as its format,
    ``{why}`` unfilled.  The record has ``message`` as the text log has it,
    ``why`` as the exception's text, ``level`` and ``logger``, and none of
    Twisted's ``log_*`` keys.
    """
    records, events = observed(
        lambda: log.error(
            "certificate not reloaded, keeping the old one: {why}",
            why=ValueError("no PEM data in cert.pem"),
        )
    )
    [record] = records
    [event] = events
    assert record == {
        "time": record["time"],
        "level": "error",
        "logger": "regmirror.service",
        "message": "certificate not reloaded, keeping the old one: "
        "no PEM data in cert.pem",
        "why": "no PEM data in cert.pem",
    }
    assert record["message"] == text_of(event)
    when = datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
    assert record["time"].endswith("Z") and when.tzinfo == UTC
    assert abs(when.timestamp() - event["log_time"]) < 0.001


def test_an_access_line_is_its_fields_and_its_text_in_a_compact_line() -> None:
    """
    An access line was about 1.5 KB: every field twice (itself and in
    ``log_flattened``) and Twisted's objects' clutter.  Its record holds the
    line's text and each field once, as the value logged (numbers as
    numbers), in one compact line.
    """
    access = Logger(namespace="regmirror.access")
    fields: dict[str, Any] = {
        "client": "127.0.0.1",
        "user": "-",
        "method": "GET",
        "uri": "/v2/library/busybox/blobs/sha256:" + "a" * 64,
        "protocol": "HTTP/1.1",
        "status": 200,
        "bytes": 2155,
        "referrer": "-",
        "agent": "containerd/1.7.24",
        "namespace": "docker.io",
        "cache": "hit",
        "upstream": "-",
        "duration": 0.004,
        "aborted": False,
    }
    records, events = observed(lambda: access.info(ACCESS_FORMAT, **fields))
    [record] = records
    assert record.pop("message") == text_of(events[0])
    assert (record.pop("logger"), record.pop("level")) == ("regmirror.access", "info")
    record.pop("time")
    assert record == fields
    [line] = json_lines_text(events[0]).splitlines()
    assert len(line) < 700, line


def json_lines_text(event: LogEvent) -> str:
    out = io.StringIO()
    json_lines(out)(event)
    return out.getvalue()


def test_a_failure_has_its_traceback_and_a_secret_stays_hidden() -> None:
    """A failure's record has its ``traceback``; a field holding a
    :class:`Secret` shows what the text log shows, never the secret."""

    def fail() -> None:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("reload of {what} failed", what=Secret("hunter2"))

    records, _ = observed(fail)
    [record] = records
    assert record["message"] == "reload of Secret(***) failed"
    assert record["what"] == "Secret(***)"
    assert "ZeroDivisionError" in record["traceback"]
    assert "1 / 0" in record["traceback"]
    assert "hunter2" not in json.dumps(record)
    assert not [key for key in record if key.startswith("log_")]


def test_legacy_events_have_no_legacy_clutter() -> None:
    """An event of ``twisted.python.log`` (Twisted's own, older modules)
    has the same keys as any other: no ``isError``, ``system`` ``-``,
    ``message`` tuple or ``log_text``."""
    records, _ = observed(lambda: legacy.msg("Starting factory <x>"))
    [record] = records
    assert set(record) == {"time", "level", "logger", "message"}
    assert record["message"] == "Starting factory <x>"


def test_a_workers_event_reaches_the_json_log_as_the_parents_own() -> None:
    """
    A worker process writes its events as JSON lines to the parent, which
    reads them back (``eventFromJSON``) and publishes them with a
    ``worker`` field.  Its fields that are no JSON (an exception) arrived
    as ``{"unpersistable": true}``: they arrive as their text, the message
    rendered, a failure with its traceback, and the record is as clean as
    the parent's own.
    """
    channel = io.StringIO()
    worker = Logger(namespace="regmirror.service", observer=worker_lines(channel))
    worker.error(
        "certificate not reloaded, keeping the old one: {why!r}",
        why=ValueError("no PEM"),
    )
    try:
        raise KeyError("missing")
    except KeyError:
        worker.failure("worker {pid} could not {what}", pid=7, what=b"serve {x}")
    parsed = []
    for line in channel.getvalue().splitlines():
        event = eventFromJSON(line)
        event["worker"] = 1  # as regmirror.workers publishes it
        parsed.append(event)

    def publish() -> None:
        for event in parsed:
            globalLogPublisher(event)

    records, events = observed(publish)
    reloaded, failed = records
    assert reloaded == {
        "time": reloaded["time"],
        "level": "error",
        "logger": "regmirror.service",
        "message": "certificate not reloaded, keeping the old one: "
        "ValueError('no PEM')",
        "why": "no PEM",
        "worker": 1,
    }
    assert reloaded["message"] == text_of(events[0]).splitlines()[0]
    assert failed["message"] == "worker 7 could not b'serve {x}'"
    assert (failed["pid"], failed["what"], failed["worker"]) == (7, "serve {x}", 1)
    assert "KeyError" in failed["traceback"]
    assert not [key for key in failed if key.startswith("log_")]
