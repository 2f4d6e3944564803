"""
Readiness with a real upstream going away and coming back: ``/readyz``
turns 503 while every upstream of a namespace is down and returns by
itself within about one ``breaker_backoff`` of the upstream's return, with
no client request to probe with (a load balancer sends none to a node it
took out).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .harness import MirrorProcess, RegistryProcess, mirror_config, poll_until

pytestmark = pytest.mark.e2e


def readyz(mirror: MirrorProcess) -> int:
    return mirror.request("GET", "/readyz").status


@pytest.mark.parametrize("workers", [1, 2])
def test_readiness_returns_after_the_upstream_does(
    upstream: RegistryProcess,
    start_mirror: Callable[..., MirrorProcess],
    workers: int,
) -> None:
    """Down, then back without traffic: in every worker process too."""
    mirror = start_mirror(
        lambda port: (
            mirror_config(port, upstream.url)
            .replace("[cache]", f"workers = {workers}\n\n[cache]")
            .replace(
                "connect_timeout = 2s", "connect_timeout = 2s\nbreaker_backoff = 1s"
            )
        )
    )
    assert readyz(mirror) == 200
    upstream.stop()
    # Each process learns of the outage from a request of its own: ask
    # until every answer is 503 (a refused connection opens the breaker).
    poll_until(
        lambda: all(
            mirror.request("GET", "/v2/test/small/manifests/latest").status >= 500
            and readyz(mirror) == 503
            for _ in range(8)
        ),
        timeout=15.0,
        describe=lambda: "readyz did not turn 503",
    )
    upstream.start()
    poll_until(
        lambda: all(readyz(mirror) == 200 for _ in range(8)),
        timeout=15.0,
        describe=lambda: f"readyz still {readyz(mirror)}:\n{mirror.log()}",
    )
    assert mirror.request("GET", "/v2/test/small/manifests/latest").status == 200
