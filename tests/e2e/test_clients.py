"""
Real container clients through the mirror, on each way they name it: the
Docker daemon with ``registry-mirrors`` (Docker Hub images) and with the
mirror in the image name (``mirror/ghcr.io/...``), and containerd with a
``hosts.toml`` per registry, which sends ``?ns=<registry>``.

The daemons run under the test's folder (see :mod:`daemons`); any attempt
of theirs to reach a real registry meets a closed port on 127.0.0.1, so a
pull succeeds only through the mirror.  Teardown checks that they left the
host as they found it: nothing mounted, no state outside the folder, IP
forwarding untouched.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt
import pytest

from .daemons import (
    ContainerdProcess,
    DockerdProcess,
    missing_tools,
    mounts_under,
    unmount_under,
)
from .harness import (
    GHCR_HOST,
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    TwoNamespaces,
    mirror_config_namespaces,
    poll_until,
)
from .images import OCI_CONFIG, Catalog, ghcr_app
from .servers import write_certificate

#: Under pytest-xdist these tests run one at a time on one worker: two
#: dockerd would share /run/docker, which the teardown checks.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("daemons")]

APP = ghcr_app()

#: what dockerd and containerd could leave behind outside their folders
_HOST_PATHS = (
    Path("/etc/docker/key.json"),
    Path("/opt/containerd"),
    Path("/run/containerd"),
    Path("/var/lib/containerd"),
    Path("/var/lib/docker"),
)
#: dockerd always creates this (its plugin socket folder)
_DOCKER_RUN = Path("/run/docker")
_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def _remove_empty_tree(folder: Path) -> None:
    """Remove *folder* if it holds nothing but empty folders."""
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        _remove_empty_tree(child)
    if not any(folder.iterdir()):
        folder.rmdir()


@pytest.fixture
def daemons_folder() -> Iterator[Path]:
    """
    A folder for the daemons' state.  At teardown (after the daemons
    stopped) whatever is still mounted under it is unmounted, and the host
    must be as before: no mounts left, none of the daemons' default paths
    created, IP forwarding unchanged.
    """
    missing = missing_tools()
    if missing:
        pytest.fail(f"cannot run the container clients: missing {missing}")
    # A short path: dockerd's sockets under it must fit in sun_path (108
    # bytes), which pytest-xdist's tmp_path (.../popen-gw1/<test name>/) does not.
    folder = Path(tempfile.mkdtemp(prefix="rm-daemons-", dir="/tmp"))
    existed = {path: path.exists() for path in _HOST_PATHS}
    docker_run_existed = _DOCKER_RUN.exists()
    forwarding = _IP_FORWARD.read_text()
    yield folder
    left_mounted = unmount_under(folder)
    if not docker_run_existed:
        _remove_empty_tree(_DOCKER_RUN)
    problems = []
    if left_mounted:
        problems.append(f"the daemons left mounts behind: {left_mounted}")
    if mounts_under(folder):
        problems.append(f"cannot unmount {mounts_under(folder)}")
    created = [str(p) for p, was in existed.items() if p.exists() and not was]
    if created:
        problems.append(f"the daemons wrote outside their folder: {created}")
    if _DOCKER_RUN.exists() and not docker_run_existed:
        problems.append(f"{_DOCKER_RUN} is left and not empty")
    if _IP_FORWARD.read_text() != forwarding:
        problems.append("the daemons changed net.ipv4.ip_forward")
    if not problems:
        shutil.rmtree(folder, ignore_errors=True)
    assert not problems, problems


@pytest.fixture
def containerd(daemons_folder: Path) -> Iterator[ContainerdProcess]:
    """A running containerd with everything under the test's folder."""
    process = ContainerdProcess(daemons_folder / "ctd")
    process.start()
    yield process
    died = process.returncode
    process.stop()
    assert died is None, f"containerd died during the test:\n{process.log()}"


def _access_lines(lines: list[str], pattern: str) -> list[str]:
    """The mirror's access-log lines for requests matching *pattern*."""
    request = re.compile(rf'"(?:GET|HEAD) {pattern} HTTP/1\.1"')
    return [line for line in lines if request.search(line)]


