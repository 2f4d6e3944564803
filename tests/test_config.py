"""
Tests for :mod:`regmirror.ini` and :mod:`regmirror.config`: reading the INI
file into frozen values, and one-line errors that name the file, the section
and the key.
"""

from __future__ import annotations

import datetime
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from regmirror.config import DEFAULT_LISTEN, ConfigError
from regmirror.ini import load
from regmirror.ini_values import (
    parse_duration,
    parse_upstream_url,
    resolve_endpoint_paths,
)

FULL = """\
[server]
listen = tcp:5000
    ssl:5443:privateKey=key.pem:certKey=/abs/cert.pem
workers = 1

[cache]
directory = data
tag_ttl = 2m

[upstream:dockerhub]
url = https://registry-1.docker.io
connect_timeout = 5s
response_timeout = 1m
idle_timeout = 250ms

[upstream:aliyun]
url = https://example.mirror.aliyuncs.com/

[upstream:ghcr]
url = HTTPS://GHCR.IO:443

[namespace:docker.io]
aliases = index.docker.io registry-1.docker.io
upstreams = aliyun dockerhub
default = true
hosts = docker.mirror.example

[namespace:ghcr.io]
upstreams = ghcr dockerhub
origin = ghcr
"""

#: The smallest valid file: the base that error cases add to or change.
MINIMAL = """\
[cache]
directory = data

[upstream:hub]
url = https://registry-1.docker.io

[namespace:docker.io]
upstreams = hub
default = true
"""


def _write(directory: Path, text: str, name: str = "mirror.ini") -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


# -- a valid file ---------------------------------------------------------------


def test_load_full_config(tmp_path: Path) -> None:
    """Every key of a full file is read into the config values."""
    path = _write(tmp_path, FULL)
    config = load(path)

    assert config.path == path
    assert config.server.listen == (
        "tcp:5000",
        f"ssl:5443:privateKey={tmp_path / 'key.pem'}:certKey=/abs/cert.pem",
    )
    assert config.server.workers == 1
    assert config.cache.tag_ttl == 120.0

    assert set(config.upstreams) == {"dockerhub", "aliyun", "ghcr"}
    hub = config.upstreams["dockerhub"]
    assert hub.url == "https://registry-1.docker.io"
    assert (hub.connect_timeout, hub.response_timeout, hub.idle_timeout) == (
        5.0,
        60.0,
        0.25,
    )
    assert config.upstreams["aliyun"].url == "https://example.mirror.aliyuncs.com"
    assert config.upstreams["ghcr"].url == "https://ghcr.io:443"
    ghcr = config.upstreams["ghcr"]
    assert (ghcr.connect_timeout, ghcr.response_timeout, ghcr.idle_timeout) == (
        10.0,
        30.0,
        60.0,
    )

    docker, github = config.namespaces
    assert docker.name == "docker.io"
    assert docker.aliases == ("index.docker.io", "registry-1.docker.io")
    assert docker.upstreams == ("aliyun", "dockerhub")
    assert docker.default is True
    assert docker.hosts == ("docker.mirror.example",)
    assert github.name == "ghcr.io"
    assert github.upstreams == ("ghcr", "dockerhub")
    assert github.origin == "ghcr"
    assert github.default is False
    assert github.aliases == ()
    assert github.hosts == ()
    assert config.default_namespace == docker


def test_relative_cache_directory_resolved_against_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A relative ``[cache] directory`` means the folder next to the config file,
    whatever the working directory.
    """
    etc = tmp_path / "etc"
    etc.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load(_write(etc, MINIMAL.replace("= data", "= ./cache/../data")))
    assert config.cache.directory == str(etc / "data")


def test_relative_config_path_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config named by a relative path still resolves against its own folder."""
    _write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    config = load("mirror.ini")
    assert config.path == str(tmp_path / "mirror.ini")
    assert config.cache.directory == str(tmp_path / "data")


def test_absolute_cache_directory_kept(tmp_path: Path) -> None:
    """An absolute ``[cache] directory`` is used as written."""
    config = load(_write(tmp_path, MINIMAL.replace("= data", "= /var/cache/rm")))
    assert config.cache.directory == "/var/cache/rm"


def test_defaults(tmp_path: Path) -> None:
    """A minimal file gets the documented defaults."""
    config = load(_write(tmp_path, MINIMAL))
    assert config.server.listen == DEFAULT_LISTEN == ("tcp:5000",)
    assert config.server.workers == 1
    assert config.cache.tag_ttl == 60.0


def test_library_default_true_for_docker_io(tmp_path: Path) -> None:
    """``library`` defaults to true for a namespace named docker.io."""
    config = load(_write(tmp_path, MINIMAL))
    assert config.namespaces[0].library is True


