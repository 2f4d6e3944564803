"""
The container image of ``Containerfile``, built and run with podman: it
serves pulls as a user that is not root, keeps its cache in its volume,
says it is healthy where the configuration listens, writes JSON lines when
asked, reloads on SIGHUP and stops cleanly on SIGTERM.

The base and the image are built once per session (about two minutes on
two busy cores: ``mmdebstrap`` most of one, the build the rest); the test
itself takes seconds.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .containers import (
    RUN_OPTIONS,
    CannotRunContainers,
    ContainerError,
    Podman,
    build_base,
    build_image,
    check_can_run,
    missing_tools,
)
from .harness import (
    LOCALHOST,
    HarnessError,
    RegistryProcess,
    Skopeo,
    free_port,
    poll_until,
    responds_ok,
)
from .images import Catalog

# One worker builds the image and runs every test of it (pytest-xdist).
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("container")]

BASE = "localhost/regmirror-e2e-base:latest"
IMAGE = "localhost/regmirror-e2e:latest"
#: The runtime user the Containerfile names.
UID = 10001
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    missing = missing_tools()
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)}: run scripts/dev test")
    podman = Podman(tmp_path_factory.mktemp("podman"))
    yield podman
    podman.close()


@pytest.fixture(scope="session")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The image built from the project's Containerfile, once a session."""
    build_base(podman, tmp_path_factory.mktemp("base"), BASE)
    try:
        check_can_run(podman, BASE)
    except CannotRunContainers as error:
        pytest.skip(f"podman cannot run containers on this machine: {error}")
    seconds = build_image(podman, BASE, IMAGE)
    size, base = podman.image_size(IMAGE), podman.image_size(BASE)
    print(
        f"\nimage {IMAGE}: {size / 1e6:.0f} MB ({(size - base) / 1e6:.0f} MB "
        f"over its base of {base / 1e6:.0f} MB), built in {seconds:.0f}s"
    )
    return IMAGE