def test_docker_daemon_pulls_through_mirror(
    daemons_folder: Path,
    containerd: ContainerdProcess,
    catalog: Catalog,
    two_namespaces: TwoNamespaces,
) -> None:
    """
    ``dockerd --registry-mirror=http://MIRROR``: ``docker pull busybox``
    is asked of the mirror as ``library/busybox`` and yields the catalog's
    image (its config digest is the image ID); ``docker pull
    MIRROR/ghcr.io/org/app:v1`` reaches the ghcr.io namespace by path
    prefix.
    """
    mirror = two_namespaces.mirror
    dockerd = DockerdProcess(daemons_folder / "docker", containerd, mirror.host)
    dockerd.start()
    try:
        busybox = catalog.busybox
        dockerd.docker("pull", "busybox")
        inspected = json.loads(dockerd.docker("image", "inspect", "busybox").stdout)
        assert inspected[0]["Id"] == busybox.blobs[0].digest
        assert f"busybox@{busybox.root.digest}" in inspected[0]["RepoDigests"]

        lines = mirror.log_lines()
        manifests = _access_lines(lines, r"/v2/library/busybox/manifests/\S+")
        assert manifests, mirror.log()
        assert _access_lines(
            lines, rf"/v2/library/busybox/blobs/{busybox.layers[0].digest}"
        )
        assert two_namespaces.hub.count_requests(
            "HEAD", "/v2/library/busybox/manifests/latest"
        )

        app = f"{mirror.host}/ghcr.io/{APP.reference}"
        dockerd.docker("pull", app)
        inspected = json.loads(dockerd.docker("image", "inspect", app).stdout)
        assert inspected[0]["Id"] == APP.blobs[0].digest
        assert _access_lines(mirror.log_lines(), r"/v2/ghcr\.io/org/app/manifests/v1")
        assert two_namespaces.ghcr.count_blob_gets(APP.layers[0].digest) == 1
        assert not [x for x in two_namespaces.hub_log() if "org/app" in x]
    finally:
        died = dockerd.returncode
        dockerd.stop()
    assert died is None, f"dockerd died during the test:\n{dockerd.log()}"


#: pulls in a row: dockerd sends one ``Accept`` line per media type, in an
#: order that changes from pull to pull, so one pull may pass by luck
PLATFORM_PULLS = 4


def test_docker_daemon_pulls_another_platform_of_an_index_every_time(
    daemons_folder: Path,
    containerd: ContainerdProcess,
    catalog: Catalog,
    two_namespaces: TwoNamespaces,
) -> None:
    """
    ``docker pull --platform linux/arm64 test/multi`` (an OCI index of
    amd64 and arm64) through ``registry-mirrors``, several times with
    ``docker rmi`` between: every pull succeeds and stores the arm64 image
    (its config digest is the image ID), never the amd64 one nor a failure
    that leaves dockerd to give up on the mirror.
    """
    multi = catalog.multi
    arm64 = next(
        blob.digest
        for blob in multi.blobs
        if blob.media_type == OCI_CONFIG
        and json.loads(blob.data)["architecture"] == "arm64"
    )
    dockerd = DockerdProcess(
        daemons_folder / "docker", containerd, two_namespaces.mirror.host
    )
    dockerd.start()
    outcomes = []
    try:
        for _ in range(PLATFORM_PULLS):
            pulled = dockerd.docker(
                "pull", "--platform", "linux/arm64", multi.repository, check=False
            )
            if pulled.returncode != 0:
                outcomes.append(("pull failed", pulled.stderr.strip()[-300:]))
                continue
            inspected = json.loads(
                dockerd.docker("image", "inspect", multi.repository).stdout
            )[0]
            outcomes.append(
                (inspected["Architecture"], inspected["Id"], inspected["RepoDigests"])
            )
            dockerd.docker("rmi", multi.repository)
    finally:
        died = dockerd.returncode
        dockerd.stop()
    assert died is None, f"dockerd died during the test:\n{dockerd.log()}"
    # The repository digest is the index's: what the tag names, not a child.
    stored = ("arm64", arm64, [f"{multi.repository}@{multi.root.digest}"])
    assert outcomes == [stored] * PLATFORM_PULLS


def _hosts_toml(folder: Path, registry: str, server: str, mirror: str) -> None:
    (folder / registry).mkdir(parents=True, exist_ok=True)
    (folder / registry / "hosts.toml").write_text(
        f'server = "{server}"\n\n'
        f'[host."http://{mirror}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


def _image_digests(containerd: ContainerdProcess) -> dict[str, str]:
    """Image name → digest of what it points at, in containerd."""
    listing = containerd.ctr("images", "ls").stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[2] for line in listing if line.strip()}