def test_library_default_true_for_docker_io_alias(tmp_path: Path) -> None:
    """``library`` defaults to true for a namespace with the alias docker.io."""
    text = MINIMAL.replace("[namespace:docker.io]", "[namespace:hub.example]")
    text += "aliases = docker.io\n"
    config = load(_write(tmp_path, text))
    assert config.namespaces[0].name == "hub.example"
    assert config.namespaces[0].library is True


def test_library_default_false_elsewhere(tmp_path: Path) -> None:
    """``library`` defaults to false for any other namespace."""
    text = MINIMAL.replace("[namespace:docker.io]", "[namespace:ghcr.io]")
    config = load(_write(tmp_path, text))
    assert config.namespaces[0].library is False


def test_library_explicit(tmp_path: Path) -> None:
    """An explicit ``library = false`` overrides the docker.io default."""
    config = load(_write(tmp_path, MINIMAL + "library = false\n"))
    assert config.namespaces[0].library is False


def test_origin_defaults_to_last_upstream(tmp_path: Path) -> None:
    """Without ``origin``, the last upstream listed decides what tags mean."""
    text = MINIMAL.replace(
        "[upstream:hub]",
        "[upstream:near]\nurl = http://10.0.0.1:5000\n\n[upstream:hub]",
    ).replace("upstreams = hub", "upstreams = near hub")
    namespace = load(_write(tmp_path, text)).namespaces[0]
    assert namespace.upstreams == ("near", "hub")
    assert namespace.origin == "hub"


def test_upstreams_on_several_lines(tmp_path: Path) -> None:
    """Lists may be split over continuation lines."""
    text = MINIMAL.replace(
        "[upstream:hub]",
        "[upstream:near]\nurl = http://10.0.0.1:5000\n\n[upstream:hub]",
    ).replace("upstreams = hub", "upstreams =\n    near\n    hub")
    assert load(_write(tmp_path, text)).namespaces[0].upstreams == ("near", "hub")


def test_zero_tag_ttl_allowed(tmp_path: Path) -> None:
    """``tag_ttl = 0s`` (ask the origin every time) is allowed."""
    config = load(_write(tmp_path, MINIMAL.replace("= data", "= data\ntag_ttl = 0s")))
    assert config.cache.tag_ttl == 0.0


def test_comments_ignored(tmp_path: Path) -> None:
    """Whole-line ``;`` and ``#`` comments are ignored."""
    config = load(_write(tmp_path, "; a comment\n# another\n" + MINIMAL))
    assert config.namespaces[0].name == "docker.io"


# -- errors ---------------------------------------------------------------------


