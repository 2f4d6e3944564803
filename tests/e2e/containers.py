"""
Podman for the container image's tests: a store of its own (nothing
shared with the machine's podman), a base image made offline from Debian
packages, and the image built from the project's ``Containerfile``.

The base is a test concern: besides Python it holds this machine's CA
bundle and pip's configuration, so that ``pip install`` inside the build
reaches the package index as pip does here (through an intercepting TLS
proxy, or from local folders, which the build gets as read-only volumes).
The shipped ``Containerfile`` knows nothing of it.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

PODMAN = shutil.which("podman") or "/usr/bin/podman"
MMDEBSTRAP = shutil.which("mmdebstrap") or "/usr/bin/mmdebstrap"
ROOT = Path(__file__).resolve().parents[2]

#: What a container needs on these machines: the host's network (no
#: bridge), and limits it may set inside this one's.
RUN_OPTIONS = (
    "--network",
    "host",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
)

#: The base: Debian's Python with venv, its certificates, no documentation.
DEBIAN_PACKAGES = "python3,python3-venv,ca-certificates"
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
)
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

BUILD_TIMEOUT = 600.0
COMMAND_TIMEOUT = 120.0


class ContainerError(AssertionError):
    """A podman command failed."""


class CannotRunContainers(Exception):
    """Podman is here but cannot start any container on this machine."""


class Podman:
    """``podman`` over a store of its own under *workdir*."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        # The run root holds sockets whose paths must stay short (108 bytes).
        self._runroot = Path(tempfile.mkdtemp(prefix="regmirror-podman-"))
        self._base = [
            PODMAN,
            "--root",
            str(workdir / "storage"),
            "--runroot",
            str(self._runroot / "run"),
            "--tmpdir",
            str(self._runroot / "libpod"),
            "--storage-driver",
            "overlay",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]

    def command(self, *args: str) -> list[str]:
        return [*self._base, *args]

    def run(
        self, *args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ContainerError(
                f"podman {' '.join(args)} exited with {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def image_size(self, image: str) -> int:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", image).stdout)

    def close(self) -> None:
        """Remove every container, image and volume of this store, and it."""
        for args in (
            ("rm", "--all", "--force", "--time", "0"),
            ("volume", "rm", "--all", "--force"),
            ("rmi", "--all", "--force"),
        ):
            try:
                self.run(*args, check=False)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.workdir / "storage", ignore_errors=True)
        shutil.rmtree(self._runroot, ignore_errors=True)


# -- what pip needs inside the build -----------------------------------------


def host_ca_bundle() -> Path:
    """The CA bundle this machine's TLS clients (pip among them) trust."""
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        ssl.get_default_verify_paths().cafile,
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise ContainerError("no CA bundle found on this machine")


_CONFIG_LINE = re.compile(r"^(?P<where>[\w:.-]*?)\.(?P<key>[\w-]+)='(?P<value>.*)'$")


def pip_settings() -> dict[str, dict[str, str]]:
    """
    pip's effective configuration here (its files and ``PIP_*`` variables,
    as ``pip config list`` shows them), by section; environment variables
    and later files win.
    """
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    settings: dict[str, dict[str, str]] = {}
    environment: dict[str, str] = {}
    for line in listed.stdout.splitlines():
        match = _CONFIG_LINE.match(line.strip())
        if match is None:
            continue
        where, key, value = match["where"], match["key"], match["value"]
        if where == ":env:":
            environment[key] = value
        else:
            settings.setdefault(where, {})[key] = value
    settings.setdefault("global", {}).update(environment)
    return settings


def local_paths(settings: dict[str, dict[str, str]]) -> list[Path]:
    """
    The files and folders pip's settings name (``find-links`` folders,
    constraint files) that exist here, and the folder of each ``file://``
    index (whose pages link to files beside it, ``../files/...``); not the
    CA bundle, which the base holds.
    """
    found: list[Path] = []
    for section in settings.values():
        for key, value in section.items():
            if key == "cert":
                continue
            for word in value.split():
                if word.startswith("file:"):
                    path = Path(unquote(urlsplit(word).path)).parent
                elif word.startswith("/"):
                    path = Path(word)
                else:
                    continue
                if path.exists() and path != Path("/") and path not in found:
                    found.append(path)
    return found


def pip_conf(settings: dict[str, dict[str, str]], ca_path: str) -> str:
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if key != "cert":
                lines.append(f"{key} = {value}")
        if section == "global":
            lines.append(f"cert = {ca_path}")
        lines.append("")
    return "\n".join(lines)


# -- the base and the image ----------------------------------------------------

_CA_IN_BASE = "/etc/ssl/certs/ca-certificates.crt"


def build_base(podman: Podman, workdir: Path, name: str) -> None:
    """
    A Debian bookworm base with Python, made by ``mmdebstrap`` from the
    configured apt sources, this machine's CA bundle and pip's settings
    added, imported as *name*.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    settings = pip_settings()
    (workdir / "pip.conf").write_text(pip_conf(settings, _CA_IN_BASE))
    rootfs = workdir / "rootfs.tar"
    result = subprocess.run(
        [
            MMDEBSTRAP,
            "--quiet",
            "--variant=apt",
            f"--include={DEBIAN_PACKAGES}",
            "--dpkgopt=force-unsafe-io",
            *(f"--dpkgopt={option}" for option in _DPKG_EXCLUDES),
            f"--customize-hook=upload {host_ca_bundle()} {_CA_IN_BASE}",
            f"--customize-hook=upload {workdir / 'pip.conf'} /etc/pip.conf",
            "bookworm",
            str(rootfs),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    if result.returncode != 0:
        raise ContainerError(f"mmdebstrap failed:\n{result.stderr[-4000:]}")
    podman.run("import", "--quiet", "--change", f"ENV PATH={_PATH}", str(rootfs), name)
    rootfs.unlink()


def check_can_run(podman: Podman, image: str) -> None:
    """
    :raises CannotRunContainers: when not even ``true`` runs in *image*.
    """
    name = f"regmirror-probe-{uuid.uuid4().hex[:8]}"
    result = podman.run(
        "run", "--rm", "--name", name, *RUN_OPTIONS, image, "true", check=False
    )
    if result.returncode != 0:
        podman.run("rm", "--force", name, check=False)
        raise CannotRunContainers(result.stderr.strip()[-2000:])


def build_image(podman: Podman, base: str, name: str) -> float:
    """
    ``podman build`` of the project's Containerfile from *base* (Docker's
    format, which keeps HEALTHCHECK), pip's local folders mounted
    read-only; the seconds it took.
    """
    volumes: list[str] = []
    for path in local_paths(pip_settings()):
        volumes += ["--volume", f"{path}:{path}:ro"]
    started = time.monotonic()
    podman.run(
        "build",
        "--quiet",
        "--format",
        "docker",
        # One layer for what the final stage adds: no layer cache to keep.
        "--layers=false",
        "--network",
        "host",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--build-arg",
        f"BASE={base}",
        *volumes,
        "--file",
        str(ROOT / "Containerfile"),
        "--tag",
        name,
        str(ROOT),
        timeout=BUILD_TIMEOUT,
    )
    return time.monotonic() - started


def missing_tools() -> Sequence[str]:
    return [tool for tool in (PODMAN, MMDEBSTRAP) if not os.access(tool, os.X_OK)]
