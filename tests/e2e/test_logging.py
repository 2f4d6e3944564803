"""Logs as an operator reads them: the access log, JSON lines, no secrets."""

from __future__ import annotations

import http.client
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    free_port,
    http_request,
    json_lines,
    mirror_config,
    poll_until,
    responds_ok,
    stop_process,
)
from .images import MANIFEST_ACCEPT, Catalog
from .servers import ThrottleRelay, write_certificate
from .test_access import stopped, workers_of

pytestmark = pytest.mark.e2e

SECRET = "hunter2-never-logged"
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"


@pytest.fixture
def json_mirror(
    tmp_path: Path, upstream: RegistryProcess
) -> Iterator[tuple[int, Path]]:
    """A mirror logging JSON lines to its standard output, with an upstream
    password in its configuration (the registry ignores it)."""
    port = free_port()
    config = mirror_config(port, upstream.url).replace(
        "idle_timeout = 10s",
        f"idle_timeout = 10s\nusername = alice\npassword = {SECRET}",
    )
    (tmp_path / "mirror.ini").write_text(config)
    output = tmp_path / "out.jsonl"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                TWISTD,
                "--nodaemon",
                "--pidfile=",
                "--logger=regmirror.logs.json_lines",
                "regmirror",
                "-c",
                str(tmp_path / "mirror.ini"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        try:
            poll_until(
                lambda: responds_ok(port),
                timeout=15,
                describe=lambda: output.read_text(errors="replace"),
            )
            yield port, output
        finally:
            stop_process(process)


def test_json_access_log_lines_without_secrets(
    json_mirror: tuple[int, Path], catalog: Catalog
) -> None:
    """With ``--logger regmirror.logs.json_lines`` every line is JSON; each
    request has an access event with namespace, cache status, upstream,
    bytes, duration and client; the configured password appears nowhere."""
    port, output = json_mirror
    image = catalog.small
    layer = image.layers[0].digest
    path = f"/v2/{image.repository}/blobs/{layer}"
    assert http_request(port, "GET", path).status == 200
    assert http_request(port, "GET", path).status == 200

    def logged() -> list[dict[str, object]]:
        return [
            e
            for e in json_lines(output)
            if e.get("logger") == "regmirror.access" and e.get("uri") == path
        ]

    poll_until(
        lambda: len(logged()) == 2, timeout=10, describe=lambda: output.read_text()
    )
    first, second = logged()
    assert (first["cache"], first["upstream"]) == ("miss", "origin")
    assert (second["cache"], second["upstream"]) == ("hit", "-")
    assert first["namespace"] == "docker.io" and first["status"] == 200
    assert first["bytes"] == image.layers[0].size
    assert first["client"] == LOCALHOST
    assert isinstance(first["duration"], float)
    assert SECRET not in output.read_text()


def test_json_lines_say_why_of_every_process_and_log_scrapes_as_access_lines(
    tmp_path: Path, start_mirror: StartMirror
) -> None:
    """
    What an operator's review found in the JSON log: a certificate that
    does not reload was logged with ``"why": {"unpersistable": true}`` and
    its message unrendered (``{why}``), by the parent and by each worker;
    every line carried Twisted's ``log_*`` clutter; a scrape of
    ``metrics_listen`` was an unstructured ``log_io`` string.  With
    ``workers = 2``, a certificate broken and SIGHUP: the parent's line and
    the worker's (with ``worker``: 0) each have the rendered ``message`` and
    ``why`` as text; a scrape has an access line with its fields; every
    line is one compact JSON object with ``time``, ``level``, ``logger``
    and ``message``, and no ``log_*`` key.
    """
    secure, scrapes = free_port(), free_port()
    write_certificate(tmp_path / "tls")
    pem = {n: (tmp_path / "tls" / n).read_bytes() for n in ("key.pem", "cert.pem")}
    mirror = start_mirror(
        lambda port: mirror_config(port, "http://127.0.0.1:9").replace(
            f"listen = tcp:{port}:interface={LOCALHOST}",
            "workers = 2\n"
            f"listen = tcp:{port}:interface={LOCALHOST}\n"
            f"    ssl:{secure}:privateKey=key.pem:certKey=cert.pem"
            f":interface={LOCALHOST}\n"
            f"metrics_listen = tcp:{scrapes}:interface={LOCALHOST}",
        ),
        files=pem,
        logger="regmirror.logs.json_lines",
    )

    def records() -> list[dict[str, Any]]:
        return json_lines(mirror.output_path)

    def said(start: str) -> list[dict[str, Any]]:
        return [r for r in records() if str(r.get("message")).startswith(start)]

    poll_until(lambda: bool(said("worker ")), timeout=15, describe=mirror.log)
    (mirror.workdir / "cert.pem").write_text("not a certificate\n")
    assert mirror._process is not None
    mirror._process.send_signal(signal.SIGHUP)
    refused = "certificate not reloaded, keeping the old one: "
    poll_until(lambda: len(said(refused)) == 2, timeout=15, describe=mirror.log)
    parent, worker = sorted(said(refused), key=lambda r: "worker" in r)
    for record in parent, worker:
        assert isinstance(record["why"], str) and record["why"], record
        assert record["message"] == refused + record["why"], record
        assert (record["level"], record["logger"]) == ("error", "regmirror.service")
    assert "worker" not in parent and worker["worker"] == 0, (parent, worker)

    assert http_request(scrapes, "GET", "/metrics").status == 200

    def scraped() -> list[dict[str, Any]]:
        return [
            r
            for r in records()
            if r.get("logger") == "regmirror.access" and r.get("uri") == "/metrics"
        ]

    poll_until(lambda: bool(scraped()), timeout=10, describe=mirror.log)
    [scrape] = scraped()
    assert (scrape["client"], scrape["method"], scrape["status"]) == (
        LOCALHOST,
        "GET",
        200,
    )
    assert f'"GET /metrics HTTP/1.1" 200 {scrape["bytes"]} ' in scrape["message"]
    lines = mirror.output_path.read_text().splitlines()
    assert len(lines) == len(records())  # every line one JSON object
    for record in records():
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert not [key for key in record if key.startswith("log_")], record
        assert record["logger"] != "twisted.python.log", record
    assert max(len(line) for line in lines) < 1500, max(lines, key=len)


# -- what a fresh-eyes review found ---------------------------------------------

#: a request whose request line, User-Agent and Referer carry control bytes
#: (ESC sequences that recolour or clear a terminal; the C1 CSI, which
#: some terminals take for ESC [; DEL), a quote, a backslash and a byte
#: that is no UTF-8 (twisted.web refuses C0 controls in the request line)
HOSTILE_REQUEST = (
    b"GET /v2/retitled\x9b2J\x7f/manifests/latest HTTP/1.1\r\n"
    b"Host: mirror.test\r\n"
    b'User-Agent: ua\x1b[31mred\x1b[0m "quoted" back\\slash \x9b2J\xff\r\n'
    b"Referer: ref\x1b[2J\r\n"
    b"Connection: close\r\n\r\n"
)
#: the same fields as the access line shows them
ESCAPED_AGENT = r"ua\x1B[31mred\x1B[0m \x22quoted\x22 back\x5Cslash \x9B2J\xFF"
ESCAPED_URI = r"/v2/retitled\x9B2J\x7F/manifests/latest"
ESCAPED_REFERRER = r"ref\x1B[2J"


def send_raw(port: int, data: bytes) -> bytes:
    """Send *data* to 127.0.0.1:*port* and read until the mirror closes."""
    answer = b""
    deadline = time.monotonic() + 10
    with socket.create_connection((LOCALHOST, port), timeout=10) as sock:
        sock.sendall(data)
        while time.monotonic() < deadline:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            answer += chunk
    return answer


def test_control_bytes_from_clients_are_escaped_in_the_text_log(
    mirror: MirrorProcess,
) -> None:
    r"""
    The access log wrote the request line, User-Agent and Referer as sent:
    ESC sequences reached whoever ran ``tail -f`` on it.  Control bytes
    (and the C1 set, bytes that are no UTF-8, ``"`` and ``\``) are written
    ``\xHH``: the log has no control byte but its newlines.
    """
    answer = send_raw(mirror.port, HOSTILE_REQUEST)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    (line,) = mirror.wait_for_log(re.escape("retitled"))
    assert f'"GET {ESCAPED_URI} HTTP/1.1" 400 ' in line, line
    assert f'"{ESCAPED_REFERRER}" "{ESCAPED_AGENT}"' in line, line
    raw = mirror.log_path.read_bytes()
    controls = set(re.findall(rb"[\x00-\x09\x0b-\x1f\x7f]", raw))
    assert not controls, controls
    assert "\x9b" not in raw.decode("utf-8", "replace")


def test_control_bytes_from_clients_are_escaped_in_json_lines(
    json_mirror: tuple[int, Path],
) -> None:
    r"""With JSON lines, each field holds the escaped text too (JSON would
    carry ESC as ``\u001b``, which a viewer decodes back into the byte)."""
    port, output = json_mirror
    send_raw(port, HOSTILE_REQUEST)

    def logged() -> list[dict[str, object]]:
        return [
            e
            for e in json_lines(output)
            if e.get("logger") == "regmirror.access" and "retitled" in str(e.get("uri"))
        ]

    poll_until(lambda: bool(logged()), timeout=10, describe=output.read_text)
    (event,) = logged()
    assert (event["uri"], event["agent"], event["referrer"]) == (
        ESCAPED_URI,
        ESCAPED_AGENT,
        ESCAPED_REFERRER,
    )
    assert event["status"] == 400 and event["aborted"] is False


StartMirror = Callable[..., MirrorProcess]
MANIFEST_HEADERS = {"Accept": MANIFEST_ACCEPT}


def test_an_ipv4_client_of_an_ipv6_listener_is_logged_as_ipv4(
    start_mirror: StartMirror, upstream: RegistryProcess
) -> None:
    """
    A listener on an IPv6 socket that takes IPv4 clients (``::``; here
    ``::ffff:127.0.0.1``, to stay on loopback) logged them as
    ``::ffff:7f00:1``.  The access line names ``127.0.0.1``, and an
    ``anonymous = 127.0.0.1`` rule lets the client in.
    """
    v6_port = free_port()
    mapped = r"\:\:ffff\:127.0.0.1"
    mirror = start_mirror(
        lambda port: (
            mirror_config(port, upstream.url).replace(
                f"listen = tcp:{port}:interface={LOCALHOST}",
                f"listen = tcp:{port}:interface={LOCALHOST}\n"
                f"    tcp6:{v6_port}:interface={mapped}",
            )
            + "\n[access]\nanonymous = 127.0.0.1\n"
        )
    )
    served = http_request(v6_port, "GET", "/v2/test/small/manifests/latest")
    assert served.status == 200, served.body
    (line,) = mirror.wait_for_log(r'"GET /v2/test/small/manifests/latest ')
    assert " 127.0.0.1 - anonymous " in f" {line.split(']', 1)[1]}", line
    assert "ffff" not in line


def test_a_client_that_goes_away_has_its_access_line(
    start_mirror: StartMirror, upstream: RegistryProcess, catalog: Catalog
) -> None:
    """
    A request whose connection is lost before it finished had no access
    line.  A client that stops reading a blob mid-body and closes (``curl
    --max-time``) gets one with the status sent, the bytes written and
    ``aborted``; a client that goes away before any answer (its upstream
    silent) gets one with status 499 and ``aborted``.
    """
    with socket.socket() as silent:
        silent.bind((LOCALHOST, 0))
        silent.listen(8)  # accepts nothing: the upstream never answers
        silent_url = f"http://{LOCALHOST}:{silent.getsockname()[1]}"
        mirror = start_mirror(
            lambda port: (
                mirror_config(port, upstream.url)
                + f"\n[upstream:silent]\nurl = {silent_url}\nresponse_timeout = 30s\n"
                "\n[namespace:ghcr.io]\nupstreams = silent\n"
            )
        )
        big = catalog.big.layers[0]
        path = f"/v2/{catalog.big.repository}/blobs/{big.digest}"
        assert http_request(mirror.port, "GET", path, timeout=60).status == 200
        with socket.create_connection((LOCALHOST, mirror.port), timeout=10) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
            sock.recv(1 << 16)
        (cut,) = mirror.wait_for_log(re.escape(path) + r" .* aborted$")
        status, sent = re.findall(r'HTTP/1.1" (\d+) (\d+) ', cut)[0]
        assert status == "200" and 0 < int(sent) < big.size, cut

        stalled = "/v2/ghcr.io/org/app/manifests/v1"
        with socket.create_connection((LOCALHOST, mirror.port), timeout=10) as sock:
            sock.sendall(f"GET {stalled} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
            # Gone once the mirror's request is on its way upstream.
            poll_until(
                lambda: bool(select.select([silent], [], [], 0)[0]),
                timeout=10,
                describe=mirror.log,
            )
        (gone,) = mirror.wait_for_log(re.escape(stalled) + r" .* aborted$")
        assert re.search(r'HTTP/1.1" 499 0 ', gone), gone


def test_the_cache_and_upstream_fields_of_manifests_and_joined_downloads(
    tmp_path: Path,
    start_mirror: StartMirror,
    start_program: Callable[[ThrottleRelay], ThrottleRelay],
    upstream: RegistryProcess,
    catalog: Catalog,
) -> None:
    """
    Manifest requests were logged ``cache=- upstream=-``, even cold ones
    fetched upstream: a cold one is ``cache=miss upstream=origin``, the
    next ``cache=hit``.  With ``workers = 2``, a client following the
    other process's download of a blob was logged ``cache=miss
    upstream=another worker`` and counted as a miss: it joined that
    download (``cache=joined``), counted as ``joined``; the client whose
    request started it is the miss.
    """
    relay = start_program(ThrottleRelay(tmp_path / "relay", upstream.port, 8 << 20))
    mirror = start_mirror(
        lambda port: (
            # Nothing pulled ahead: the blob look-ups are the clients' own.
            mirror_config(port, relay.url, prefetch=0).replace(
                "[server]\n", "[server]\nworkers = 2\n"
            )
        )
    )
    poll_until(lambda: len(workers_of(mirror)) == 1, timeout=15, describe=mirror.log)
    (worker,) = workers_of(mirror)
    mirror.wait_for_log(rf"worker {worker} serving", timeout=15)
    assert mirror._process is not None
    parent = mirror._process.pid

    image = catalog.small
    manifest = f"/v2/{image.repository}/manifests/{image.root.digest}"
    for _ in range(2):
        assert (
            http_request(mirror.port, "GET", manifest, MANIFEST_HEADERS).status == 200
        )
    poll_until(
        lambda: len(mirror.wait_for_log(re.escape(manifest))) == 2,
        timeout=10,
        describe=mirror.log,
    )
    first, second = mirror.wait_for_log(re.escape(f'"GET {manifest} HTTP/1.1" 200 '))
    assert " cache=miss upstream=origin " in first, first
    assert " cache=hit upstream=- " in second, second

    big = catalog.big.layers[0]
    path = f"/v2/{catalog.big.repository}/blobs/{big.digest}"
    results: dict[str, int] = {}

    def pull(who: str, connection: http.client.HTTPConnection) -> None:
        response = connection.getresponse()
        results[who] = len(response.read()) if response.status == 200 else -1
        connection.close()

    starter = http.client.HTTPConnection(LOCALHOST, mirror.port, timeout=60)
    with stopped(worker):
        starter.request("GET", path)
        mirror.wait_for_log(rf"downloading {big.digest}")
    first_thread = threading.Thread(target=pull, args=("starter", starter))
    first_thread.start()
    follower = http.client.HTTPConnection(LOCALHOST, mirror.port, timeout=60)
    with stopped(parent):
        # Only the worker accepts meanwhile: the head and the bytes already
        # in the parent's spool come from it.
        follower.request("GET", path)
        response = follower.getresponse()
        assert response.status == 200
        got = len(response.read1(1 << 16))
    got += len(response.read())
    follower.close()
    first_thread.join(60)
    assert results == {"starter": big.size} and got == big.size
    poll_until(
        lambda: len(mirror.wait_for_log(re.escape(f'"GET {path} '))) == 2,
        timeout=10,
        describe=mirror.log,
    )
    started, joined = sorted(
        mirror.wait_for_log(re.escape(f'"GET {path} HTTP/1.1" 200 ')),
        key=lambda line: "joined" in line,
    )
    assert " cache=miss upstream=origin " in started, started
    assert " cache=joined upstream=another worker " in joined, joined
    assert (
        mirror.metric("regmirror_cache_lookups_total", kind="blob", result="miss") == 1
    )
    assert (
        mirror.metric("regmirror_cache_lookups_total", kind="blob", result="joined")
        == 1
    )


#: A TLS 1.2 ClientHello's start (record header, handshake header, version,
#: the first bytes of its random), sent to a plain-HTTP port.
CLIENT_HELLO = bytes.fromhex("16030100c8010000c40303") + b"\x5a" * 32 + b"\x00"
#: Requests the HTTP connection itself refuses, before any resource: each
#: on a connection of its own, with the status it gets and what of its
#: request line the access line shows (a regular expression).
REFUSED: list[tuple[str, bytes, int, str]] = [
    (
        "delete",
        b"DELETE /v2/r01/manifests/latest HTTP/1.1\r\nHost: m\r\n\r\n",
        405,
        re.escape('"DELETE /v2/r01/manifests/latest HTTP/1.1"'),
    ),
    (
        "put",
        b"PUT /v2/r02/manifests/v1 HTTP/1.1\r\nHost: m\r\nContent-Length: 2\r\n\r\n{}",
        405,
        re.escape('"PUT /v2/r02/manifests/v1 HTTP/1.1"'),
    ),
    (
        "options",
        b"OPTIONS /v2/r03/ HTTP/1.1\r\nHost: m\r\n\r\n",
        405,
        re.escape('"OPTIONS /v2/r03/ HTTP/1.1"'),
    ),
    (
        "post",
        b"POST /v2/r04/blobs/uploads/ HTTP/1.1\r\nHost: m\r\n\r\n",
        405,
        re.escape('"POST /v2/r04/blobs/uploads/ HTTP/1.1"'),
    ),
    (
        "post-token",
        b"POST /token?r05 HTTP/1.1\r\nHost: m\r\n\r\n",
        405,
        re.escape('"POST /token?r05 HTTP/1.1"'),
    ),
    (
        "get-with-body",
        b"GET /v2/r06/manifests/latest HTTP/1.1\r\nHost: m\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        413,
        re.escape('"GET /v2/r06/manifests/latest HTTP/1.1"'),
    ),
    (
        "line-too-long",
        b"GET /v2/r07/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: m\r\n\r\n",
        414,
        # cut to a sane length, and marked so
        r'"GET /v2/r07/a{400,1000}\.\.\. -"',
    ),
    (
        "headers-too-big",
        b"GET /v2/r08/manifests/latest HTTP/1.1\r\nHost: m\r\n"
        + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"b" * 1000) for i in range(20))
        + b"\r\n",
        431,
        re.escape('"GET /v2/r08/manifests/latest HTTP/1.1"'),
    ),
    (
        "esc-in-target",
        b"GET /v2/r09/\x1b[2J/manifests/latest HTTP/1.1\r\nHost: m\r\n\r\n",
        400,
        re.escape(r'"GET /v2/r09/\x1B[2J/manifests/latest HTTP/1.1"'),
    ),
    (
        "non-ascii-in-target",
        b"GET /v2/r10/\xff/manifests/latest HTTP/1.1\r\nHost: m\r\n\r\n",
        400,
        re.escape(r'"GET /v2/r10/\xFF/manifests/latest HTTP/1.1"'),
    ),
    (
        "nul-in-header",
        b"GET /v2/r11/manifests/latest HTTP/1.1\r\nHost: m\r\nX-A: a\x00b\r\n\r\n",
        400,
        re.escape('"GET /v2/r11/manifests/latest HTTP/1.1"'),
    ),
    (
        "http-9.9",
        b"GET /v2/r12/manifests/latest HTTP/9.9\r\nHost: m\r\n\r\n",
        400,
        re.escape('"GET /v2/r12/manifests/latest HTTP/9.9"'),
    ),
    (
        "space-in-target",
        b"GET /v2/r13/a b/manifests/latest HTTP/1.1\r\nHost: m\r\n\r\n",
        400,
        re.escape('"GET /v2/r13/a b/manifests/latest HTTP/1.1"'),
    ),
    (
        "bare-lf",
        b"GET /v2/r14/manifests/latest HTTP/1.1\nHost: m\n\n",
        400,
        re.escape('"GET /v2/r14/manifests/latest HTTP/1.1"'),
    ),
    (
        "tls-on-plain",
        CLIENT_HELLO,
        400,
        re.escape(r'"- \x16\x03\x01\x00\xC8\x01\x00\x00\xC4\x03\x03ZZZZ'),
    ),
]


