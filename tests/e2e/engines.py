"""
The cluster's engines for the end-to-end suite and the benchmarks: Debian's
``redis-server`` (leases and shared tags) on 127.0.0.1.

A plain module (no pytest), so that ``benchmarks/bench.py`` can start the
same engines.  Every process is a child running in the foreground, so its
owner can always stop it; every wait is bounded in count and time and fails
with the daemon's log tail.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import IO

from .harness import (
    LOCALHOST,
    HarnessError,
    await_start,
    free_port,
    poll_until,
    port_is_free,
    stop_process,
)

REDIS_BINARY = "/usr/bin/redis-server"

REDIS_START_TIMEOUT = 10.0
REDIS_STOP_TIMEOUT = 10.0
#: how much of a daemon's log a failure message quotes
LOG_TAIL_LINES = 40


def missing_engines() -> list[str]:
    """The engine programs that are not installed here."""
    return [binary for binary in (REDIS_BINARY,) if not os.access(binary, os.X_OK)]


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
