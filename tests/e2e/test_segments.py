"""
A large blob fetched from a real ``docker-registry`` (which honours
``Range``) as several ranged GETs at once (``[upstream:NAME] segments``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import pytest

from .harness import LOCALHOST, MirrorProcess, RegistryProcess
from .images import Catalog

pytestmark = pytest.mark.e2e


def test_a_large_blob_comes_in_four_ranged_gets_byte_exact(
    catalog: Catalog,
    upstream: RegistryProcess,
    start_mirror: Callable[..., MirrorProcess],
) -> None:
    """
    With ``segments = 4`` and ``segment_min_size = 4MiB``, the ~40 MiB
    layer reaches the client byte-exact and verified into the cache, from
    four GETs the registry answered 206 (its access log), one per quarter,
    and no other GET of it.
    """
    layer = catalog.big.layers[0]
    assert layer.size >= 12 * 1024 * 1024

    def config(port: int) -> str:
        return f"""\
[server]
listen = tcp:{port}:interface={LOCALHOST}

[cache]
directory = cache

[upstream:origin]
url = {upstream.url}
connect_timeout = 2s
response_timeout = 10s
idle_timeout = 10s
segments = 4
segment_min_size = 4MiB

[namespace:docker.io]
upstreams = origin
origin = origin
default = true
prefetch = 0
"""

    mirror = start_mirror(config)
    path = f"/v2/{catalog.big.repository}/blobs/{layer.digest}"
    response = mirror.request("GET", path)
    assert response.status == 200
    assert hashlib.sha256(response.body).hexdigest() == layer.digest.split(":")[1]
    assert response.body == layer.data
    gets = re.compile(
        rf'"GET /v2/\S+/blobs/{re.escape(layer.digest)} HTTP/1\.[01]" (\d+) (\d+)'
    )
    answers = [m.groups() for line in upstream.access_log() if (m := gets.search(line))]
    assert [status for status, _ in answers] == ["206"] * 4
    assert sum(int(sent) for _, sent in answers) == layer.size
    again = mirror.request("GET", path)
    assert again.body == layer.data
    assert upstream.count_blob_gets(layer.digest) == 4
