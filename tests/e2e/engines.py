"""
The cluster's engines for the end-to-end suite and the benchmarks, on
127.0.0.1: Debian's ``redis-server`` (leases and shared tags) and a
single-node Ceph RGW (the shared S3 store).

A plain module (no pytest), so that ``benchmarks/bench.py`` can start the
same engines.  Every process is a child running in the foreground, so its
owner can always stop it; every wait is bounded in count and time and fails
with the daemons' log tails.

Where this machine differed from the cluster issue's measurements (details
in :class:`CephRGW`): ``paxos propose interval = 0.01`` and ``paxos min
wait = 0.001`` halve start-up again (to ~1 s); radosgw must be started only
once the OSD is active, or it loses ~5 s; the monitor must be stopped last;
radosgw stopped at once on SIGTERM even with its lifecycle and garbage
collection threads (they stay disabled); RGW accepts any SigV4 region.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from .harness import (
    LOCALHOST,
    HarnessError,
    await_start,
    free_port,
    poll_until,
    port_is_free,
    stop_process,
)
from .harness import Response as HttpResponse

REDIS_BINARY = "/usr/bin/redis-server"
# ceph-mon, monmaptool: ceph-mon (and ceph-base); ceph-osd: ceph-osd;
# radosgw: radosgw; radosgw-admin: ceph-common, a dependency of radosgw.
CEPH_MON_BINARY = "/usr/bin/ceph-mon"
MONMAPTOOL_BINARY = "/usr/bin/monmaptool"
CEPH_OSD_BINARY = "/usr/bin/ceph-osd"
RADOSGW_BINARY = "/usr/bin/radosgw"
RADOSGW_ADMIN_BINARY = "/usr/bin/radosgw-admin"
#: every program the engines run, Redis's first
ENGINE_BINARIES = (
    REDIS_BINARY,
    CEPH_MON_BINARY,
    MONMAPTOOL_BINARY,
    CEPH_OSD_BINARY,
    RADOSGW_BINARY,
    RADOSGW_ADMIN_BINARY,
)

REDIS_START_TIMEOUT = 10.0
REDIS_STOP_TIMEOUT = 10.0
#: each of the Ceph start-up's waits (OSD active, RGW answering, S3 ready)
CEPH_START_TIMEOUT = 30.0
#: monmaptool, ceph-mon/ceph-osd --mkfs, radosgw-admin
CEPH_TOOL_TIMEOUT = 30.0
CEPH_STOP_TIMEOUT = 10.0
#: how much of a daemon's log a failure message quotes
LOG_TAIL_LINES = 40


REDIS_BINARIES = (REDIS_BINARY,)
CEPH_BINARIES = ENGINE_BINARIES[1:]


def missing_engines(binaries: Sequence[str] = ENGINE_BINARIES) -> list[str]:
    """Those of the engine programs *binaries* that are not installed here."""
    return [binary for binary in binaries if not os.access(binary, os.X_OK)]


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text)


# -- Redis ----------------------------------------------------------------------


def _resp_command(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


RedisReply = bytes | int | list["RedisReply"] | None


class RedisError(HarnessError):
    """Redis answered a command with an error reply."""


class _RespReader:
    """Reads one RESP2 reply from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def _fill(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise HarnessError("Redis closed the connection mid-reply")
        self._buffer += data

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            self._fill()
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def _exactly(self, count: int) -> bytes:
        while len(self._buffer) < count + 2:
            self._fill()
        data, self._buffer = self._buffer[:count], self._buffer[count + 2 :]
        return data

    def reply(self) -> RedisReply:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            return None if length < 0 else self._exactly(length)
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self.reply() for _ in range(count)]
        raise HarnessError(f"not a RESP reply: {line!r}")


