"""
Several worker processes sharing the listeners and one cache, each running
the parent's service tree: one view of the metrics and the status page's
totals whichever process answers, the status history in every process,
and a clean stop of each.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    _LABEL,
    _SAMPLE,
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    free_port,
    http_request,
    mirror_config,
    mirror_config_upstreams,
    poll_until,
    port_is_free,
    stopped,
    workers_of,
)
from .images import Catalog
from .servers import FakeUpstream, write_certificate

pytestmark = pytest.mark.e2e


def two_processes(port: int, upstream_url: str) -> str:
    return mirror_config(port, upstream_url).replace(
        "[cache]", "workers = 2\n\n[cache]"
    )


def serving_worker(mirror: MirrorProcess) -> int:
    """Wait (bounded) for the mirror's one worker to serve; its pid."""
    poll_until(
        lambda: len(workers_of(mirror)) == 1,
        timeout=15,
        describe=lambda: "no worker process",
    )
    (worker,) = workers_of(mirror)
    mirror.wait_for_log(rf"worker {worker} serving", timeout=15)
    return worker


def alive(pid: int) -> bool:
    """Is *pid* a process that has not exited (a zombie has)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def requests_total(metrics: bytes) -> float:
    """The sum of every ``regmirror_requests_total`` sample of a scrape."""
    found = 0.0
    for line in metrics.decode().splitlines():
        sample = _SAMPLE.fullmatch(line)
        if sample is not None and sample["name"] == "regmirror_requests_total":
            assert dict(_LABEL.findall(sample["labels"] or ""))
            found += float(sample["value"])
    return found


def ask(port: int) -> tuple[dict[str, Any], float]:
    """
    ``/_status.json``, then ``/metrics`` on the same connection, so from
    the same process (the document's ``pid``): the document, and the sum
    of ``regmirror_requests_total``.
    """
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=10)
    try:
        connection.request("GET", "/_status.json")
        status = json.loads(connection.getresponse().read())
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200
        return status, requests_total(response.read())
    finally:
        connection.close()


def get_ok(port: int, path: str, times: int = 1) -> None:
    """*times* GETs of *path*, each on a new connection, each a 200."""
    for _ in range(times):
        assert http_request(port, "GET", path).status == 200


def pull(port: int, path: str, digests: list[str]) -> None:
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    hasher = hashlib.sha256()
    while chunk := response.read(1024 * 1024):
        hasher.update(chunk)
    digests.append(f"sha256:{hasher.hexdigest()}")


def test_two_workers_share_one_download_and_one_log(
    catalog: Catalog,
    upstream: RegistryProcess,
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """With ``workers = 2`` a second process accepts on the same port; twenty
    concurrent clients of a cold blob get the right bytes from both
    processes while the upstream sees one GET; the worker's log lines reach
    the parent's log; a killed worker is restarted."""
    mirror = start_mirror(
        lambda port: mirror_config(port, upstream.url).replace(
            "[cache]", "workers = 2\n\n[cache]"
        )
    )
    poll_until(
        lambda: len(workers_of(mirror)) == 1,
        timeout=15,
        describe=lambda: "no worker process",
    )
    poll_until(
        lambda: re.search(r"worker \d+ serving", mirror.log()) is not None,
        timeout=15,
        describe=mirror.log,
    )
    layer = catalog.big.layers[0]
    path = f"/v2/{catalog.big.repository}/blobs/{layer.digest}"
    digests: list[str] = []
    clients = [
        threading.Thread(target=pull, args=(mirror.port, path, digests))
        for _ in range(20)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=120)
    assert digests == [layer.digest] * 20
    assert upstream.count_blob_gets(layer.digest) == 1
    log = mirror.log()
    # Both processes took connections: one downloaded, the other followed.
    assert "following another worker's download" in log
    assert f"downloading {layer.digest}" in log

    (worker,) = workers_of(mirror)
    os.kill(worker, signal.SIGKILL)
    poll_until(
        lambda: workers_of(mirror) not in ([], [worker]),
        timeout=15,
        describe=lambda: "the worker was not restarted",
    )
    assert "restarting it" in mirror.log()


def test_metrics_and_status_totals_are_every_process(
    catalog: Catalog,
    upstream: RegistryProcess,
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    Requests answered by the parent (the worker stopped) and by the worker
    (the parent stopped) add up in ``regmirror_requests_total`` whichever
    process answers the scrape, and so do the status page's totals (a blob
    missed by the parent is the worker's miss too); the worker's status
    history has samples of those machine-wide totals after the sample
    interval.
    """
    mirror = start_mirror(lambda port: two_processes(port, upstream.url))
    worker = serving_worker(mirror)
    assert mirror._process is not None
    parent = mirror._process.pid
    layer = catalog.small.layers[0]
    with stopped(worker):
        get_ok(mirror.port, "/v2/", times=7)
        get_ok(mirror.port, f"/v2/{catalog.small.repository}/blobs/{layer.digest}")
    with stopped(parent):
        get_ok(mirror.port, "/v2/", times=5)
    answered: dict[int, dict[str, Any]] = {}

    def both_answered() -> bool:
        status, total = ask(mirror.port)
        assert total == 7 + 1 + 5, (status["pid"], total)
        answered[status["pid"]] = status
        return set(answered) == {parent, worker}

    poll_until(both_answered, timeout=30, describe=lambda: f"only {set(answered)}")
    for status in answered.values():
        assert status["totals"]["misses"] == 1
        assert status["totals"]["upstream_bytes"] == layer.size

    # The worker samples every SAMPLE_INTERVAL (10 s) from its start.
    def worker_sampled_the_miss() -> bool:
        status, _ = ask(mirror.port)
        history = status["history"]
        return (
            status["pid"] == worker and len(history) >= 2 and history[-1]["misses"] == 1
        )

    poll_until(
        worker_sampled_the_miss, timeout=30, describe=lambda: "no worker history"
    )


def test_stopped_worker_exits_cleanly_and_its_counts_stay(
    upstream: RegistryProcess,
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    SIGTERM to a worker: its tree stops (``Mirror.stop`` included), it
    exits 0 and is restarted; the requests it answered stay in the
    machine's ``regmirror_requests_total``.
    """
    mirror = start_mirror(lambda port: two_processes(port, upstream.url))
    worker = serving_worker(mirror)
    assert mirror._process is not None
    with stopped(mirror._process.pid):
        get_ok(mirror.port, "/v2/", times=4)
    os.kill(worker, signal.SIGTERM)
    mirror.wait_for_log(rf"worker {worker} stopped", timeout=10)
    mirror.wait_for_log(
        r"worker 0 ended \(A process has ended without apparent errors: "
        r"process finished with exit code 0\.\); restarting it",
        timeout=10,
    )
    restarted = serving_worker(mirror)
    assert restarted != worker
    for _ in range(10):
        _, total = ask(mirror.port)
        assert total == 4


def test_parent_stops_every_process(tmp_path: Path, upstream: RegistryProcess) -> None:
    """
    SIGTERM to the parent stops every process within a few seconds: each
    worker stops its tree and exits 0, then the parent shuts down; nothing
    listens any more.
    """
    port = free_port()
    mirror = MirrorProcess(tmp_path / "mirror", two_processes(port, upstream.url), port)
    mirror.start()
    try:
        worker = serving_worker(mirror)
        assert mirror._process is not None
        mirror._process.send_signal(signal.SIGTERM)
        # twistd ends by raising again the signal it stopped for.
        assert mirror._process.wait(timeout=5) == -signal.SIGTERM
        poll_until(
            lambda: not alive(worker), timeout=5, describe=lambda: "worker alive"
        )
        log = mirror.log()
        assert "Server Shut Down." in log
        assert f"worker {worker} stopped" in log
        assert (
            "worker 0 ended (A process has ended without apparent errors: "
            "process finished with exit code 0.)" in log
        )
        assert port_is_free(port)
        assert not mirror.unhandled_errors(), log
    finally:
        mirror.stop()


def test_worker_ends_when_its_parent_is_killed(
    tmp_path: Path, upstream: RegistryProcess
) -> None:
    """A worker whose parent is killed (SIGKILL: no chance to stop it)
    stops by itself instead of serving on as an orphan."""
    port = free_port()
    mirror = MirrorProcess(tmp_path / "mirror", two_processes(port, upstream.url), port)
    mirror.start()
    worker = None
    try:
        worker = serving_worker(mirror)
        assert mirror._process is not None
        mirror._process.kill()
        mirror._process.wait(timeout=5)
        poll_until(
            lambda: not alive(worker), timeout=10, describe=lambda: "worker alive"
        )
        assert port_is_free(port)
    finally:
        mirror.stop()
        if worker is not None and alive(worker):
            os.kill(worker, signal.SIGKILL)


def blob_then_pid(port: int, digest: str) -> tuple[int, int]:
    """A GET of blob *digest*, then ``/_status.json`` on the same connection
    (so from the same process): the blob's status and that process's pid."""
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=30)
    try:
        connection.request("GET", f"/v2/test/none/blobs/{digest}")
        response = connection.getresponse()
        response.read()
        connection.request("GET", "/_status.json")
        status = json.loads(connection.getresponse().read())
        return response.status, int(status["pid"])
    finally:
        connection.close()


def test_upstream_health_is_one_for_every_process(
    tmp_path: Path,
    start_program: Callable[[FakeUpstream], FakeUpstream],
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    With ``workers = 3``, upstreams ``dead`` (every answer a 503, marked
    down at the first: ``breaker_failures = 1``, ``breaker_backoff = 60s``),
    ``throttled`` (every answer a 429 with ``Retry-After: 60``) and the
    origin: blob requests on separate connections, each process answering
    several, cost ``dead`` one request machine-wide (the one that marked it
    down: its recovery look waits for ``breaker_backoff``) and
    ``throttled`` one, not that many per process; one process logs
    ``dead`` marked down.
    """
    dead = start_program(FakeUpstream(tmp_path / "dead", status=503))
    throttled = start_program(
        FakeUpstream(tmp_path / "throttled", status=429, retry_after="60")
    )
    origin = start_program(FakeUpstream(tmp_path / "origin"))
    mirror = start_mirror(
        lambda port: mirror_config_upstreams(
            port,
            {
                "dead": {
                    "url": dead.url,
                    "breaker_failures": "1",
                    "breaker_backoff": "60s",
                },
                "throttled": {"url": throttled.url},
                "origin": {"url": origin.url},
            },
            origin="origin",
        ).replace("[cache]", "workers = 3\n\n[cache]")
    )
    poll_until(
        lambda: len(re.findall(r"worker \d+ serving", mirror.log())) == 2,
        timeout=30,
        describe=mirror.log,
    )
    started = time.monotonic()
    served: dict[int, int] = {}
    for number in range(400):
        digest = "sha256:" + hashlib.sha256(b"nowhere %d" % number).hexdigest()
        status, pid = blob_then_pid(mirror.port, digest)
        assert status in (404, 429, 502, 503), status
        served[pid] = served.get(pid, 0) + 1
        enough = len(served) == 3 and min(served.values()) >= 5
        if enough and time.monotonic() - started > 3:
            break
    assert len(served) == 3 and min(served.values()) >= 5, served
    assert len(dead.records()) == 1, (served, dead.records())
    assert len(throttled.records()) == 1, (served, throttled.records())
    assert len(re.findall(r"upstream dead marked down", mirror.log())) == 1


#: an inline secret of the configuration (the upstream never asks for it)
_INLINE_PASSWORD = "inline-secret-8f2c1e"


def edited_mirror(port: int) -> str:
    """Two processes, anonymous pulls for everyone, an inline password."""
    return (
        two_processes(port, "http://127.0.0.1:9").replace(
            "connect_timeout = 2s",
            f"username = alice\npassword = {_INLINE_PASSWORD}\nconnect_timeout = 2s",
        )
        + "\n[access]\nanonymous = any\n"
    )


def shows_the_password(pid: int) -> bool:
    """Is the inline password on *pid*'s command line or in its environment?"""
    return any(
        _INLINE_PASSWORD.encode() in Path(f"/proc/{pid}/{place}").read_bytes()
        for place in ("cmdline", "environ")
    )


def restarted(mirror: MirrorProcess, worker: int) -> int:
    """Kill *worker* (SIGKILL); the pid of the one started instead, serving."""
    os.kill(worker, signal.SIGKILL)
    poll_until(
        lambda: workers_of(mirror) not in ([], [worker]),
        timeout=15,
        describe=lambda: f"the worker was not restarted:\n{mirror.log()}",
    )
    (new,) = workers_of(mirror)
    mirror.wait_for_log(rf"worker {new} serving", timeout=15)
    return new


def test_a_restarted_worker_runs_the_configuration_twistd_started_with(
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    The file edited while the mirror runs (``anonymous = any`` made
    ``10.0.0.0/8``), then the worker killed: the worker started instead runs
    the configuration twistd loaded, and answers anonymous requests from
    127.0.0.1 as the parent does (200, not 401).  The file then broken, and
    the worker killed again: the next one serves too, without a traceback.
    The configuration's inline password is on no worker's command line nor
    in its environment.
    """
    mirror = start_mirror(edited_mirror)
    assert mirror._process is not None
    parent = mirror._process.pid
    worker = serving_worker(mirror)
    assert not shows_the_password(worker)

    text = mirror.config_path.read_text()
    mirror.config_path.write_text(
        text.replace("anonymous = any", "anonymous = 10.0.0.0/8")
    )
    worker = restarted(mirror, worker)
    with stopped(parent):
        for _ in range(5):
            assert http_request(mirror.port, "GET", "/v2/").status == 200

    mirror.config_path.write_text("[server\nthis is no INI file\n")
    worker = restarted(mirror, worker)
    with stopped(parent):
        for _ in range(5):
            assert http_request(mirror.port, "GET", "/v2/").status == 200
    assert not mirror.unhandled_errors(), mirror.log()
    assert not shows_the_password(worker)


def test_sighup_while_a_worker_starts_does_not_end_it(
    start_mirror: Callable[..., MirrorProcess], upstream: RegistryProcess
) -> None:
    """
    SIGHUP sent to the parent again and again while it restarts a killed
    worker: the new worker starts and serves, and is not ended by the
    reloads (the parent passed SIGHUP on as a signal, whose default action
    ended a worker still starting: "ended by signal 1", restarted later).
    """
    mirror = start_mirror(lambda port: two_processes(port, upstream.url))
    assert mirror._process is not None
    parent = mirror._process.pid
    worker = serving_worker(mirror)
    os.kill(worker, signal.SIGKILL)
    for _ in range(150):  # 3 s: the restart delay, the start, serving
        os.kill(parent, signal.SIGHUP)
        time.sleep(0.02)
    (new,) = workers_of(mirror)
    mirror.wait_for_log(rf"worker {new} serving", timeout=15)
    assert alive(new)
    assert not re.search(r"by signal 1\b", mirror.log()), mirror.log()


def test_a_worker_that_cannot_start_says_why_and_is_restarted_less_often(
    tmp_path: Path, start_mirror: Callable[..., MirrorProcess]
) -> None:
    """
    The key of an ``ssl:`` listener broken after twistd started, then the
    worker killed: each worker started instead logs one line naming the
    file that is not usable (no traceback) and is restarted after 1 s, then
    2 s, while twistd serves on; the key mended, a worker serves again.
    """
    write_certificate(tmp_path / "pki")
    files = {
        name: (tmp_path / "pki" / name).read_bytes() for name in ("key.pem", "cert.pem")
    }
    mirror = start_mirror(
        lambda port: two_processes(port, "http://127.0.0.1:9").replace(
            "interface=127.0.0.1\n",
            "interface=127.0.0.1 ssl:0:privateKey=key.pem:certKey=cert.pem"
            ":interface=127.0.0.1\n",
            1,
        ),
        files=files,
    )
    worker = serving_worker(mirror)
    key = mirror.workdir / "key.pem"
    key.write_bytes(b"not a key\n")
    os.kill(worker, signal.SIGKILL)
    mirror.wait_for_log(r"restarting it in 2\.0s", timeout=20)
    cannot = mirror.wait_for_log(r"worker \d+ cannot start: ", timeout=5)
    assert f"no PEM private key in {key}" in cannot[0], cannot
    assert "[server] listen: bad listener" in cannot[0], cannot
    assert mirror.request("GET", "/v2/").status == 200
    assert not mirror.unhandled_errors(), mirror.log()
    served = mirror.log().count(" serving")
    key.write_bytes(files["key.pem"])
    poll_until(
        lambda: mirror.log().count(" serving") > served,
        timeout=20,
        describe=mirror.log,
    )