def test_requests_refused_before_routing_have_their_access_lines(
    start_mirror: StartMirror,
) -> None:
    """
    The answers of the HTTP connection itself (405 for a write method, 413
    for a GET with a body, 414, 431, 400 for a malformed request line or
    header, a bare LF, TLS on the plain port) left no access line: fifteen
    such requests gave five.  Each has one line, with the client's
    address, what of its request line can be shown (escaped; a long one
    cut), its status and the bytes of the answer's body; and each counts
    in ``regmirror_requests_total`` (namespace and endpoint as for a
    request refused before routing: ``""`` and ``other``).
    """
    mirror = start_mirror(lambda port: mirror_config(port, "http://127.0.0.1:9"))
    statuses = ("400", "405", "413", "414", "431")
    counted = {s: mirror.metric("regmirror_requests_total", status=s) for s in statuses}
    mark = len(mirror.log_lines())
    sent: dict[str, int] = {}
    for name, data, status, _ in REFUSED:
        answer = send_raw(mirror.port, data)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status) or (
            name == "tls-on-plain" and head.startswith(b"HTTP/1.0 400 ")
        ), (name, answer[:300])
        sent[name] = len(body)

    def access_lines() -> list[str]:
        return [
            line
            for line in mirror.log_lines()[mark:]
            if "[regmirror.access#" in line and "/metrics" not in line
        ]

    poll_until(
        lambda: len(access_lines()) >= len(REFUSED), timeout=10, describe=mirror.log
    )
    lines = access_lines()
    assert len(lines) == len(REFUSED), "\n".join(lines)
    for name, _, status, shown in REFUSED:
        found = [line for line in lines if re.search(shown, line)]
        assert len(found) == 1, (name, shown, lines)
        (line,) = found
        assert f"] {LOCALHOST} - - " in line, line
        assert re.search(f'" {status} {sent[name]} "-" "-" ns=- ', line), line
        assert len(line) < 2500, line
    for status in statuses:
        expected = sum(1 for _, _, s, _ in REFUSED if str(s) == status)
        now = mirror.metric(
            "regmirror_requests_total", status=status, namespace="", endpoint="other"
        )
        assert now - counted[status] == expected, (status, now, counted[status])
    raw = mirror.log_path.read_bytes()
    assert not set(re.findall(rb"[\x00-\x09\x0b-\x1f\x7f]", raw))