def _error(path: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value


def _assert_located(
    error: ConfigError, path: str, section: str | None, key: str | None
) -> None:
    text = str(error)
    assert "\n" not in text and "\r" not in text, text
    assert os.path.abspath(path) in text, text
    # Words for people, not Python's (int("two") says "invalid literal").
    assert "invalid literal" not in text and "could not convert" not in text, text
    if section is not None:
        assert f"[{section}]" in text, text
    if key is not None:
        assert key in text, text


@pytest.mark.parametrize(
    ("extra", "section", "key"),
    [
        pytest.param("[bogus]\nx = 1\n", "bogus", None, id="unknown-section"),
        pytest.param("[server]\nlisten_on = tcp:1\n", "server", "listen_on", id="key"),
        pytest.param("[server]\nworkers = 65\n", "server", "workers", id="workers-65"),
        pytest.param("[server]\nworkers = 0\n", "server", "workers", id="workers-0"),
        pytest.param(
            "[server]\nworkers = many\n", "server", "workers", id="workers-nan"
        ),
        # int() and float() take digits of any script: a config's are ASCII.
        pytest.param(
            "[server]\nworkers = \u0662\n", "server", "workers", id="workers-arabic"
        ),
        pytest.param(
            "[server]\nworkers = \uff12\n", "server", "workers", id="workers-fullwidth"
        ),
        pytest.param(
            "[server]\nworkers = \u00b2\n",
            "server",
            "workers",
            id="workers-superscript",
        ),
        pytest.param(
            "[namespace:ghcr.io]\nupstreams = hub\nprefetch = \u0663\n",
            "namespace:ghcr.io",
            "prefetch",
            id="prefetch-arabic",
        ),
        pytest.param(
            "[upstream:x]\nurl = https://x.example\nbreaker_failures = \u0665\n",
            "upstream:x",
            "breaker_failures",
            id="breaker-failures-arabic",
        ),
        pytest.param(
            "[upstream:x]\nurl = https://x.example\nconnect_timeout = \u0665s\n",
            "upstream:x",
            "connect_timeout",
            id="duration-arabic",
        ),
        pytest.param(
            "[upstream:x]\nurl = https://x.example\nconnect_timeout = 1.\u0665s\n",
            "upstream:x",
            "connect_timeout",
            id="duration-fraction-arabic",
        ),
        pytest.param(
            "[cluster]\nredis = redis://r/\u0661\nadvertise = http://n:5000\n",
            "cluster",
            "redis",
            id="redis-db-arabic",
        ),
        # An empty listen would be the default, every interface's port 5000.
        pytest.param("[server]\nlisten =\n", "server", "listen", id="listen-empty"),
        pytest.param("[server]\nlisten =   \n", "server", "listen", id="listen-blank"),
        pytest.param(
            "[server]\nlisten =\n    \n", "server", "listen", id="listen-blank-lines"
        ),
        pytest.param(
            "[upstream:x]\nurl = ftp://x\n", "upstream:x", "url", id="url-ftp"
        ),
        pytest.param(
            "[upstream:x]\nurl = https://x.example/v2\n",
            "upstream:x",
            "url",
            id="url-path",
        ),
        pytest.param(
            "[upstream:x]\nurl = https://x.example?a=b\n",
            "upstream:x",
            "url",
            id="url-query",
        ),
        pytest.param(
            "[upstream:x]\nurl = https://alice:secret@x.example\n",
            "upstream:x",
            "url",
            id="url-credentials",
        ),
        pytest.param(
            "[upstream:x]\nurl = https://alice@x.example\n",
            "upstream:x",
            "url",
            id="url-user",
        ),
        pytest.param(
            "[upstream:x]\nurl = https://x.example:99999\n",
            "upstream:x",
            "url",
            id="url-port",
        ),
        pytest.param(
            "[upstream:x]\nurl = https://\n", "upstream:x", "url", id="url-no-host"
        ),
        pytest.param("[upstream:x]\n", "upstream:x", "url", id="url-missing"),
        pytest.param(
            "[upstream:x]\nurl = https://x.example\nconnect_timeout = soon\n",
            "upstream:x",
            "connect_timeout",
            id="bad-duration",
        ),
        pytest.param(
            "[upstream:x]\nurl = https://x.example\nidle_timeout = 0s\n",
            "upstream:x",
            "idle_timeout",
            id="zero-timeout",
        ),
        pytest.param(
            "[upstream:x]\nurl = https://x.example\nresponse_timeout = -5s\n",
            "upstream:x",
            "response_timeout",
            id="negative-timeout",
        ),
        pytest.param(
            "[upstream:x]\nurl = https://x.example\npassword = hunter2\n",
            "upstream:x",
            "password",
            id="upstream-unknown-key",
        ),
        pytest.param(
            "[namespace:ghcr.io]\nupstreams = nowhere\n",
            "namespace:ghcr.io",
            "upstreams",
            id="unknown-upstream",
        ),
        pytest.param(
            "[namespace:ghcr.io]\nupstreams = hub\norigin = other\n",
            "namespace:ghcr.io",
            "origin",
            id="origin-not-listed",
        ),
        pytest.param(
            "[namespace:ghcr.io]\nupstreams = hub hub\n",
            "namespace:ghcr.io",
            "upstreams",
            id="upstream-twice",
        ),
        pytest.param(
            "[namespace:ghcr.io]\n", "namespace:ghcr.io", "upstreams", id="no-upstreams"
        ),
        pytest.param(
            "[namespace:ghcr.io]\nupstreams = hub\ndefault = maybe\n",
            "namespace:ghcr.io",
            "default",
            id="bad-bool",
        ),
        pytest.param(
            "[namespace:ghcr.io]\nupstreams = hub\ndefault = true\n",
            "namespace:ghcr.io",
            "default",
            id="two-defaults",
        ),
        pytest.param(
            "[namespace:ghcr.io]\nupstreams = hub\naliases = index.docker.io\n"
            "[namespace:quay.io]\nupstreams = hub\naliases = index.docker.io\n",
            "namespace:quay.io",
            "aliases",
            id="duplicate-alias",
        ),
        pytest.param(
            "[namespace:ghcr.io]\nupstreams = hub\naliases = docker.io\n",
            "namespace:ghcr.io",
            "aliases",
            id="alias-is-other-namespace",
        ),
        pytest.param(
            "[namespace:ghcr.io]\nupstreams = hub\naliases = not_a_host!\n",
            "namespace:ghcr.io",
            "aliases",
            id="bad-alias",
        ),
        pytest.param(
            "[namespace:ghcr.io]\nupstreams = hub\nhosts = a.example\n"
            "[namespace:quay.io]\nupstreams = hub\nhosts = a.example\n",
            "namespace:quay.io",
            "hosts",
            id="duplicate-host",
        ),
        pytest.param(
            "[namespace:ghcr.io]\nupstreams = hub\nanonymous = nobody\n",
            "namespace:ghcr.io",
            "anonymous",
            id="namespace-bad-anonymous",
        ),
        pytest.param(
            "[access]\nhtpasswd = missing.htpasswd\n",
            "access",
            "htpasswd",
            id="access-missing-htpasswd",
        ),
        pytest.param(
            "[cluster]\nadvertise = http://10.0.0.5:5000\n",
            "cluster",
            "redis",
            id="cluster-no-redis",
        ),
        pytest.param(
            "[cluster]\nredis = redis://r\n", "cluster", "advertise", id="no-advertise"
        ),
        pytest.param(
            "[cluster]\nredis = redis://:hunter2@r\nadvertise = http://n:5000\n",
            "cluster",
            "redis",
            id="redis-password-in-url",
        ),
        pytest.param(
            "[cluster]\nredis = http://r\nadvertise = http://n:5000\n",
            "cluster",
            "redis",
            id="redis-scheme",
        ),
        pytest.param(
            "[cluster]\nredis = redis://r\nadvertise = http://n:5000/x\n",
            "cluster",
            "advertise",
            id="advertise-path",
        ),
        pytest.param(
            "[cluster]\nredis = redis://r\nadvertise = http://n\nlease_ttl = 0\n",
            "cluster",
            "lease_ttl",
            id="lease-ttl-zero",
        ),
        pytest.param(
            "[cluster]\nredis = redis://r\nadvertise = http://n\npeers = a b\n",
            "cluster",
            "peers",
            id="cluster-unknown-key",
        ),
    ],
)
def test_errors_name_file_section_key(
    tmp_path: Path, extra: str, section: str, key: str | None
) -> None:
    """
    Each problem is a ConfigError whose text is one line naming the file,
    the ``[section]`` and the key.
    """
    path = _write(tmp_path, MINIMAL + "\n" + extra)
    _assert_located(_error(path), path, section, key)


@pytest.mark.parametrize(
    ("old", "new", "section", "key"),
    [
        pytest.param(
            "= data", "= data\ntag_ttl = 1 week", "cache", "tag_ttl", id="bad-ttl"
        ),
        pytest.param(
            "= data", "= data\nmax_size = lots", "cache", "max_size", id="max-size"
        ),
        pytest.param(
            "= data",
            "= data\nmax_size = \u0665GiB",
            "cache",
            "max_size",
            id="max-size-arabic",
        ),
        pytest.param(
            "= data",
            "= data\nmin_free = \uff15",
            "cache",
            "min_free",
            id="min-free-fullwidth",
        ),
        pytest.param(
            "directory = data", "tag_ttl = 1m", "cache", "directory", id="no-directory"
        ),
        pytest.param(
            "directory = data",
            "directory =",
            "cache",
            "directory",
            id="empty-directory",
        ),
        pytest.param(
            "url = https://registry-1.docker.io",
            "url = https://a.example\nurl = https://b.example",
            "upstream:hub",
            "url",
            id="duplicate-key",
        ),
        pytest.param(
            "url = https://registry-1.docker.io",
            "url = https://a.example\nURL = https://b.example",
            "upstream:hub",
            "url",
            id="duplicate-key-other-case",
        ),
        # Patterns no name can match: fnmatch takes an open "[" literally,
        # so "deny" refused nothing (found by the fresh-eyes review).
        *(
            pytest.param(
                "default = true",
                f"default = true\n{key} = {pattern}",
                "namespace:docker.io",
                key,
                id=f"{key}-{pattern}",
            )
            for key, pattern in [
                ("deny", "myorg/app-debu[g"),
                ("deny", "library/[]"),
                ("allow", "library/[!]"),
                ("allow", "library/[a-"),
                ("allow", "/library/*"),
                ("deny", "library//x"),
                ("deny", "library/"),
                ("allow", "busybox"),
                ("immutable_tags", "v[0-9"),
                ("immutable_tags", "["),
                ("immutable_tags", "v1]"),
            ]
        ),
        pytest.param(
            "default = true",
            "default = true\nkeep_warm_interval = 1ms",
            "namespace:docker.io",
            "keep_warm_interval",
            id="keep-warm-interval-too-short",
        ),
        pytest.param(
            "default = true",
            "default = true\nkeep_warm = docker.io/library/nginx:latest",
            "namespace:docker.io",
            "keep_warm",
            id="keep-warm-with-the-namespace",
        ),
    ],
)
def test_errors_in_minimal_sections(
    tmp_path: Path, old: str, new: str, section: str, key: str
) -> None:
    """Changing one key of a valid file gives a located one-line ConfigError."""
    path = _write(tmp_path, MINIMAL.replace(old, new))
    _assert_located(_error(path), path, section, key)


def test_missing_cache_section(tmp_path: Path) -> None:
    """A file without ``[cache]`` names ``[cache] directory`` as required."""
    path = _write(tmp_path, MINIMAL.replace("[cache]\ndirectory = data\n", ""))
    _assert_located(_error(path), path, "cache", "directory")


def test_duplicate_section(tmp_path: Path) -> None:
    """A section given twice is an error naming that section."""
    path = _write(tmp_path, MINIMAL + "\n[cache]\ntag_ttl = 1m\n")
    _assert_located(_error(path), path, "cache", None)


def test_no_default_namespace(tmp_path: Path) -> None:
    """Without any ``default = true`` the error names a namespace's
    section and the ``default`` key (it named neither)."""
    path = _write(tmp_path, MINIMAL.replace("default = true\n", ""))
    error = _error(path)
    _assert_located(error, path, "namespace:docker.io", "default")
    assert "namespace" in str(error)


def test_no_namespace(tmp_path: Path) -> None:
    """A file without any namespace section is an error."""
    text = MINIMAL.split("[namespace:")[0]
    path = _write(tmp_path, text)
    error = _error(path)
    _assert_located(error, path, None, None)
    assert "namespace" in str(error)


def test_namespace_not_a_host_name(tmp_path: Path) -> None:
    """A namespace must be named by a registry host name."""
    path = _write(tmp_path, MINIMAL + "\n[namespace:Not_A_Host!]\nupstreams = hub\n")
    _assert_located(_error(path), path, "namespace:Not_A_Host!", None)


def test_bad_upstream_section_name(tmp_path: Path) -> None:
    """An ``[upstream:]`` with an empty or odd name is refused."""
    path = _write(tmp_path, MINIMAL + "\n[upstream:]\nurl = https://x.example\n")
    _assert_located(_error(path), path, "upstream:", None)


def test_missing_file(tmp_path: Path) -> None:
    """A file that does not exist gives a one-line ConfigError naming it."""
    path = str(tmp_path / "absent.ini")
    _assert_located(_error(path), path, None, None)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """A path naming a directory gives a one-line ConfigError naming it."""
    _assert_located(_error(str(tmp_path)), str(tmp_path), None, None)


def test_not_utf8(tmp_path: Path) -> None:
    """
    A file that is not UTF-8 (here Latin-1 in a comment) cannot be read: a
    one-line ConfigError naming it, not a UnicodeDecodeError.
    """
    path = tmp_path / "mirror.ini"
    path.write_bytes(b"; caf\xe9\n" + MINIMAL.encode())
    _assert_located(_error(str(path)), str(path), None, None)


def test_no_section_header(tmp_path: Path) -> None:
    """A key before any section is a one-line ConfigError saying its line
    and what is wrong, not the line itself (it may be a secret)."""
    path = _write(tmp_path, "; a comment\ndirectory = data\n" + MINIMAL)
    error = _error(path)
    _assert_located(error, path, None, None)
    assert str(error) == f"{path}: line 2: text before the first [section]"


def test_line_without_equals(tmp_path: Path) -> None:
    """A line that is neither a key nor a section is a one-line ConfigError
    saying its line number and what is wrong, not the line itself (it may
    be a password pasted on a line of its own); more such lines are
    counted."""
    path = _write(tmp_path, MINIMAL.replace("= data", "= data\njust words"))
    error = _error(path)
    _assert_located(error, path, None, None)
    assert str(error) == (
        f"{path}: line 3 is not a [section], a key = value, an indented "
        "continuation or a comment"
    )
    assert "just words" not in str(error)
    path = _write(tmp_path, MINIMAL.replace("= data", "= data\n[cache\nsecret"))
    assert str(_error(path)).endswith("(and 1 more such lines)")


def test_duplicate_key_says_its_line(tmp_path: Path) -> None:
    """A key given twice in a section names it, and the second line."""
    path = _write(tmp_path, MINIMAL.replace("= data", "= data\ndirectory = d"))
    assert str(_error(path)) == f"{path}: [cache] directory: given twice (line 3)"


def test_multi_line_bad_value_stays_one_line(tmp_path: Path) -> None:
    """A bad value spread over continuation lines still gives a one-line error."""
    path = _write(tmp_path, MINIMAL.replace("= data", "= data\ntag_ttl = 5\n  x\n  y"))
    _assert_located(_error(path), path, "cache", "tag_ttl")


# -- parse_duration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("250ms", 0.25),
        ("30", 30.0),
        ("0", 0.0),
        ("1.5h", 5400.0),
        (" 10 s ", 10.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Durations with ms/s/m/h/d units; a bare number is seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "5 minutes", "-5s", "5w", "1h30m", "abc"])
