"""
A real Prometheus (Debian's) scraping a mirror with two worker processes,
over plain HTTP and over TLS, with the shipped alert rules loaded: what it
stores is the machine's count, whichever process answered each request
and each scrape.
"""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    LOCALHOST,
    MirrorProcess,
    await_start,
    free_port,
    http_request,
    mirror_config,
    poll_until,
    responds_ok,
    stop_process,
    stopped,
)
from .servers import write_certificate

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
RULES = Path(__file__).resolve().parents[2] / "etc" / "deploy" / "prometheus-rules.yml"
PLAIN_REQUESTS = 23
TLS_REQUESTS = 17


def scrape_config(plain: int, secure: int, certificate: Path) -> str:
    return f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {json.dumps(str(RULES))}
scrape_configs:
  - job_name: regmirror
    static_configs:
      - targets: ["{LOCALHOST}:{plain}"]
  - job_name: regmirror-tls
    scheme: https
    tls_config:
      ca_file: {json.dumps(str(certificate))}
    static_configs:
      - targets: ["{LOCALHOST}:{secure}"]
"""


class Prometheus:
    """``prometheus`` on 127.0.0.1 with its own storage under *workdir*."""

    def __init__(self, workdir: Path, config: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self._config = config
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not Path(PROMETHEUS).exists():
            pytest.fail("prometheus is not installed: run scripts/dev test")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address={LOCALHOST}:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        await_start(
            self._process,
            f"prometheus on {LOCALHOST}:{self.port}",
            lambda: responds_ok(self.port, "/-/ready"),
            self.log,
            self.stop,
            timeout=30,
            interval=0.2,
        )

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def api(self, path: str, **query: str) -> Any:
        answer = http_request(
            self.port, "GET", f"/api/v1/{path}?{urllib.parse.urlencode(query)}"
        )
        assert answer.status == 200, answer.body
        body = answer.json()
        assert body["status"] == "success", body
        return body["data"]

    def by_job(self, query: str) -> dict[str, float]:
        """An instant query's values by the ``job`` label."""
        return {
            item["metric"].get("job", ""): float(item["value"][1])
            for item in self.api("query", query=query)["result"]
        }


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[MirrorProcess, int, Path]]:
    """A mirror with ``workers = 2``, a plain listener and an ``ssl:`` one;
    its TLS port and certificate."""
    plain, secure = free_port(), free_port()
    workdir = tmp_path / "mirror"
    write_certificate(workdir)
    config = (
        mirror_config(plain, "http://127.0.0.1:9")
        .replace(
            f"listen = tcp:{plain}:interface={LOCALHOST}",
            f"listen = tcp:{plain}:interface={LOCALHOST}\n"
            f"    ssl:{secure}:privateKey=key.pem:certKey=cert.pem"
            f":interface={LOCALHOST}",
        )
        .replace("[cache]", "workers = 2\n\n[cache]")
    )
    mirror = MirrorProcess(workdir, config, plain)
    mirror.start()
    yield mirror, secure, workdir / "cert.pem"
    died = mirror.returncode
    mirror.stop()
    assert died is None, mirror.log()
    assert not mirror.unhandled_errors(), mirror.log()


def get_v2(port: int, context: ssl.SSLContext | None = None) -> int:
    """One ``GET /v2/`` on a connection of its own (any process may take it)."""
    if context is None:
        connection = http.client.HTTPConnection(LOCALHOST, port, timeout=10)
    else:
        connection = http.client.HTTPSConnection(
            LOCALHOST, port, timeout=10, context=context
        )
    try:
        connection.request("GET", "/v2/")
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def worker_of(mirror: MirrorProcess) -> int:
    """The pid of the mirror's one worker process, once it serves."""
    assert mirror._process is not None
    found: list[str] = []

    def one() -> bool:
        found[:] = subprocess.run(
            ["pgrep", "-P", str(mirror._process.pid), "-f", "regmirror.worker"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split()
        return len(found) == 1

    poll_until(one, timeout=15, describe=lambda: f"workers: {found}")
    mirror.wait_for_log(rf"worker {found[0]} serving", timeout=15)
    return int(found[0])


def test_prometheus_counts_every_request_of_every_worker_over_http_and_tls(
    tmp_path: Path, two_workers: tuple[MirrorProcess, int, Path]
) -> None:
    """
    Prometheus scrapes the two-worker mirror every second, over plain HTTP
    and over TLS (checking the mirror's certificate); after a known number
    of ``GET /v2/`` on both listeners, answered by both workers, the
    request counter it stores is that number in both jobs, each scrape
    answered by whichever process took it. Both targets are up and every
    shipped alert rule evaluates without error.
    """
    mirror, secure, certificate = two_workers
    prometheus = Prometheus(
        tmp_path / "prometheus", scrape_config(mirror.port, secure, certificate)
    )
    prometheus.start()
    try:
        context = ssl.create_default_context(cafile=str(certificate))
        assert mirror._process is not None
        parent, worker = mirror._process.pid, worker_of(mirror)
        # The parent answers the plain requests, the worker those over TLS.
        with stopped(worker):
            plain = [get_v2(mirror.port) for _ in range(PLAIN_REQUESTS)]
        with stopped(parent):
            over_tls = [get_v2(secure, context) for _ in range(TLS_REQUESTS)]
        assert plain + over_tls == [200] * (PLAIN_REQUESTS + TLS_REQUESTS)

        # Every scrape of the last five seconds, not one lucky one, gave the
        # full count, whichever process took it.
        total = 'sum by (job) (regmirror_requests_total{endpoint="base", method="GET"})'
        lowest = f"min_over_time(({total})[5s:1s])"
        highest = f"max_over_time(({total})[5s:1s])"
        expected = float(PLAIN_REQUESTS + TLS_REQUESTS)
        both = {"regmirror": expected, "regmirror-tls": expected}
        poll_until(
            lambda: prometheus.by_job(lowest) == both == prometheus.by_job(highest),
            timeout=30,
            interval=0.5,
            describe=lambda: (
                f"over 5s {prometheus.by_job(lowest)} to {prometheus.by_job(highest)}"
                f", not {expected} in both jobs; targets: "
                f"{prometheus.api('targets')['activeTargets']}\n{prometheus.log()}"
            ),
        )
        assert prometheus.by_job("up") == {"regmirror": 1.0, "regmirror-tls": 1.0}
        assert prometheus.by_job("regmirror_ready") == {
            "regmirror": 1.0,
            "regmirror-tls": 1.0,
        }

        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) >= 10
        poll_until(
            lambda: all(
                r.get("health") == "ok"
                for g in prometheus.api("rules")["groups"]
                for r in g["rules"]
            ),
            timeout=10,
            interval=0.5,
            describe=lambda: f"rules not all healthy: {prometheus.api('rules')}",
        )
    finally:
        prometheus.stop()
