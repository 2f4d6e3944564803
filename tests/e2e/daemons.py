"""
Real container clients for the end-to-end suite: ``containerd`` (driven
with ``ctr``) and the Docker daemon (driven with ``docker``), each with all
of its state, sockets and mounts under one test folder.

They run as root (both need it) but are kept from touching the host:
containerd's config names its root, state and sockets and disables the
plugins that would write elsewhere (CRI, ``/opt`` installs); dockerd uses
that containerd instead of starting its own, keeps its trust key in its own
folder, and neither bridges, iptables nor IP forwarding are set up.  Both
get ``HTTP(S)_PROXY`` pointing at a closed port on 127.0.0.1, so that any
attempt to reach a real registry (Docker falls back to Docker Hub when a
mirror fails) fails at once on loopback instead of going anywhere.
Every wait is bounded; :meth:`stop` ends the process and unmounts whatever
is left mounted under its folder.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from .harness import (
    LOCALHOST,
    await_start,
    free_port,
    stop_process,
)

CONTAINERD_BINARY = "/usr/bin/containerd"
CTR_BINARY = "/usr/bin/ctr"
DOCKERD_BINARY = "/usr/sbin/dockerd"
#: Debian's docker.io client, the same version as the daemon (another
#: ``docker`` may come first in ``PATH``)
DOCKER_BINARY = "/usr/bin/docker"

DAEMON_START_TIMEOUT = 30.0
DAEMON_STOP_TIMEOUT = 20.0
CLIENT_TIMEOUT = 120.0

#: plugins of containerd 1.6 that the tests do not need, some of which
#: would write outside the test folder (``opt`` installs into /opt)
_DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
)


def missing_tools() -> list[str]:
    """What keeps the daemons from running here (tools, root)."""
    missing = [
        binary
        for binary in (CONTAINERD_BINARY, CTR_BINARY, DOCKERD_BINARY, DOCKER_BINARY)
        if not os.access(binary, os.X_OK)
    ]
    if os.geteuid() != 0:
        missing.append("root (containerd and dockerd need it)")
    return missing


def closed_proxy_environment() -> dict[str, str]:
    """
    This process's environment with every proxy variable naming a closed
    port on 127.0.0.1, loopback itself exempt: a client that tries to reach
    anything but 127.0.0.1 fails on the spot.
    """
    proxy = f"http://{LOCALHOST}:{free_port()}"
    env = {**os.environ}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[name] = proxy
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = f"{LOCALHOST},localhost"
    return env


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mounts_under(folder: Path) -> list[str]:
    """Mount points at or below *folder*, deepest first."""
    root = str(folder.resolve())
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = _unescape_mountinfo(line.split()[4])
            if point == root or point.startswith(root + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_under(folder: Path) -> list[str]:
    """Unmount (lazily) everything mounted under *folder*; what was."""
    points = mounts_under(folder)
    for point in points:
        subprocess.run(
            ["umount", "--lazy", point],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
        )
    return points


def _run(
    command: list[str], env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env),
    )


class _Daemon:
    """A long-running root daemon in *workdir*, output in a log file."""

    name = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / f"{self.name}.log"
        self.env = closed_proxy_environment()
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _answers(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = self._command()
        self._output = self.log_path.open("ab")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self.env,
        )
        await_start(
            self._process,
            self.name,
            self._answers,
            self.log,
            self.stop,
            timeout=DAEMON_START_TIMEOUT,
            interval=0.2,
        )

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process, timeout=DAEMON_STOP_TIMEOUT)
        if self._output is not None:
            self._output.close()
            self._output = None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-20000:]


class ContainerdProcess(_Daemon):
    """``containerd`` with its root, state and sockets under *workdir*."""

    name = "containerd"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.socket = workdir / "containerd.sock"
        self.config_path = workdir / "config.toml"

    def _command(self) -> list[str]:
        disabled = ", ".join(json.dumps(p) for p in _DISABLED_PLUGINS)
        self.config_path.write_text(
            "version = 2\n"
            f"root = {json.dumps(str(self.workdir / 'root'))}\n"
            f"state = {json.dumps(str(self.workdir / 'state'))}\n"
            f"disabled_plugins = [{disabled}]\n"
            "\n[grpc]\n"
            f"  address = {json.dumps(str(self.socket))}\n"
            "\n[ttrpc]\n"
            f"  address = {json.dumps(str(self.socket) + '.ttrpc')}\n"
            "\n[debug]\n"
            '  address = ""\n'
        )
        return [CONTAINERD_BINARY, "--config", str(self.config_path)]

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        return self.ctr("version", check=False, timeout=5).returncode == 0

    def ctr(
        self, *args: str, check: bool = True, timeout: float = CLIENT_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address SOCKET ARGS`` with the closed-proxy environment."""
        result = _run(
            [CTR_BINARY, "--address", str(self.socket), *args], self.env, timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} exited with {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result


class DockerdProcess(_Daemon):
    """
    ``dockerd`` on a unix socket under *workdir*, using *containerd*, with
    *mirror* (``host:port``) as its plain-HTTP Docker Hub mirror.
    """

    name = "dockerd"

    def __init__(self, workdir: Path, containerd: ContainerdProcess, mirror: str):
        super().__init__(workdir)
        self.containerd = containerd
        self.mirror = mirror
        self.socket = workdir / "docker.sock"

    def _command(self) -> list[str]:
        config = self.workdir / "daemon.json"
        # The trust key would otherwise be written to /etc/docker/key.json.
        config.write_text(
            json.dumps({"deprecated-key-path": str(self.workdir / "key.json")})
        )
        return [
            DOCKERD_BINARY,
            f"--config-file={config}",
            f"--data-root={self.workdir / 'data'}",
            f"--exec-root={self.workdir / 'exec'}",
            f"--pidfile={self.workdir / 'docker.pid'}",
            f"--host=unix://{self.socket}",
            f"--containerd={self.containerd.socket}",
            f"--registry-mirror=http://{self.mirror}",
            f"--insecure-registry={self.mirror}",
            "--storage-driver=vfs",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--max-download-attempts=1",
        ]

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        return self.docker("version", check=False, timeout=5).returncode == 0

    def docker(
        self, *args: str, check: bool = True, timeout: float = CLIENT_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker --host SOCKET ARGS``."""
        result = _run(
            [DOCKER_BINARY, f"--host=unix://{self.socket}", *args], self.env, timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited with {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}\n--- dockerd log ---\n{self.log()}"
            )
        return result