def test_parse_duration_rejects(text: str) -> None:
    """Anything else is a ValueError (turned into a ConfigError by the loader)."""
    with pytest.raises(ValueError):
        parse_duration(text)


# -- resolve_endpoint_paths --------------------------------------------------------


def test_resolve_endpoint_paths_ssl() -> None:
    """
    Relative file names in an ssl: endpoint become absolute against the base;
    absolute ones are kept.
    """
    resolved = resolve_endpoint_paths(
        "ssl:5443:privateKey=key.pem:certKey=/abs/cert.pem", "/etc/x"
    )
    assert resolved == "ssl:5443:privateKey=/etc/x/key.pem:certKey=/abs/cert.pem"


def test_resolve_endpoint_paths_other_keywords_untouched() -> None:
    """Keywords that name no file, and escaped colons in them, are kept."""
    description = r"ssl:5443:interface=\:\:1:privateKey=k.pem:backlog=50"
    assert resolve_endpoint_paths(description, "/etc/x") == (
        r"ssl:5443:interface=\:\:1:privateKey=/etc/x/k.pem:backlog=50"
    )


@pytest.mark.parametrize("description", ["tcp:5000", r"tcp6:5000:interface=\:\:1"])
def test_resolve_endpoint_paths_tcp_untouched(description: str) -> None:
    """Endpoints without file names come back unchanged."""
    assert resolve_endpoint_paths(description, "/etc/x") == description