def test_containerd_pulls_through_mirror_with_ns_parameter(
    daemons_folder: Path,
    containerd: ContainerdProcess,
    catalog: Catalog,
    two_namespaces: TwoNamespaces,
) -> None:
    """
    ``ctr images pull --hosts-dir`` with the mirror as the only pull host
    of docker.io and of ghcr.io: ``docker.io/library/busybox:latest`` and
    ``ghcr.io/org/app:v1`` both arrive, asked of the mirror with
    ``?ns=docker.io`` and ``?ns=ghcr.io``, each served from its own
    namespace's upstream.
    """
    mirror = two_namespaces.mirror
    hosts = daemons_folder / "certs.d"
    _hosts_toml(hosts, "docker.io", "https://registry-1.docker.io", mirror.host)
    _hosts_toml(hosts, "ghcr.io", "https://ghcr.io", mirror.host)
    busybox = catalog.busybox
    for reference in ("docker.io/library/busybox:latest", "ghcr.io/org/app:v1"):
        containerd.ctr(
            "images",
            "pull",
            "--hosts-dir",
            str(hosts),
            "--plain-http",
            "--snapshotter",
            "native",
            reference,
        )
    digests = _image_digests(containerd)
    assert digests.get("docker.io/library/busybox:latest") == busybox.root.digest
    assert digests.get("ghcr.io/org/app:v1") == APP.root.digest

    lines = mirror.log_lines()
    assert _access_lines(lines, r"/v2/library/busybox/manifests/latest\?ns=docker\.io")
    assert _access_lines(
        lines, rf"/v2/library/busybox/blobs/{busybox.layers[0].digest}\?ns=docker\.io"
    )
    assert _access_lines(lines, r"/v2/org/app/manifests/v1\?ns=ghcr\.io")
    assert _access_lines(
        lines, rf"/v2/org/app/blobs/{APP.layers[0].digest}\?ns=ghcr\.io"
    )
    assert two_namespaces.ghcr.count_blob_gets(APP.layers[0].digest) == 1
    assert two_namespaces.hub.count_blob_gets(busybox.layers[0].digest) == 1
    assert not [x for x in two_namespaces.hub_log() if "org/app" in x]
    assert not [x for x in two_namespaces.ghcr_log() if "busybox" in x]


def test_containerd_pulls_over_https_and_after_a_certificate_reload(
    daemons_folder: Path,
    containerd: ContainerdProcess,
    catalog: Catalog,
    tls_mirror: tuple[MirrorProcess, int],
) -> None:
    """
    ``ctr images pull`` (Go's TLS client) through the mirror's ``ssl:``
    listener, verifying its certificate against the CA named in
    ``hosts.toml``, gets the image; after new certificate files and a
    SIGHUP it pulls again, verifying the new certificate.
    """
    mirror, secure = tls_mirror
    host = f"{LOCALHOST}:{secure}"
    hosts = daemons_folder / "certs.d"
    image = catalog.small
    reference = f"{host}/{image.repository}:{image.tag}"

    def pull(generation: str) -> None:
        ca = daemons_folder / f"mirror-ca-{generation}.pem"
        ca.write_bytes((mirror.workdir / "cert.pem").read_bytes())
        (hosts / host).mkdir(parents=True, exist_ok=True)
        (hosts / host / "hosts.toml").write_text(
            f'server = "https://{host}"\n\n'
            f'[host."https://{host}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
            f"  ca = {json.dumps(str(ca))}\n"
        )
        containerd.ctr(
            "images",
            "pull",
            "--hosts-dir",
            str(hosts),
            "--snapshotter",
            "native",
            reference,
        )
        assert _image_digests(containerd).get(reference) == image.root.digest
        containerd.ctr("images", "rm", reference)

    pull("first")
    before = (mirror.workdir / "cert.pem").read_bytes()
    write_certificate(mirror.workdir)
    assert mirror._process is not None  # noqa: SLF001 (the harness keeps it)
    mirror._process.send_signal(signal.SIGHUP)  # noqa: SLF001
    poll_until(
        lambda: "certificate reloaded" in mirror.log(),
        timeout=10,
        describe=mirror.log,
    )
    assert (mirror.workdir / "cert.pem").read_bytes() != before
    pull("renewed")


# -- a namespace closed to anonymous clients ---------------------------------------

ALICE, ALICE_PASSWORD = "alice", "pw-alice-0c5e7a2d-lantern"


@pytest.fixture
def closed_ghcr(
    tmp_path: Path,
    skopeo: Skopeo,
    upstream: RegistryProcess,
    start_registry: Callable[..., RegistryProcess],
    start_mirror: Callable[..., MirrorProcess],
) -> TwoNamespaces:
    """
    :func:`two_namespaces` with ``[access] anonymous = 127.0.0.0/8``, alice
    in its htpasswd file, and ``anonymous = none`` for ghcr.io: docker.io is
    open to these clients, ghcr.io is alice's only.
    """
    ghcr = start_registry(storage=tmp_path / "ghcr-storage")
    skopeo.push_images(ghcr.host, [ghcr_app()], tmp_path / "ghcr-push")

    def config(port: int) -> str:
        namespaces = mirror_config_namespaces(
            port,
            {"hub": {"url": upstream.url}, "ghcr": {"url": ghcr.url}},
            {
                "docker.io": {"upstreams": "hub", "origin": "hub", "default": "true"},
                "ghcr.io": {
                    "upstreams": "ghcr",
                    "origin": "ghcr",
                    "hosts": GHCR_HOST,
                    "anonymous": "none",
                },
            },
        )
        return (
            f"{namespaces}\n[access]\nanonymous = 127.0.0.0/8\n"
            "htpasswd = users.htpasswd\n"
        )

    hashed = bcrypt.hashpw(ALICE_PASSWORD.encode(), bcrypt.gensalt(rounds=4))
    mirror = start_mirror(
        config, files={"users.htpasswd": f"{ALICE}:{hashed.decode()}\n"}
    )
    return TwoNamespaces(
        mirror, upstream, ghcr, len(upstream.access_log()), len(ghcr.access_log())
    )