class RedisServer:
    """
    ``redis-server`` on 127.0.0.1 without persistence, its folder and log
    in *workdir*.  The port is chosen once, so the server can be stopped
    and started again at the same address (as a test of lost connections
    does).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            raise HarnessError(f"Redis on port {self.port} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [
                REDIS_BINARY,
                "--bind",
                LOCALHOST,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        await_start(
            self._process,
            f"redis-server on port {self.port}",
            self._answers_ping,
            self.log_tail,
            self.stop,
            timeout=REDIS_START_TIMEOUT,
        )

    def _answers_ping(self) -> bool:
        try:
            return self.command("PING", timeout=1.0) == b"PONG"
        except (OSError, HarnessError):
            return False

    def command(self, *args: str, timeout: float = 5.0) -> RedisReply:
        """
        Send one command on a new connection and return its reply: bytes
        for simple and bulk strings, int, a list, or None; an error reply
        raises :class:`RedisError`.
        """
        with socket.create_connection((LOCALHOST, self.port), timeout=timeout) as sock:
            sock.sendall(_resp_command(*args))
            return _RespReader(sock).reply()

    def flushall(self) -> None:
        self.command("FLUSHALL")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a bounded wait; the port is free after."""
        if self._process is not None:
            stop_process(self._process, REDIS_STOP_TIMEOUT)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        poll_until(
            lambda: port_is_free(self.port),
            timeout=REDIS_STOP_TIMEOUT,
            describe=lambda: f"port {self.port} still answers after Redis stopped",
        )

    def log_tail(self) -> str:
        return _tail(self.log_path)


# -- Ceph RGW -------------------------------------------------------------------

_CEPH_CONF = """\
[global]
fsid = {fsid}
mon host = [v2:{host}:{mon_port}]
public addr = {host}
cluster addr = {host}
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
# radosgw 16.2 does not reach a monitor without auth otherwise
ms mon client mode = crc secure
run dir = {workdir}/run
crash dir = {workdir}/crash
log file = {workdir}/log/$name.log
mon cluster log file = {workdir}/log/$cluster.$channel.log
mon data = {workdir}/mon/$cluster-$id
osd data = {workdir}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon data avail warn = 0
mon data avail crit = 0
mon warn on pool no redundancy = false
client mount timeout = {timeout}

[mon]
admin socket = $run_dir/$cluster-$name.asok
# start-up in ~1 s instead of ~16 s
paxos propose interval = 0.01
paxos min wait = 0.001

[osd]
admin socket = $run_dir/$cluster-$name.asok

[client.rgw]
admin socket = $run_dir/$cluster-$name.asok
# tcp_nodelay: without it a GET on a kept-alive connection waits ~40 ms
# (Nagle against delayed ACKs)
rgw frontends = beast endpoint={host}:{rgw_port} tcp_nodelay=1
rgw data = {workdir}/rgw
# nothing for radosgw to finish on SIGTERM
rgw enable lc threads = false
rgw enable gc threads = false
rgw enable quota threads = false
rgw dynamic resharding = false
"""

#: sun_path of struct sockaddr_un holds 107 bytes and a NUL
_UNIX_PATH_MAX = 107


