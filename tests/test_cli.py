"""The ``regmirror`` operator command: config checks and cache care."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from memory import result

from regmirror.cli import main
from regmirror.reference import Digest
from regmirror.store import Store

CONFIG = """\
[server]
listen = tcp:0:interface=127.0.0.1

[cache]
directory = cache
max_size = 3000

[upstream:hub]
url = https://registry-1.docker.io

[namespace:docker.io]
upstreams = hub
default = true
max_stale = 1d
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mirror.ini"
    path.write_text(CONFIG)
    return path


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out)
    return code, out.getvalue()


def filled(config: Path) -> tuple[Store, Digest, Digest]:
    """A cache with a manifest, a blob and a tag record."""
    store = Store(str(config.parent / "cache"))
    store.open()
    body = b'{"schemaVersion":2,"layers":[]}'
    manifest = Digest.of(body)
    store.put_manifest(manifest, "application/vnd.oci.image.manifest.v1+json", body)
    blob = Digest.of(b"layer" * 100)
    spool = store.spool(blob)
    spool.write(b"layer" * 100)
    spool.commit()
    store.set_tag("docker.io", "library/busybox", "latest", manifest, confirmed=0.0)
    return store, manifest, blob


def test_check_config_ok_and_json(config: Path) -> None:
    """check-config validates as start-up does and reports in JSON on request."""
    code, text = run("check-config", "-c", str(config))
    assert code == 0 and "ok (1 namespaces, 1 upstreams)" in text
    code, text = run("check-config", "-c", str(config), "--json")
    document = json.loads(text)
    assert code == 0 and document["ok"] is True
    assert document["namespaces"] == ["docker.io"]


def test_check_config_failure_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad config is exit status 1 and the same one-line message."""
    bad = tmp_path / "bad.ini"
    bad.write_text(CONFIG.replace("upstreams = hub", "upstreams = nowhere"))
    code, _ = run("check-config", "-c", str(bad))
    assert code == 1
    assert "[namespace:docker.io] upstreams: no [upstream:nowhere] section" in (
        capsys.readouterr().err
    )
    code, text = run("check-config", "-c", str(bad), "--json")
    assert code == 1 and json.loads(text)["ok"] is False


def test_check_config_refuses_a_namespace_anonymous_without_access(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A namespace closed with ``anonymous = none`` in a file without
    ``[access]`` (which would be open to everyone) fails check-config with
    exit status 1 and one line naming the file, the section and the key."""
    bad = tmp_path / "closed.ini"
    bad.write_text(CONFIG + "anonymous = none\n")
    code, _ = run("check-config", "-c", str(bad))
    assert code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], lines
    assert "[namespace:docker.io] anonymous: " in lines[0]


def test_cache_stats_and_ls(config: Path) -> None:
    """stats counts what is cached; ls lists tag records."""
    _, manifest, _ = filled(config)
    code, text = run("cache", "stats", "-c", str(config), "--json")
    stats = json.loads(text)
    assert code == 0
    assert (stats["manifests"], stats["blobs"], stats["tags"]) == (
        1,
        1,
        {"docker.io": 1},
    )
    assert stats["bytes"] == 500 + len(b'{"schemaVersion":2,"layers":[]}')
    code, text = run("cache", "ls", "-c", str(config))
    assert f"docker.io/library/busybox:latest  {manifest}" in text


def test_cache_purge_digest_and_tag(config: Path) -> None:
    """purge removes a digest, and a tag record named as the client would."""
    store, _, blob = filled(config)
    code, text = run(
        "cache",
        "purge",
        "-c",
        str(config),
        str(blob),
        "busybox:latest",
        "nothere:latest",
    )
    assert code == 0
    assert f"removed {blob}" in text and "removed busybox:latest" in text
    assert "not cached: nothere:latest" in text
    assert store.blob_size(blob) is None
    assert store.tag("docker.io", "library/busybox", "latest") is None


def test_cache_verify_removes_corruption(config: Path) -> None:
    """verify re-hashes everything and removes a file corrupted on disk;
    having found one, it exits 1 (for cron and monitoring); run again on
    the repaired cache, 0."""
    store, _, blob = filled(config)
    with open(store.blob_path(blob), "r+b") as f:
        f.write(b"X")
    code, text = run("cache", "verify", "-c", str(config), "--json")
    result = json.loads(text)
    assert code == 1 and result["ok"] is False
    assert result["checked"] == 2 and result["corrupt"] == [str(blob)]
    assert not os.path.exists(store.blob_path(blob))
    code, text = run("cache", "verify", "-c", str(config))
    assert code == 0 and "1 files checked, 0 corrupt" in text


def test_check_config_changes_nothing(config: Path, tmp_path: Path) -> None:
    """check-config does not create the cache folder (start-up does), nor
    leaves anything where it asked whether it could, but says when it
    could not be created."""
    before = sorted(os.listdir(config.parent))
    code, _ = run("check-config", "-c", str(config))
    assert code == 0
    assert not (config.parent / "cache").exists()
    assert sorted(os.listdir(config.parent)) == before
    (tmp_path / "blocker").write_text("a file, not a folder")
    config.write_text(CONFIG.replace("directory = cache", "directory = blocker/c"))
    code, _ = run("check-config", "-c", str(config), "--json")
    assert code == 1


def test_cache_gc_evicts_and_expires(config: Path) -> None:
    """gc brings the cache under max_size and expires tag records older than
    max_stale."""
    store, _, _ = filled(config)
    big = Digest.of(b"z" * 4000)
    spool = store.spool(big)
    spool.write(b"z" * 4000)
    spool.commit()
    os.utime(store.blob_path(big), (1, 1))
    code, text = run("cache", "gc", "-c", str(config), "--json")
    result = json.loads(text)
    assert code == 0
    assert result["evicted"] == [str(big)]
    assert result["expired_tags"] == 1


def test_help_lists_the_commands() -> None:
    """--help documents every command."""
    with pytest.raises(SystemExit) as exit:
        run("--help")
    assert exit.value.code == 0


def test_prefetch_refuses_a_bad_mirror_url(config: Path) -> None:
    """prefetch needs an http(s) URL."""
    code, text = run("prefetch", "--mirror", "ftp://x", "busybox", "--json")
    assert code == 1 and "http(s) URL" in json.loads(text)["error"]


def test_in_process_prefetch_mirror_answers_its_owner_only() -> None:
    """``prefetch -c`` serves every namespace without the access rules, so
    its loopback mirror answers only requests carrying the run's secret."""
    from treq.testing import StubTreq
    from twisted.web.resource import Resource
    from twisted.web.static import Data

    from regmirror.prefetch import PREFETCH_HEADER, _OwnerOnly

    inner = Resource()
    inner.putChild(b"v2", Data(b"{}", "application/json"))
    client = StubTreq(_OwnerOnly(inner, "s3cret"))

    def status(headers: dict[str, str]) -> int:
        d = client.get("http://127.0.0.1/v2", headers=headers)
        client.flush()
        code: int = result(d).code
        return code

    assert status({}) == 404
    assert status({PREFETCH_HEADER: "guess"}) == 404
    assert status({PREFETCH_HEADER: "s3cret"}) == 200
