"""
``stale_while_revalidate`` measured (issue 18, item 2): an origin that
takes a second to answer, and pulls of a tag past ``tag_ttl``.

Run from the repository root::

    .venv/bin/python benchmarks/revalidate.py [--pulls 100] [--delay 1]
        [--window 10m] [--workers 1] [--sequential] [--tag-ttl 1s]

A ``docker-registry`` with ``test/small:latest`` (the e2e suite's image),
behind ``tests/e2e/programs/delay_relay.py``; a mirror (``twistd
regmirror``, ``tag_ttl = 1s``, ``prefetch = 0``, ``stale_while_revalidate
= --window``) resolves the tag once while the origin answers at once.
Then the relay holds every answer for ``--delay`` seconds, the tag's
``tag_ttl`` runs out, and ``--pulls`` clients GET its manifest by tag at
once, each on its own connection made beforehand (``--sequential``: one
after the other): the time each waited for its whole answer (min, median, p99,
max), the ``Regmirror-Tag-Source`` values, and the HEADs of the tag that
reached the relay and the registry (its access log), counted once the
check behind the answers is over.  ``--window 0s`` gives the same numbers
without the window, ``--tag-ttl 10m`` those of pulls within ``tag_ttl``
(answered from memory), for comparison.  Everything on loopback, in a
temporary folder, every process stopped at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from e2e.harness import (  # noqa: E402
    LOCALHOST,
    MirrorProcess,
    RegistryProcess,
    Skopeo,
    free_port,
    mirror_config,
)
from e2e.images import MANIFEST_ACCEPT, build_catalog  # noqa: E402
from e2e.servers import DelayRelay  # noqa: E402

PATH = "/v2/test/small/manifests/latest"


def get(
    port: int, ready: threading.Barrier | None = None
) -> tuple[float, int, str | None]:
    """One GET of the tag's manifest on a new connection: seconds from
    the request to its whole answer, status, tag source.  With *ready*,
    the connection is made first and the request sent once every client
    is connected (the time to connect, which the listen queue decides, is
    not counted)."""
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=60)
    try:
        connection.connect()
        if ready is not None:
            ready.wait(timeout=60)
        started = time.perf_counter()
        connection.request("GET", PATH, headers={"Accept": MANIFEST_ACCEPT})
        response = connection.getresponse()
        response.read()
        return (
            time.perf_counter() - started,
            response.status,
            response.getheader("Regmirror-Tag-Source"),
        )
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pulls", type=int, default=100)
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--window", default="10m")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument(
        "--tag-ttl",
        default="1s",
        help="10m: the pulls are within tag_ttl, answered from memory (a baseline)",
    )
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="revalidate-") as folder:
        root = Path(folder)
        image = build_catalog().small
        skopeo = Skopeo(root / "skopeo")
        origin = RegistryProcess(root / "storage", root / "registry")
        origin.start()
        relay = DelayRelay(root / "relay", origin.port)
        mirror: MirrorProcess | None = None
        try:
            skopeo.push_images(origin.host, [image], root / "push")
            relay.start()
            port = free_port()
            config = mirror_config(port, relay.url, tag_ttl=options.tag_ttl, prefetch=0)
            # A listen queue for every client at once (Twisted's is 50).
            config = (
                config.replace(f"tcp:{port}:", f"tcp:{port}:backlog=1024:", 1)
                .replace(
                    "prefetch = 0\n",
                    f"prefetch = 0\nstale_while_revalidate = {options.window}\n",
                )
                .replace("[cache]", f"workers = {options.workers}\n\n[cache]")
            )
            mirror = MirrorProcess(root / "mirror", config, port)
            mirror.start()
            time.sleep(2 if options.workers > 1 else 0)  # the workers serving
            first = get(port)
            assert first[1] == 200, first
            relay.control(delay=options.delay)
            time.sleep(1.5)  # past tag_ttl
            results: list[tuple[float, int, str | None]] = []
            lock = threading.Lock()

            ready = None if options.sequential else threading.Barrier(options.pulls)

            def pull() -> None:
                got = get(port, ready)
                with lock:
                    results.append(got)

            started = time.perf_counter()
            if options.sequential:
                for _ in range(options.pulls):
                    pull()
            else:
                threads = [threading.Thread(target=pull) for _ in range(options.pulls)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            wall = time.perf_counter() - started
            time.sleep(options.delay + 1)  # the check behind them ends
            waits = sorted(seconds * 1000 for seconds, _, _ in results)
            sources: dict[str, int] = {}
            for _, status, source in results:
                name = f"{status} {source}"
                sources[name] = sources.get(name, 0) + 1
            report = {
                "pulls": options.pulls,
                "concurrent": not options.sequential,
                "origin_delay_s": options.delay,
                "stale_while_revalidate": options.window,
                "workers": options.workers,
                "tag_ttl": options.tag_ttl,
                "wall_s": round(wall, 3),
                "ms": {
                    "min": round(waits[0], 1),
                    "median": round(statistics.median(waits), 1),
                    "p99": round(waits[max(0, int(len(waits) * 0.99) - 1)], 1),
                    "max": round(waits[-1], 1),
                },
                "under_50ms": sum(1 for w in waits if w < 50),
                "answers": sources,
                "heads_at_relay": relay.count("HEAD", "/manifests/latest") - 1,
                "heads_at_registry": origin.count_requests("HEAD", PATH) - 1,
            }
            print(json.dumps(report, indent=2))
        finally:
            if mirror is not None:
                mirror.stop()
            relay.stop()
            origin.stop()


if __name__ == "__main__":
    main()