def test_resolve_endpoint_paths_all_file_keywords() -> None:
    """Every keyword of Twisted's ssl: endpoint that names a file is resolved."""
    description = (
        "ssl:443:privateKey=k:certKey=c:extraCertChain=e:caCertsDir=d:dhParameters=p"
    )
    assert resolve_endpoint_paths(description, "/b") == (
        "ssl:443:privateKey=/b/k:certKey=/b/c:extraCertChain=/b/e"
        ":caCertsDir=/b/d:dhParameters=/b/p"
    )


def test_duration_out_of_range_is_refused() -> None:
    """A duration too large for a float is an error, not an infinite timeout."""
    with pytest.raises(ValueError, match="out of range"):
        parse_duration("9" * 400)


def test_url_with_white_space_is_refused() -> None:
    """A URL with white space in its host is refused, not passed to the agent."""
    with pytest.raises(ValueError, match="white space"):
        parse_upstream_url("https://x .example")


def test_cache_limits(tmp_path: Path) -> None:
    """``max_size`` and ``min_free`` take sizes with binary and decimal units."""
    config = tmp_path / "mirror.ini"
    config.write_text(
        FULL.replace("tag_ttl = 2m", "tag_ttl = 2m\nmax_size = 50GiB\nmin_free = 1GB")
    )
    loaded = load(str(config))
    assert loaded.cache.max_size == 50 * 1024**3
    assert loaded.cache.min_free == 10**9