def test_containerd_pulls_a_closed_namespace_by_ns_only_as_its_user(
    daemons_folder: Path,
    containerd: ContainerdProcess,
    catalog: Catalog,
    closed_ghcr: TwoNamespaces,
) -> None:
    """
    ``ctr images pull --hosts-dir`` (``?ns=``) on a mirror where docker.io is
    open and ghcr.io closed to anonymous clients: docker.io's busybox
    arrives anonymously; ghcr.io's ``org/app:v1`` does not, since the
    anonymous token containerd gets from the realm of the challenge
    (``/token?ns=ghcr.io``) opens nothing of ghcr.io, and nothing of it is
    asked upstream; with ``--user alice:...`` it arrives, its token asked
    at that realm.
    """
    mirror = closed_ghcr.mirror
    hosts = daemons_folder / "certs.d"
    _hosts_toml(hosts, "docker.io", "https://registry-1.docker.io", mirror.host)
    _hosts_toml(hosts, "ghcr.io", "https://ghcr.io", mirror.host)
    pull = [
        "images",
        "pull",
        "--hosts-dir",
        str(hosts),
        "--plain-http",
        "--snapshotter",
        "native",
    ]
    containerd.ctr(*pull, "docker.io/library/busybox:latest")
    assert (
        _image_digests(containerd).get("docker.io/library/busybox:latest")
        == catalog.busybox.root.digest
    )

    refused = containerd.ctr(*pull, "ghcr.io/org/app:v1", check=False)
    assert refused.returncode != 0, refused.stdout
    assert "ghcr.io/org/app:v1" not in _image_digests(containerd)
    assert not [x for x in closed_ghcr.ghcr_log() if "org/app" in x]
    lines = mirror.log_lines()
    assert _access_lines(lines, r"/token\?\S*ns=ghcr\.io\S*"), mirror.log()

    containerd.ctr(*pull, "--user", f"{ALICE}:{ALICE_PASSWORD}", "ghcr.io/org/app:v1")
    assert _image_digests(containerd).get("ghcr.io/org/app:v1") == APP.root.digest
    assert closed_ghcr.ghcr.count_blob_gets(APP.layers[0].digest) == 1
    assert ALICE_PASSWORD not in mirror.log()


def test_docker_daemon_on_a_partly_open_mirror(
    daemons_folder: Path,
    containerd: ContainerdProcess,
    catalog: Catalog,
    closed_ghcr: TwoNamespaces,
) -> None:
    """
    ``dockerd --registry-mirror`` on a mirror whose ``/v2/`` is challenged
    (ghcr.io is closed to anonymous clients): ``docker pull busybox`` gets
    an anonymous token for docker.io's ``library/busybox`` and the image;
    ``docker pull MIRROR/ghcr.io/org/app:v1`` (path prefix) is refused until
    ``docker login MIRROR`` as alice, then arrives.
    """
    mirror = closed_ghcr.mirror
    config = daemons_folder / "docker-config"
    dockerd = DockerdProcess(daemons_folder / "docker", containerd, mirror.host)
    dockerd.start()
    try:
        dockerd.docker("pull", "busybox")
        inspected = json.loads(dockerd.docker("image", "inspect", "busybox").stdout)
        assert inspected[0]["Id"] == catalog.busybox.blobs[0].digest

        app = f"{mirror.host}/ghcr.io/{APP.reference}"
        refused = dockerd.docker("--config", str(config), "pull", app, check=False)
        assert refused.returncode != 0, refused.stdout
        assert not [x for x in closed_ghcr.ghcr_log() if "org/app" in x]
        dockerd.docker(
            "--config",
            str(config),
            "login",
            "--username",
            ALICE,
            "--password",
            ALICE_PASSWORD,
            mirror.host,
        )
        dockerd.docker("--config", str(config), "pull", app)
        inspected = json.loads(dockerd.docker("image", "inspect", app).stdout)
        assert inspected[0]["Id"] == APP.blobs[0].digest
    finally:
        died = dockerd.returncode
        dockerd.stop()
    assert died is None, f"dockerd died during the test:\n{dockerd.log()}"