def inspected(podman: Podman, image: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = json.loads(
        podman.run("image", "inspect", image).stdout
    )
    return found[0]


def assert_image_settings(podman: Podman, image: str) -> None:
    """The image's own settings: a numeric non-root user, the cache volume,
    port 5000, a HEALTHCHECK by ``regmirror healthcheck`` on the
    configuration file (kept: Docker's format), and a venv that adds
    little to its base."""
    found = inspected(podman, image)
    config = found["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert "/var/lib/regmirror" in config["Volumes"]
    assert "5000/tcp" in config["ExposedPorts"]
    assert "docker" in found["ManifestType"]
    assert found["Healthcheck"]["Test"] == [
        "CMD",
        "regmirror",
        "healthcheck",
        "-c",
        "/etc/regmirror/mirror.ini",
    ]
    added = podman.image_size(image) - podman.image_size(BASE)
    assert added < 150_000_000, f"the image adds {added} bytes to its base"


def container_config(port: int, upstream_url: str) -> str:
    """A mirror on a port that is not 5000, its cache in the volume."""
    return f"""\
[server]
listen = tcp:{port}:interface={LOCALHOST}

[cache]
directory = /var/lib/regmirror
tag_ttl = 0s

[upstream:origin]
url = {upstream_url}
connect_timeout = 2s
response_timeout = 10s

[namespace:docker.io]
upstreams = origin
default = true
"""


class Container:
    """One ``podman run -d`` of the image, removed with its volume at the end."""

    def __init__(self, podman: Podman, name: str, volume: str) -> None:
        self.podman = podman
        self.name = name
        self.volume = volume

    def inspect(self, template: str) -> str:
        return self.podman.run(
            "inspect", "--format", template, self.name
        ).stdout.strip()

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def logs(self) -> str:
        result = self.podman.run("logs", self.name, check=False)
        return result.stdout + result.stderr

    def log_records(self) -> list[dict[str, object]]:
        return [
            json.loads(line)
            for line in self.podman.run("logs", self.name).stdout.splitlines()
            if line.strip()
        ]

    def volume_path(self) -> Path:
        return Path(
            self.podman.run(
                "volume", "inspect", "--format", "{{.Mountpoint}}", self.volume
            ).stdout.strip()
        )

    def remove(self) -> None:
        self.podman.run("rm", "--force", "--time", "0", self.name, check=False)
        self.podman.run("volume", "rm", "--force", self.volume, check=False)


@pytest.fixture
def container(
    podman: Podman, image: str, tmp_path: Path, upstream: RegistryProcess
) -> Iterator[tuple[Container, int]]:
    """The image running with a test configuration mounted read-only, a
    named volume for its cache, JSON lines for its log; and its port."""
    port = free_port()
    config = tmp_path / "mirror.ini"
    config.write_text(container_config(port, upstream.url))
    config.chmod(0o644)
    suffix = uuid.uuid4().hex[:8]
    container = Container(podman, f"regmirror-e2e-{suffix}", f"regmirror-{suffix}")
    podman.run("volume", "create", container.volume)
    try:
        podman.run(
            "run",
            "--detach",
            "--name",
            container.name,
            *RUN_OPTIONS,
            # No systemd here to time the checks: the test runs them.
            "--health-interval",
            "disable",
            "--env",
            "REGMIRROR_LOG_FORMAT=json",
            "--volume",
            f"{config}:/etc/regmirror/mirror.ini:ro",
            "--volume",
            f"{container.volume}:/var/lib/regmirror",
            image,
        )

        def serving() -> bool:
            if not container.running():
                raise HarnessError(f"the container exited:\n{container.logs()}")
            return responds_ok(port, "/healthz")

        poll_until(
            serving,
            timeout=START_TIMEOUT,
            interval=0.2,
            describe=lambda: f"the container does not serve:\n{container.logs()}",
        )
        yield container, port
    finally:
        container.remove()


def host_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_container_serves_pulls_as_non_root_and_stops_on_sigterm(
    podman: Podman,
    image: str,
    container: tuple[Container, int],
    skopeo: Skopeo,
    catalog: Catalog,
    tmp_path: Path,
) -> None:
    """
    One test, so that the image is built once (an xdist worker that ran
    out of tests tore the session's image down, and built it again for the
    next): the image's settings (:func:`assert_image_settings`); then
    skopeo pulls an image through the containerised mirror (listening on a
    port of its configuration, not 5000); the mirror runs as uid 10001 as
    PID 1 of the container; what it cached lies in the volume; /healthz
    answers and the image's HEALTHCHECK passes; the log is JSON lines with
    the pull's access lines; SIGHUP reloads and it goes on serving;
    SIGTERM ends it within seconds with exit status 0.
    """
    assert_image_settings(podman, image)
    running, port = container
    pulled = catalog.small
    skopeo.pull(
        f"{LOCALHOST}:{port}",
        f"{pulled.repository}:{pulled.tag}",
        tmp_path / "pulled",
        "x",
    )

    pid = int(running.inspect("{{.State.Pid}}"))
    status = host_status(pid)
    assert status["Uid"].split() == [str(UID)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(UID)] * 4, status["Gid"]
    assert b"twistd" in Path(f"/proc/{pid}/cmdline").read_bytes()

    cache = running.volume_path()
    for layer in pulled.layers:
        algorithm, digest = layer.digest.split(":")
        blob = cache / "blobs" / algorithm / digest[:2] / digest
        assert blob.is_file(), sorted(str(p) for p in cache.rglob("*"))
        assert blob.stat().st_uid == UID

    assert responds_ok(port, "/healthz")
    check = running.podman.run("healthcheck", "run", running.name, check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    records = running.log_records()
    assert any(
        r.get("logger") == "regmirror.access"
        and f"/blobs/{pulled.layers[0].digest}" in str(r.get("uri"))
        for r in records
    ), records[-20:]

    running.podman.run("kill", "--signal", "HUP", running.name)
    poll_until(
        lambda: any(
            "reload requested" in str(r.get("message")) for r in running.log_records()
        ),
        timeout=10,
        describe=lambda: f"SIGHUP was not handled:\n{running.logs()}",
    )
    assert running.running()
    assert responds_ok(port, "/healthz")

    started = time.monotonic()
    running.podman.run("kill", "--signal", "TERM", running.name)
    waited = running.podman.run("wait", running.name, timeout=STOP_TIMEOUT * 3)
    took = time.monotonic() - started
    assert waited.stdout.strip() == "0", running.logs()
    assert took < STOP_TIMEOUT, f"SIGTERM took {took:.1f}s"
    if running.running():
        raise ContainerError("the container still runs after podman wait")