S3 = """\
backend = s3
s3_endpoint = http://127.0.0.1:7480
s3_bucket = regmirror
s3_access_key = AKIDEXAMPLE
s3_secret_key_env = REGMIRROR_TEST_S3_SECRET
"""

CLUSTER = """
[cluster]
redis = redis://127.0.0.1:6379/2
advertise = http://10.0.0.5:5000
redis_password_file = redis.pass
lease_ttl = 10s
"""


def test_s3_backend_and_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``backend = s3`` with its keys, and ``[cluster]``, become values;
    secrets come from the environment or a file and never show in a repr."""
    monkeypatch.setenv("REGMIRROR_TEST_S3_SECRET", "s3-secret-value")
    (tmp_path / "redis.pass").write_text("redis-secret-value\n")
    path = _write(
        tmp_path,
        MINIMAL.replace("= data\n", "= data\n" + S3 + "s3_max_size = 2TiB\n") + CLUSTER,
    )
    config = load(path)
    s3 = config.cache.s3
    assert s3 is not None
    assert (s3.endpoint, s3.bucket, s3.region, s3.addressing) == (
        "http://127.0.0.1:7480",
        "regmirror",
        "us-east-1",
        "path",
    )
    assert s3.access_key.reveal() == "AKIDEXAMPLE"
    assert s3.secret_key.reveal() == "s3-secret-value"
    assert s3.max_size == 2 * 1024**4
    assert (s3.redirect, s3.redirect_ttl) == (False, 600.0)
    cluster = config.cluster
    assert cluster is not None
    assert cluster.redis == "redis://127.0.0.1:6379/2"
    assert cluster.advertise == "http://10.0.0.5:5000"
    assert cluster.redis_password is not None
    assert cluster.redis_password.reveal() == "redis-secret-value"
    assert cluster.lease_ttl == 10.0
    shown = repr(config)
    assert "s3-secret-value" not in shown and "redis-secret-value" not in shown


def test_local_backend_by_default(tmp_path: Path) -> None:
    config = load(_write(tmp_path, MINIMAL))
    assert config.cache.s3 is None
    assert config.cluster is None


@pytest.mark.parametrize(
    ("change", "key"),
    [
        pytest.param(
            lambda s: s.replace("backend = s3\n", ""), "s3_endpoint", id="no-backend"
        ),
        pytest.param(
            lambda s: s.replace("s3_bucket = regmirror", "s3_bucket = x"),
            "s3_bucket",
            id="short-bucket",
        ),
        pytest.param(
            lambda s: s.replace("s3_bucket = regmirror", "s3_bucket = Reg_Mirror"),
            "s3_bucket",
            id="bucket-characters",
        ),
        pytest.param(
            lambda s: s.replace("s3_access_key = AKIDEXAMPLE\n", ""),
            "s3_access_key",
            id="no-access-key",
        ),
        pytest.param(
            lambda s: s.replace("s3_secret_key_env", "s3_secret_key_file"),
            "s3_secret_key_file",
            id="secret-file-missing",
        ),
        pytest.param(
            lambda s: s.replace("backend = s3", "backend = gcs"),
            "backend",
            id="unknown-backend",
        ),
        pytest.param(
            lambda s: s + "s3_max_size = 1TiB\n", "s3_max_size", id="max-size-alone"
        ),
        pytest.param(
            lambda s: s.replace("s3_endpoint = http", "s3_endpoint = ftp"),
            "s3_endpoint",
            id="endpoint-scheme",
        ),
        pytest.param(lambda s: s + "redirect = maybe\n", "redirect", id="redirect"),
    ],
)
def test_s3_errors(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[str], str],
    key: str,
) -> None:
    """Each S3 problem names ``[cache]`` and the key; ``s3_max_size`` needs
    ``[cluster]``, whose Redis keeps the bucket's index."""
    monkeypatch.setenv("REGMIRROR_TEST_S3_SECRET", "s3-secret-value")
    path = _write(tmp_path, MINIMAL.replace("= data\n", "= data\n" + change(S3)))
    _assert_located(_error(path), path, "cache", key)