def _admin_socket_command(path: Path, prefix: str) -> Any:
    """
    One command on a Ceph daemon's admin socket: the JSON command and a NUL
    out, a 32-bit big-endian length and the JSON reply back.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(str(path))
        sock.sendall(json.dumps({"prefix": prefix}).encode() + b"\0")
        data = b""
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            if not chunk:
                raise OSError("admin socket closed before the reply length")
            data += chunk
        length = int.from_bytes(data, "big")
        data = b""
        while len(data) < length:
            chunk = sock.recv(length - len(data))
            if not chunk:
                raise OSError("admin socket closed mid-reply")
            data += chunk
    return json.loads(data)


class _Daemon:
    """A Ceph daemon run in the foreground as a child of this process."""

    def __init__(self, name: str, argv: Sequence[str], out: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.out = out
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, cwd: Path) -> None:
        with self.out.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, CEPH_STOP_TIMEOUT)


class CephRGW:
    """
    A single-node Ceph cluster serving S3 through radosgw, everything under
    *workdir* (configuration, monitor store, logs, sockets; nothing under
    /etc or /var):

    - one monitor (``mon.a``, msgr2 only) and one OSD keeping its objects in
      memory (memstore, at most *memstore_bytes*), pools of size 1, no
      authentication between the daemons;
    - radosgw with its beast frontend on :attr:`endpoint`, and an S3 user
      whose keys are :attr:`access_key` and :attr:`secret_key`.

    Facts of Ceph 16.2.15 on Debian bookworm that this relies on, checked
    on the test machine (2 CPUs):

    - with ``auth ... required = none``, radosgw needs
      ``ms mon client mode = crc secure`` to talk to the monitor (without
      it radosgw-admin works but radosgw never answers);
    - the paxos intervals in ``[mon]`` make start-up (to a signed S3
      request answering) ~0.7-1.2 s on an idle machine; the issue's
      0.05/0.01 s took ~1.7-2.4 s, Ceph's defaults ~16 s;
    - radosgw is started only once the OSD is active (asked on its admin
      socket): started earlier, its first writes wait for the client's
      5-second objecter tick, and start-up takes ~8 s;
    - the OSD creates itself in the OSD map when it boots, so no
      ``ceph osd new`` (and no ``ceph`` command-line tool) is needed;
      ``ceph-osd --mkfs`` asks the monitor for its configuration unless
      given ``--no-mon-config``, so it can run beside ``ceph-mon --mkfs``;
    - the monitor is stopped last: an OSD told to stop tells the monitor
      first (waiting 5 s for one that is gone), and radosgw without a
      monitor ignores SIGTERM;
    - without lifecycle and garbage-collection threads radosgw has nothing
      to finish on SIGTERM (the issue measured a slow stop with them; here
      it stopped in ~0.3 s either way);
    - RGW answers a chunked PUT with 411 (send bodies of known length);
      multipart parts under 5 MiB fail only at completion (400
      EntityTooSmall); bucket names need 3+ characters, lower case;
    - RGW takes any region in a SigV4 credential scope (``us-east-1``,
      ``eu-west-9``... all sign); :attr:`region` is the default
      zonegroup's name.

    The monitor's cluster and audit logs, which default to /var/log/ceph,
    are in the log folder too.
    """

    access_key = "regmirror-e2e-access"
    secret_key = "regmirror-e2e-secret-not-a-secret"
    region = "default"
    user = "regmirror-e2e"

    def __init__(self, workdir: Path, *, memstore_bytes: int = 2 << 30) -> None:
        self.workdir = workdir
        self.memstore_bytes = memstore_bytes
        self.mon_port = free_port()
        self.port = free_port()
        self.conf_path = workdir / "ceph.conf"
        self._daemons: list[_Daemon] = []
        self._buckets = 0
        #: (phase, seconds since :meth:`start` began) of the last start
        self.timings: list[tuple[str, float]] = []

    @property
    def endpoint(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def running(self) -> bool:
        return bool(self._daemons) and all(d.running for d in self._daemons)

    # -- start ------------------------------------------------------------------

    def start(self) -> None:
        """
        Make and start the cluster, radosgw and the S3 user; ready when a
        signed request answers.  On any failure everything started is
        stopped.
        """
        if self._daemons:
            raise HarnessError("a Ceph RGW starts once (memstore keeps nothing)")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        began = time.monotonic()

        def done(phase: str) -> None:
            self.timings.append((phase, round(time.monotonic() - began, 3)))

        w = self.workdir
        for folder in ("run", "crash", "log", "mon/ceph-a", "osd/ceph-0", "rgw"):
            (w / folder).mkdir(parents=True, exist_ok=True)
        if len(str(w / "run" / "ceph-client.rgw.asok")) > _UNIX_PATH_MAX:
            raise HarnessError(f"{w} is too long a path for Ceph's admin sockets")
        fsid = str(uuid.uuid4())
        self.conf_path.write_text(
            _CEPH_CONF.format(
                fsid=fsid,
                host=LOCALHOST,
                mon_port=self.mon_port,
                rgw_port=self.port,
                workdir=w,
                memstore_bytes=self.memstore_bytes,
                timeout=int(CEPH_TOOL_TIMEOUT),
            )
        )
        conf = ["--conf", str(self.conf_path)]
        monmap = w / "monmap"
        self._tools(
            [
                MONMAPTOOL_BINARY,
                "--create",
                "--fsid",
                fsid,
                "--addv",
                "a",
                f"[v2:{LOCALHOST}:{self.mon_port}]",
                str(monmap),
            ]
        )
        self._tools(
            [CEPH_MON_BINARY, *conf, "--id", "a", "--mkfs", "--monmap", str(monmap)],
            [
                CEPH_OSD_BINARY,
                *conf,
                "--id",
                "0",
                "--mkfs",
                "--osd-uuid",
                str(uuid.uuid4()),
                "--monmap",
                str(monmap),
                # or it asks the monitor (not running yet) for its configuration
                "--no-mon-config",
            ],
        )
        done("mkfs")
        self._daemon("mon.a", CEPH_MON_BINARY, *conf, "--id", "a", "-f")
        self._daemon("osd.0", CEPH_OSD_BINARY, *conf, "--id", "0", "-f")
        osd_socket = w / "run" / "ceph-osd.0.asok"
        self._wait("the OSD to be active", lambda: self._osd_active(osd_socket))
        done("osd active")
        self._daemon("client.rgw", RADOSGW_BINARY, *conf, "--name", "client.rgw", "-f")
        self._tools(
            [
                RADOSGW_ADMIN_BINARY,
                *conf,
                "user",
                "create",
                "--uid",
                self.user,
                "--display-name",
                self.user,
                "--access-key",
                self.access_key,
                "--secret",
                self.secret_key,
            ]
        )
        done("user created")
        self._wait("a signed S3 request to succeed", self._s3_ready)
        done("s3 ready")

    def _daemon(self, name: str, *argv: str) -> None:
        daemon = _Daemon(name, argv, self.workdir / "log" / f"{name}.out")
        self._daemons.append(daemon)
        daemon.start(self.workdir)

    def _tools(self, *commands: Sequence[str]) -> None:
        """
        Run *commands* side by side, their output in the log folder; each
        must succeed within :data:`CEPH_TOOL_TIMEOUT`.
        """
        deadline = time.monotonic() + CEPH_TOOL_TIMEOUT
        running = []
        for argv in commands:
            out = self.workdir / "log" / f"{Path(argv[0]).name}.out"
            with out.open("ab") as output:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                )
            running.append((argv, process))
        failures = []
        try:
            for argv, process in running:
                try:
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    failures.append(f"{argv[0]} took more than {CEPH_TOOL_TIMEOUT}s")
                    continue
                if process.returncode != 0:
                    failures.append(
                        f"{' '.join(argv)} exited with {process.returncode}"
                    )
        finally:
            for _, process in running:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        if failures:
            raise HarnessError("\n".join(failures) + "\n" + self.log_tail())

    def _wait(self, what: str, probe: Callable[[], bool]) -> None:
        def ready() -> bool:
            for daemon in self._daemons:
                if not daemon.running:
                    raise HarnessError(
                        f"{daemon.name} exited while waiting for {what}:\n"
                        f"{self.log_tail()}"
                    )
            return probe()

        poll_until(
            ready,
            timeout=CEPH_START_TIMEOUT,
            interval=0.02,
            describe=lambda: f"waiting for {what}:\n{self.log_tail()}",
        )

    @staticmethod
    def _osd_active(path: Path) -> bool:
        try:
            status = _admin_socket_command(path, "status")
            return bool(status.get("state") == "active")
        except (OSError, ValueError, AttributeError):
            return False

    def _s3_ready(self) -> bool:
        try:
            return self.request("GET", "/", timeout=2.0).status == 200
        except (OSError, http.client.HTTPException):
            return False

    # -- S3 -------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        *,
        signed: bool = True,
        timeout: float = 30.0,
    ) -> HttpResponse:
        """
        One S3 request, path-style (``/bucket/key?query``, already
        percent-encoded), signed with SigV4 as the test user unless
        *signed* is false.  The body is sent with its length (RGW refuses
        chunked uploads).
        """
        send = dict(headers or {})
        if signed:
            aws = AWSRequest(
                method=method, url=self.endpoint + path, data=body, headers=send
            )
            S3SigV4Auth(
                Credentials(self.access_key, self.secret_key), "s3", self.region
            ).add_auth(aws)
            send = dict(aws.headers.items())
        connection = http.client.HTTPConnection(LOCALHOST, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=send)
            response = connection.getresponse()
            return HttpResponse(response.status, response.headers, response.read())
        finally:
            connection.close()

    def make_bucket(self, name: str | None = None) -> str:
        """
        Create a bucket, named *name* or else a fresh name; return its name.
        """
        if name is None:
            self._buckets += 1
            name = f"test-{self._buckets}-{uuid.uuid4().hex[:8]}"
        response = self.request("PUT", f"/{name}")
        if response.status != 200:
            raise HarnessError(
                f"creating bucket {name!r}: {response.status}\n"
                f"{response.body.decode(errors='replace')}"
            )
        return name

    # -- stop -----------------------------------------------------------------

    def stop(self) -> None:
        """
        Stop radosgw, the OSD, then the monitor (SIGTERM, SIGKILL after a
        bounded wait each).
        """
        for daemon in reversed(self._daemons):
            daemon.stop()

    def log_tail(self) -> str:
        """The ends of every log and daemon output, for failure messages."""
        logs = sorted((self.workdir / "log").glob("*"))
        return "\n".join(_tail(path, 20) for path in logs)
