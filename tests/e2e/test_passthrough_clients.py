"""
``credentials = passthrough`` with the real container clients: the Docker
daemon through ``registry-mirrors`` (the Docker Hub login the CLI hands
it) and by path prefix after ``docker login MIRROR``, and containerd's
``ctr`` with ``--user`` (its ``POST /token``, then ``GET``) and with the
``Authorization`` header of a ``hosts.toml``.  The upstream is
``docker-registry`` with token auth and the tests' issuer, granting alice
``test/small`` and bob nothing; the mirror logs JSON lines, where no
password may appear either.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .containers import Podman
from .daemons import ContainerdProcess, DockerdProcess
from .harness import MirrorProcess, RegistryProcess
from .images import Catalog
from .servers import TokenIssuer, write_token_signing_pair
from .test_clients import containerd, daemons_folder  # noqa: F401 (fixtures)
from .test_passthrough import (
    ALICE,
    BOB,
    ISSUER_ACCOUNT,
    NAMESPACE,
    WRONG,
    passthrough_config,
    write_grants,
)
from .test_upstream_auth import start_token_registry

#: one at a time with the other daemon tests (they share /run/docker)
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("daemons")]

#: what ``docker login`` writes for Docker Hub, which the CLI hands dockerd
#: with every pull of a Docker Hub image (``registry-mirrors`` included)
DOCKER_HUB = "https://index.docker.io/v1/"


def docker_config(folder: Path, server: str, pair: tuple[str, str]) -> Path:
    """A docker CLI configuration holding *pair* for *server*, as ``docker
    login`` stores it (this test's dockerd cannot reach Docker Hub to log
    in there for real)."""
    folder.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(":".join(pair).encode()).decode()
    (folder / "config.json").write_text(json.dumps({"auths": {server: {"auth": auth}}}))
    return folder


def hosts_toml(folder: Path, mirror: str, authorization: str | None = None) -> Path:
    """``hosts.toml`` sending :data:`NAMESPACE`'s pulls to *mirror* only."""
    (folder / NAMESPACE).mkdir(parents=True, exist_ok=True)
    header = ""
    if authorization is not None:
        header = (
            f'  [host."http://{mirror}".header]\n'
            f'    Authorization = "{authorization}"\n'
        )
    (folder / NAMESPACE / "hosts.toml").write_text(
        f'server = "https://{NAMESPACE}"\n\n'
        f'[host."http://{mirror}"]\n'
        '  capabilities = ["pull", "resolve"]\n' + header
    )
    return folder