@pytest.mark.parametrize(
    "bad",
    [
        "tcp:notaport",
        "tcp:\u0665\u0660\u0660\u0661",
        # a backlog Twisted failed on only when binding, or took wrongly
        "tcp:5000:interface=127.0.0.1:backlog=99999999999",
        "tcp:5000:backlog=-1",
        "tcp:5000:backlog=0",
        "tcp:5000:backlog=\u0665",
        "tcp:5000:127.0.0.1:70000",
        "tcp6:5000:-3",
        "unix:/run/r.sock:backlog=x",
    ],
)
@pytest.mark.parametrize("key", ["listen", "metrics_listen"])
def test_a_bad_listener_names_its_own_key(tmp_path: Path, key: str, bad: str) -> None:
    """A bad endpoint description (a port or a backlog in other than ASCII
    digits, which Twisted's int() would take, too; a backlog out of 1 to
    65535) is reported under the key that holds it."""
    from regmirror.service import validate

    good = "tcp:0:interface=127.0.0.1"
    listen, metrics = (good, bad) if key == "metrics_listen" else (bad, good)
    path = tmp_path / "mirror.ini"
    path.write_text(
        f"[server]\nlisten = {listen}\nmetrics_listen = {metrics}\n\n"
        "[cache]\ndirectory = data\n\n"
        "[upstream:hub]\nurl = https://registry-1.docker.io\n\n"
        "[namespace:docker.io]\nupstreams = hub\ndefault = true\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        validate(str(path))
    assert f"[server] {key}: bad listener {bad!r}" in str(caught.value)


def test_prefetch(tmp_path: Path) -> None:
    """``prefetch`` defaults to 3 (Docker's layers at a time); ``0`` turns
    pulling ahead off; more than 64, a negative or a word is refused with
    the key named."""
    assert load(_write(tmp_path, MINIMAL)).namespaces[0].prefetch == 3
    for value, expected in (("0", 0), ("8", 8), ("64", 64)):
        text = MINIMAL + f"prefetch = {value}\n"
        assert load(_write(tmp_path, text)).namespaces[0].prefetch == expected
    for value in ("65", "-1", "some", "2.5"):
        path = _write(tmp_path, MINIMAL + f"prefetch = {value}\n")
        _assert_located(_error(path), path, "namespace:docker.io", "prefetch")


@pytest.mark.parametrize("value", ["none", "any", "10.0.0.0/8"])
def test_a_namespace_anonymous_without_access_is_an_error(
    tmp_path: Path, value: str
) -> None:
    """
    A namespace's ``anonymous = none`` without an ``[access]`` section was
    silently ignored: the namespace was open to everyone although the file
    said closed.  Any ``anonymous`` of a namespace then is an error naming
    the namespace's section and the key; with ``[access]`` it loads.
    """
    text = MINIMAL + f"anonymous = {value}\n"
    path = _write(tmp_path, text)
    error = _error(path)
    _assert_located(error, path, "namespace:docker.io", "anonymous")
    assert "[access]" in str(error)
    loaded = load(_write(tmp_path, text + "\n[access]\nanonymous = any\n"))
    assert loaded.namespaces[0].anonymous is not None


@pytest.mark.parametrize(
    ("listen", "clash"),
    [
        (["tcp:5000", "tcp:5000"], True),
        (["tcp:5000", "tcp:5000:interface=127.0.0.1"], True),
        (["tcp:5000:interface=127.0.0.1", "tcp:port=5000:interface=127.0.0.1"], True),
        (["tcp:5000:127.0.0.1", "tcp:5000:interface=127.0.0.1"], True),
        (["tcp:5000:interface=127.0.0.1", "tcp:5000:interface=127.0.0.2"], False),
        (["tcp:5000", "tcp6:5000:interface=\\:\\:1"], False),
        (["tcp6:5000", "tcp:5000:interface=127.0.0.1"], True),
        (["tcp6:5000:interface=\\:\\:1", "tcp6:5000:interface=0\\:\\:1"], True),
        (["tcp:5000", "tcp:5001"], False),
        (["tcp:0", "tcp:0"], False),
        (["tcp:5000", "ssl:5000:privateKey=k.pem"], True),
        (["unix:/run/a.sock", "unix:address=/run/a.sock"], True),
        (["unix:/run/a.sock", "unix:/run/b.sock"], False),
    ],
)
def test_listeners_that_cannot_both_bind(listen: list[str], clash: bool) -> None:
    """Two listeners on one port and address (spelled either way, or one on
    every address) are refused before anything listens, naming the second
    and the first; other pairs are not (port 0 is a new port each time)."""
    from regmirror.listeners import listen_address
    from regmirror.service import check_listeners

    first, second = (listen_address(d) for d in listen)
    assert first is not None and second is not None
    assert first.clashes(second) is clash
    assert second.clashes(first) is clash
    if not listen[1].startswith("ssl:"):
        try:
            check_listeners(listen)
        except ValueError as e:
            assert clash, e
            assert str(e).startswith(f"bad listener {listen[1]!r}: ")
            assert str(e).endswith(f" clashes with {listen[0]!r}")
        else:
            assert not clash


@pytest.mark.parametrize("port", ["65536", "99999", "port=70000"])
def test_a_port_above_65535_is_refused(port: str) -> None:
    """A port number out of range is a bad listener (Twisted would take it,
    and fail only when binding)."""
    from regmirror.service import check_listeners

    for kind in ("tcp", "tcp6"):
        with pytest.raises(ValueError, match="is not between 0 and 65535"):
            check_listeners([f"{kind}:{port}"])


def test_an_encrypted_client_key_is_refused_without_a_prompt(tmp_path: Path) -> None:
    """A passphrase-protected ``client_key`` (PKCS#8 or traditional) is a
    one-line error naming the key and the file: never OpenSSL's prompt for
    a passphrase on the terminal, nor a traceback."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from regmirror.service import validate

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now.replace(year=now.year + 1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
    )
    for form in (
        serialization.PrivateFormat.PKCS8,
        serialization.PrivateFormat.TraditionalOpenSSL,
    ):
        (tmp_path / "key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                form,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )
        path = _write(
            tmp_path,
            MINIMAL.replace(
                "[namespace:",
                "client_cert = cert.pem\nclient_key = key.pem\n\n[namespace:",
            ),
        )
        with pytest.raises(ConfigError) as caught:
            validate(path)
        assert str(caught.value) == (
            f"{path}: [upstream:hub] client_key: the private key in "
            f"{tmp_path / 'key.pem'} is encrypted: give it in clear"
        )


def test_segments(tmp_path: Path) -> None:
    """An upstream's ``segments`` defaults to 1 (one GET) and
    ``segment_min_size`` to 64 MiB; ``segments`` from 1 to 16 and a size
    load; 0, 17 or a word are refused with the upstream's key named."""
    upstream = load(_write(tmp_path, MINIMAL)).upstreams["hub"]
    assert (upstream.segments, upstream.segment_min_size) == (1, 64 * 1024**2)
    with_segments = MINIMAL.replace(
        "url = https://registry-1.docker.io\n",
        "url = https://registry-1.docker.io\nsegments = {}\nsegment_min_size = 16MiB\n",
    )
    for value in (1, 4, 16):
        loaded = load(_write(tmp_path, with_segments.format(value))).upstreams["hub"]
        assert (loaded.segments, loaded.segment_min_size) == (value, 16 * 1024**2)
    for value in ("0", "17", "some"):
        path = _write(tmp_path, with_segments.format(value))
        _assert_located(_error(path), path, "upstream:hub", "segments")


@pytest.mark.parametrize("size", ["0", "1000", "1MB", "0.5MiB"])
def test_segment_min_size_below_a_mebibyte_is_refused(
    tmp_path: Path, size: str
) -> None:
    """A ``segment_min_size`` under 1 MiB would cut small blobs into
    requests of a few bytes each (a fresh-eyes review: ``0`` with
    ``segments = 16`` fetched a 137-byte config in 16 GETs of 9 bytes)."""
    path = _write(
        tmp_path,
        MINIMAL.replace(
            "url = https://registry-1.docker.io\n",
            "url = https://registry-1.docker.io\nsegments = 4\n"
            f"segment_min_size = {size}\n",
        ),
    )
    error = _error(path)
    _assert_located(error, path, "upstream:hub", "segment_min_size")
    assert "at least 1MiB" in str(error)
