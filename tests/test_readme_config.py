"""
README.rst's configuration reference read as a contract: every key it
documents, in every section, is accepted by start-up's checks with a value
the README itself shows (a documented key was once refused as unknown).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from e2e.servers import write_certificate

from regmirror.service import validate

README = Path(__file__).parent.parent / "README.rst"

#: The sections of the reference, by the heading the README gives them.
SECTIONS = {
    "[server]": "server",
    "[cache]": "cache",
    "[upstream:NAME]": "upstream",
    "[namespace:NAME]": "namespace",
    "[access]": "access",
    "[cluster]": "cluster",
}


def documented_keys() -> set[tuple[str, str]]:
    """
    ``(section, key)`` for every key named in a definition term of the
    README's "Configuration reference" (a term may name several keys, as in
    ``username`` with ``password``, ``password_file`` or ``password_env``).
    """
    text = README.read_text(encoding="utf-8")
    start = text.index("\nConfiguration reference\n")
    body = text[start + 1 :]
    # The reference ends where the next top-level (=-underlined) title starts.
    following = re.search(r"\n\n([^\n]+)\n=+\n", body[len("Configuration") :])
    assert following is not None
    body = body[: len("Configuration") + following.start()]
    keys: set[tuple[str, str]] = set()
    section = None
    lines = body.splitlines()
    for line, underline in zip(lines, [*lines[1:], ""], strict=True):
        heading = re.fullmatch(r"``(\[[^\]]+\])``", line)
        if heading and underline.startswith("---"):
            section = SECTIONS[heading.group(1)]
            continue
        if section is not None and line.startswith("``"):
            for name in re.findall(r"``([a-z0-9_]+)``", line):
                keys.add((section, name))
    return keys


#: For each documented key, a value from the README and what else must be
#: in the file for it to make sense (``{section: text}``, merged into BASE).
EXAMPLES: dict[tuple[str, str], dict[str, str]] = {
    ("server", "listen"): {
        "server": "listen = tcp:0:interface=127.0.0.1\n"
        "    ssl:0:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem"
    },
    ("server", "workers"): {"server": "workers = 2"},
    ("server", "deny_hosts"): {
        "server": "deny_hosts = 169.254.0.0/16 fe80::/10 metadata.google.internal"
    },
    ("server", "metrics_listen"): {
        "server": "metrics_listen = tcp:9100:interface=127.0.0.1"
    },
    ("cache", "directory"): {"cache": "directory = data"},
    ("cache", "tag_ttl"): {"cache": "tag_ttl = 60s"},
    ("cache", "max_size"): {"cache": "max_size = 50GiB"},
    ("cache", "min_free"): {"cache": "min_free = 2GiB"},
    ("cache", "max_blob_size"): {"cache": "max_blob_size = 64GiB"},
    ("cache", "backend"): {"cache": "backend = local"},
    **{
        ("cache", key): {
            "cache": "backend = s3\n"
            "s3_endpoint = http://rgw.internal:7480\n"
            "s3_bucket = regmirror\n"
            "s3_access_key_file = access\n"
            "s3_secret_key_file = secret\n" + extra
        }
        for key, extra in {
            "s3_endpoint": "",
            "s3_bucket": "",
            "s3_access_key_file": "",
            "s3_secret_key_file": "",
            "s3_region": "s3_region = us-east-1",
            "s3_addressing": "s3_addressing = virtual",
            "redirect": "redirect = true",
            "redirect_ttl": "redirect = true\nredirect_ttl = 10m",
        }.items()
    },
    ("cache", "s3_max_size"): {
        "cache": "backend = s3\n"
        "s3_endpoint = http://rgw.internal:7480\n"
        "s3_bucket = regmirror\n"
        "s3_access_key_file = access\n"
        "s3_secret_key_file = secret\n"
        "s3_max_size = 2TiB",
        "cluster": "redis = redis://127.0.0.1:6379/0\nadvertise = http://10.0.0.5:5000",
    },
    ("upstream", "url"): {"upstream": "url = https://registry-1.docker.io"},
    ("upstream", "connect_timeout"): {"upstream": "connect_timeout = 10s"},
    ("upstream", "response_timeout"): {"upstream": "response_timeout = 30s"},
    ("upstream", "idle_timeout"): {"upstream": "idle_timeout = 60s"},
    ("upstream", "username"): {"upstream": "username = me\npassword = secret"},
    ("upstream", "password"): {"upstream": "username = me\npassword = secret"},
    ("upstream", "password_file"): {
        "upstream": "username = me\npassword_file = secret"
    },
    ("upstream", "password_env"): {"upstream": "username = me\npassword_env = HOME"},
    ("upstream", "token"): {"upstream": "token = abc"},
    ("upstream", "token_file"): {"upstream": "token_file = secret"},
    ("upstream", "token_env"): {"upstream": "token_env = HOME"},
    ("upstream", "token_realms"): {"upstream": "token_realms = auth.example.com"},
    ("upstream", "ca_file"): {"upstream": "ca_file = cert.pem"},
    ("upstream", "client_cert"): {
        "upstream": "client_cert = cert.pem\nclient_key = key.pem"
    },
    ("upstream", "client_key"): {
        "upstream": "client_cert = cert.pem\nclient_key = key.pem"
    },
    ("upstream", "insecure"): {"upstream": "insecure = false"},
    ("upstream", "proxy"): {"upstream": "proxy = http://127.0.0.1:3128"},
    ("upstream", "breaker_failures"): {"upstream": "breaker_failures = 3"},
    ("upstream", "breaker_backoff"): {"upstream": "breaker_backoff = 30s"},
    ("upstream", "ns"): {"upstream": "ns = quay.io"},
    ("upstream", "segments"): {"upstream": "segments = 4"},
    ("upstream", "segment_min_size"): {
        "upstream": "segments = 4\nsegment_min_size = 64MiB"
    },
    ("namespace", "upstreams"): {"namespace": "upstreams = hub"},
    ("namespace", "origin"): {"namespace": "origin = hub"},
    ("namespace", "default"): {"namespace": "default = true"},
    ("namespace", "aliases"): {
        "namespace": "aliases = index.docker.io registry-1.docker.io"
    },
    ("namespace", "hosts"): {"namespace": "hosts = docker.mirror.example"},
    ("namespace", "library"): {"namespace": "library = true"},
    ("namespace", "origin_unreachable"): {"namespace": "origin_unreachable = cache"},
    ("namespace", "max_stale"): {"namespace": "max_stale = 7d"},
    ("namespace", "origin_retry"): {"namespace": "origin_retry = 30s"},
    ("namespace", "tag_ttl"): {"namespace": "tag_ttl = 5m"},
    ("namespace", "stale_while_revalidate"): {
        "namespace": "stale_while_revalidate = 10m"
    },
    ("namespace", "immutable_tags"): {"namespace": "immutable_tags = v[0-9]* sha-*"},
    ("namespace", "allow"): {"namespace": "allow = library/* myorg/*"},
    ("namespace", "deny"): {"namespace": "deny = */*-debug"},
    ("namespace", "prefetch"): {"namespace": "prefetch = 6"},
    ("namespace", "keep_warm"): {
        "namespace": "keep_warm = library/nginx:latest library/alpine:3.20@linux/amd64"
    },
    ("namespace", "keep_warm_interval"): {"namespace": "keep_warm_interval = 5m"},
    ("namespace", "credentials"): {"namespace": "credentials = passthrough"},
    ("namespace", "access_check_ttl"): {"namespace": "access_check_ttl = 60s"},
    ("namespace", "access_check_offline"): {"namespace": "access_check_offline = 1h"},
    ("access", "anonymous"): {"access": "anonymous = 10.0.0.0/8 127.0.0.0/8 ::1"},
    ("access", "htpasswd"): {"access": "htpasswd = htpasswd"},
    ("access", "trusted_proxies"): {"access": "trusted_proxies = 127.0.0.1"},
    ("access", "token_ttl"): {"access": "token_ttl = 5m"},
    ("access", "forwarded_header"): {"access": "forwarded_header = x-forwarded-for"},
    **{
        ("cluster", key): {
            "cluster": "redis = redis://127.0.0.1:6379/0\n"
            "advertise = http://10.0.0.5:5000\n" + extra
        }
        for key, extra in {
            "redis": "",
            "advertise": "",
            "redis_password_file": "redis_password_file = secret",
            "redis_password_env": "redis_password_env = HOME",
            "lease_ttl": "lease_ttl = 5s",
            "redis_timeout": "redis_timeout = 1s",
        }.items()
    },
}

#: The file every example is merged into: the smallest that starts.
BASE = {
    "server": "listen = tcp:0:interface=127.0.0.1",
    "cache": "directory = data",
    "upstream": "url = https://registry-1.docker.io",
    "namespace": "upstreams = hub\ndefault = true",
}
HEADINGS = {"upstream": "upstream:hub", "namespace": "namespace:docker.io"}


def test_every_documented_key_has_an_example() -> None:
    """
    The examples below cover exactly the keys the README documents: a key
    documented later needs an example here, and an example of a key the
    README does not document points at a gap in the README.
    """
    documented = documented_keys()
    assert len(documented) > 50  # the parser found the reference
    assert documented == set(EXAMPLES)


@pytest.mark.parametrize("key", sorted(EXAMPLES), ids="{0[0]}.{0[1]}".format)
def test_documented_key_is_accepted(tmp_path: Path, key: tuple[str, str]) -> None:
    """Start-up's checks accept the key with a value the README shows."""
    write_certificate(tmp_path)
    for name in ("secret", "access", "htpasswd"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    sections = dict(BASE)
    for section, lines in EXAMPLES[key].items():
        own = {k.split("=")[0].strip() for k in lines.splitlines() if "=" in k}
        kept = [
            line
            for line in sections.get(section, "").splitlines()
            if line.split("=")[0].strip() not in own
        ]
        sections[section] = "\n".join([*kept, lines.rstrip("\n")])
    text = "".join(
        f"[{HEADINGS.get(name, name)}]\n{body}\n\n" for name, body in sections.items()
    )
    path = tmp_path / "mirror.ini"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    config = validate(str(path))
    assert config.path == str(path)


def test_every_documented_key_is_in_the_shipped_config() -> None:
    """README: "etc/mirror.ini is a working default with every option
    commented": each documented key appears there, set or commented."""
    shipped = (README.parent / "etc" / "mirror.ini").read_text(encoding="utf-8")
    missing = sorted(
        f"[{section}] {key}"
        for section, key in documented_keys()
        if not re.search(rf"^[;#]?\s*{key}\s*=|\b{key}\b", shipped, re.MULTILINE)
    )
    assert missing == []


def test_readme_names_every_key_that_takes_a_size() -> None:
    """The README's list of keys that take a size is every key read as a
    size in regmirror/ini.py, no more (it once said that none did)."""
    source = (Path(__file__).parent.parent / "regmirror" / "ini.py").read_text()
    read_as_size = set(re.findall(r'get\(\s*"([a-z0-9_]+)",\s*parse_size\b', source))
    assert read_as_size, "no key read with parse_size: the pattern is stale"
    text = README.read_text(encoding="utf-8")
    listed = re.search(r"- sizes \(([^)]*)\)\s+are ``512MiB``", text)
    assert listed is not None, "README's sizes sentence is gone"
    assert set(re.findall(r"``([a-z0-9_]+)``", listed.group(1))) == read_as_size
