"""
The gauges the shipped alert rules (``etc/deploy/prometheus-rules.yml``)
need beside the counters: readiness, the cache disk's space, each
namespace's origin, the pull quota's size and 429 back-offs; and how
several worker processes' values make the machine's.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from configs import write_config
from prometheus_client.core import Metric
from twisted.internet.testing import MemoryReactorClock

from regmirror.ini import load
from regmirror.metrics import combine, gauge, total
from regmirror.mirror import Mirror
from regmirror.service import build_mirror

TWO_NAMESPACES = """
[upstream:two]
url = http://127.0.0.1:9

[namespace:ghcr.io]
upstreams = one two
origin = two
"""


def built(tmp_path: Path) -> Mirror:
    mirror = build_mirror(
        load(str(write_config(tmp_path, extra=TWO_NAMESPACES))), MemoryReactorClock()
    )
    mirror.store.open()
    return mirror


def value(built: Mirror, name: str, **labels: str) -> float | None:
    """The one sample of *name* with exactly *labels*; ``None`` if absent."""
    found = [
        sample.value
        for family in built.metrics.families()
        for sample in family.samples
        if sample.name == name and sample.labels == labels
    ]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_ready_follows_readyz(tmp_path: Path) -> None:
    """``regmirror_ready`` is 1 while /readyz finds nothing wrong, 0 once
    every upstream of a namespace is down, 1 again when one is back."""
    mirror = built(tmp_path)
    assert mirror.problems() == []
    assert value(mirror, "regmirror_ready") == 1
    mirror.upstreams["one"].breaker.failed(transport=True)
    assert mirror.problems()
    assert value(mirror, "regmirror_ready") == 0
    mirror.upstreams["one"].breaker.succeeded()
    assert value(mirror, "regmirror_ready") == 1


def test_cache_disk_space(tmp_path: Path) -> None:
    """The cache folder's file system: bytes free for the mirror and its
    size, as ``statvfs`` says."""
    mirror = built(tmp_path)
    disk = os.statvfs(mirror.store.root)
    size = value(mirror, "regmirror_cache_disk_size_bytes")
    free = value(mirror, "regmirror_cache_disk_free_bytes")
    assert size == disk.f_blocks * disk.f_frsize
    assert free is not None and size is not None
    # Free space moves with every other writer on the disk: near, not equal.
    assert abs(free - disk.f_bavail * disk.f_frsize) < 256 * 1024 * 1024
    assert 0 < free <= size


def test_each_namespace_names_its_origin(tmp_path: Path) -> None:
    """``regmirror_namespace_origin`` pairs each namespace with the upstream
    that decides its tags, and no other."""
    mirror = built(tmp_path)
    origins = {
        (sample.labels["namespace"], sample.labels["upstream"]): sample.value
        for family in mirror.metrics.families()
        for sample in family.samples
        if sample.name == "regmirror_namespace_origin"
    }
    assert origins == {("docker.io", "one"): 1.0, ("ghcr.io", "two"): 1.0}


def test_pull_quota_size_and_429_back_off(tmp_path: Path) -> None:
    """The quota's limit beside its remaining pulls, once an upstream told
    them; ``regmirror_upstream_rate_limited`` is 1 during a 429 back-off
    only."""
    mirror = built(tmp_path)
    one = mirror.upstreams["one"]
    assert value(mirror, "regmirror_upstream_ratelimit_limit", upstream="one") is None
    assert value(mirror, "regmirror_upstream_rate_limited", upstream="one") == 0
    one.rate_limit = (100, 7)
    assert value(mirror, "regmirror_upstream_ratelimit_limit", upstream="one") == 100
    assert value(mirror, "regmirror_upstream_ratelimit_remaining", upstream="one") == 7
    one.breaker.rate_limited(one.clock.seconds() + 60)
    assert value(mirror, "regmirror_upstream_rate_limited", upstream="one") == 1
    assert value(mirror, "regmirror_upstream_rate_limited", upstream="two") == 0


def _process(ready: float, free: float, origin: float) -> list[Metric]:
    return [
        gauge("regmirror_ready", "", [], [([], ready)]),
        gauge("regmirror_cache_disk_free_bytes", "", [], [([], free)]),
        gauge(
            "regmirror_namespace_origin",
            "",
            ["namespace", "upstream"],
            [(["docker.io", "one"], origin)],
        ),
    ]


def test_workers_values_make_the_machines() -> None:
    """With worker processes: not ready when one process is not, the disk
    as one process sees it (not added up), an origin named once."""
    machine = combine([_process(1, 1000, 1), _process(0, 990, 1), _process(1, 980, 1)])
    assert total(machine, "regmirror_ready") == 0
    assert total(machine, "regmirror_cache_disk_free_bytes") == 1000
    assert total(machine, "regmirror_namespace_origin") == 1


def test_stale_detections_start_at_zero(tmp_path: Path) -> None:
    """Every mirror of a namespace (each upstream but its origin) has its
    stale count from the start, at 0, so that the first detection is an
    increase to Prometheus; the origin has none."""
    mirror = built(tmp_path)
    name = "regmirror_stale_detections_total"
    assert value(mirror, name, namespace="ghcr.io", mirror="one") == 0
    assert value(mirror, name, namespace="ghcr.io", mirror="two") is None
    assert value(mirror, name, namespace="docker.io", mirror="one") is None


def test_a_cache_that_cannot_be_written_makes_the_node_unready_for_a_while(
    tmp_path: Path,
) -> None:
    """A write the disk refused (ENOSPC): /readyz names the error and
    ``regmirror_ready`` is 0 while the node serves without caching; once
    the period is over, ready again.  ``regmirror_cache_write_failures_total``
    counts the refusals, so that an alert holds while readiness comes and
    goes with each period."""
    reactor = MemoryReactorClock()
    mirror = build_mirror(
        load(str(write_config(tmp_path, extra=TWO_NAMESPACES))), reactor
    )
    mirror.store.open()
    assert value(mirror, "regmirror_cache_write_failures_total") == 0
    mirror.store.degrade(OSError(errno.ENOSPC, "No space left on device"))
    assert value(mirror, "regmirror_cache_write_failures_total") == 1
    problems = mirror.problems()
    assert len(problems) == 1 and "No space left on device" in problems[0]
    assert "serving without caching" in problems[0]
    assert value(mirror, "regmirror_ready") == 0
    reactor.advance(61)
    assert mirror.problems() == []
    assert value(mirror, "regmirror_ready") == 1