def json_records(mirror: MirrorProcess) -> list[dict[str, Any]]:
    """The events of the mirror's JSON log (twistd's standard output)."""
    lines = mirror.output_path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_docker_and_containerd_pull_private_images_with_their_own_credentials(
    tmp_path: Path,
    daemons_folder: Path,  # noqa: F811
    containerd: ContainerdProcess,  # noqa: F811
    catalog: Catalog,
    start_program: Callable[[TokenIssuer], TokenIssuer],
    start_registry: Callable[..., RegistryProcess],
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    dockerd (``registry-mirrors``, the mirror's default namespace): with
    alice's Docker Hub login ``docker pull test/small`` yields the image
    (its config digest is the image ID); with bob's it fails, nothing of
    the image asked upstream with a grant.  By path prefix: ``docker
    login MIRROR`` as alice, then ``docker pull
    MIRROR/registry.test/test/small`` arrives; ``docker login`` with a
    wrong password is refused (``/token`` asks the upstream's realm).
    ``ctr images pull --user alice:…`` arrives (``POST /token`` answered
    so that containerd falls back to ``GET``), ``--user bob:…`` does not;
    the ``hosts.toml`` header with alice's Basic credentials arrives too.
    ``podman pull --creds`` by path prefix: bob's refused, alice's arrives.
    No password in the mirror's JSON log, its cache, or any answer.
    """
    image = catalog.small
    grants = tmp_path / "grants.json"
    write_grants(grants, [image.repository])
    signing = write_token_signing_pair(tmp_path / "signing")
    issuer = start_program(
        TokenIssuer(tmp_path / "issuer", signing, *ISSUER_ACCOUNT, grants)
    )
    registry = start_token_registry(start_registry, issuer, signing)
    mirror = start_mirror(
        lambda port: passthrough_config(port, registry.url),
        logger="regmirror.logs.json_lines",
    )
    dockerd = DockerdProcess(daemons_folder / "docker", containerd, mirror.host)
    dockerd.start()
    try:
        # registry-mirrors: the Docker Hub login goes to the mirror's /token.
        alice_hub = docker_config(tmp_path / "alice-hub", DOCKER_HUB, ALICE)
        dockerd.docker("--config", str(alice_hub), "pull", image.reference)
        inspected = json.loads(
            dockerd.docker("image", "inspect", image.reference).stdout
        )
        assert inspected[0]["Id"] == image.blobs[0].digest
        dockerd.docker("rmi", image.reference)

        bob_hub = docker_config(tmp_path / "bob-hub", DOCKER_HUB, BOB)
        refused = dockerd.docker(
            "--config", str(bob_hub), "pull", image.reference, check=False
        )
        assert refused.returncode != 0, refused.stdout
        bobs = [r for r in issuer.token_requests() if r["user"] == BOB[0]]
        assert bobs and all(r["granted"] == [] for r in bobs), bobs

        # Path prefix, after docker login MIRROR (the CLI stores it).
        logins = tmp_path / "logins"
        wrong = dockerd.docker(
            "--config",
            str(logins),
            "login",
            "--username",
            WRONG[0],
            "--password",
            WRONG[1],
            mirror.host,
            check=False,
        )
        assert wrong.returncode != 0, wrong.stdout
        dockerd.docker(
            "--config",
            str(logins),
            "login",
            "--username",
            ALICE[0],
            "--password",
            ALICE[1],
            mirror.host,
        )
        prefixed = f"{mirror.host}/{NAMESPACE}/{image.reference}"
        dockerd.docker("--config", str(logins), "pull", prefixed)
        inspected = json.loads(dockerd.docker("image", "inspect", prefixed).stdout)
        assert inspected[0]["Id"] == image.blobs[0].digest
    finally:
        died = dockerd.returncode
        dockerd.stop()
    assert died is None, f"dockerd died during the test:\n{dockerd.log()}"

    # containerd: --user, through the mirror's /token (POST, then GET).
    hosts = hosts_toml(daemons_folder / "certs.d", mirror.host)
    pull = ["images", "pull", "--hosts-dir", str(hosts), "--plain-http"]
    pull += ["--snapshotter", "native"]
    reference = f"{NAMESPACE}/{image.reference}"
    refused_ctr = containerd.ctr(*pull, "--user", ":".join(BOB), reference, check=False)
    assert refused_ctr.returncode != 0, refused_ctr.stdout
    containerd.ctr(*pull, "--user", ":".join(ALICE), reference)
    listed = containerd.ctr("images", "ls", "-q").stdout.split()
    assert reference in listed
    # containerd POSTs its credentials to /token first; the mirror's 405
    # makes it fall back to GET with Basic, which the mirror answers.
    tokens = [
        (r["method"], r["status"], r["user"])
        for r in json_records(mirror)
        if r.get("logger") == "regmirror.access"
        and str(r.get("uri", "")).startswith("/token?")
    ]
    assert ("POST", 405, "-") in tokens, tokens
    assert ("GET", 200, "passthrough") in tokens, tokens

    # containerd: Basic credentials in hosts.toml, no --user.
    containerd.ctr("images", "rm", reference)
    basic = "Basic " + base64.b64encode(":".join(ALICE).encode()).decode()
    header_hosts = hosts_toml(daemons_folder / "certs-header.d", mirror.host, basic)
    containerd.ctr(*pull[:2], "--hosts-dir", str(header_hosts), *pull[4:], reference)
    assert reference in containerd.ctr("images", "ls", "-q").stdout.split()

    # podman: --creds, by path prefix (the same library as skopeo, its own
    # store: bob is refused, alice's pull arrives).
    podman = Podman(tmp_path / "podman")
    try:
        prefixed = f"{mirror.host}/{NAMESPACE}/{image.reference}"
        podman_pull = ["pull", "--tls-verify=false", "--quiet"]
        refused_podman = podman.run(
            *podman_pull, "--creds", ":".join(BOB), prefixed, check=False
        )
        assert refused_podman.returncode != 0, refused_podman.stdout
        podman.run(*podman_pull, "--creds", ":".join(ALICE), prefixed)
        found = podman.run("image", "inspect", "--format", "{{.Id}}", prefixed)
        assert found.stdout.strip() == image.blobs[0].digest.split(":")[1]
    finally:
        podman.close()

    # No secret in the JSON log (every field of every event), nor the cache.
    assert len(json_records(mirror)) > 20, "the mirror wrote no JSON lines"
    log = mirror.log()
    for _, password in (ALICE, BOB, WRONG):
        assert password not in log
        for path in mirror.cache_dir.rglob("*"):
            if path.is_file():
                assert password.encode() not in path.read_bytes(), path
    assert base64.b64encode(":".join(ALICE).encode()).decode() not in log
