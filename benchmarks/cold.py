"""
One cold client of a large blob, the systems taking turns run after run:
regmirror (this tree), optionally regmirror from another tree of its
code, the reference proxy, and the upstream registry itself.

Run from the repository root::

    .venv/bin/python benchmarks/cold.py [--runs 8] [--size-mib 256]
        [--other DIR] [--segments N] [--skip proxy] [--skip upstream]

``bench.py``'s cold x1 runs each system's runs one after the other, so
that a change of the machine's state between systems (other work, or on a
virtual machine the cost of page-cache pages the host took back, which
varies tenfold) falls on one column.  Here every run starts each system
afresh (a new process, an empty cache) in turn, and reports, per system,
the client's MiB/s and the server's CPU seconds during the transfer (from
the request to the client's last byte; for regmirror, not its commit
after it): the steadier figure on a shared machine.  ``--other DIR``
adds a column "other": regmirror with ``DIR`` first on ``PYTHONPATH``
(e.g. ``git archive REV | tar -x -C DIR`` for the code before a change);
``--segments N`` adds "segments": regmirror with ``[upstream:origin]
segments = N``.  Everything on 127.0.0.1, in a temporary folder, every
process stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402


@contextmanager
def python_path(tree: str | None) -> Iterator[None]:
    """Processes started meanwhile import regmirror from *tree*, if given."""
    before = os.environ.get("PYTHONPATH")
    if tree is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = tree
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def cold_run(
    server: bench.Server, path: str, digest: str, size: int
) -> tuple[float, float]:
    """One client of *path* from a fresh *server*: MiB/s, and the server's
    CPU seconds from the request to the client's last byte."""
    with bench.running(server):
        pids = bench.process_tree(server.pid)
        before = bench.tree_cpu_seconds(pids)
        result = bench.blob_load(server.port, path, 1, size)
        cpu = bench.tree_cpu_seconds(pids) - before
        bench.wait_until(
            lambda: server.stored(digest),  # type: ignore[attr-defined]
            timeout=bench.STORED_TIMEOUT,
            what=lambda: f"{server.name} never stored {digest}",
        )
    return result["mib_s"], cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--other", default=None, help="another tree of regmirror")
    parser.add_argument("--segments", type=int, default=None)
    parser.add_argument(
        "--skip", action="append", default=[], choices=("proxy", "upstream")
    )
    options = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="regmirror-cold-"))
    upstream = bench.Registry(work / "upstream", work / "upstream" / "storage")
    Make = Callable[[Path], bench.Server]
    systems: dict[str, tuple[str | None, Make]] = {
        "regmirror": (None, lambda d: bench.Mirror(d, upstream.url)),
    }
    if options.other is not None:
        other = str(Path(options.other).resolve())
        systems["other"] = (other, lambda d: bench.Mirror(d, upstream.url))
    if options.segments is not None:
        lines = f"segments = {options.segments}\n"
        systems["segments"] = (
            None,
            lambda d: bench.Mirror(d, upstream.url, upstream_options=lines),
        )
    if "proxy" not in options.skip:
        systems["proxy"] = (
            None,
            lambda d: bench.Registry(d, d / "storage", remote=upstream.url),
        )
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}
    if "upstream" not in options.skip:
        runs["upstream"] = []
    try:
        print(f"generating a {options.size_mib} MiB layer in {work}", flush=True)
        image = bench.make_image(work, options.size_mib * bench.MIB)
        digest, size = image.layer.digest, image.layer.size
        path = f"/v2/{bench.REPOSITORY}/blobs/{digest}"
        with bench.running(upstream):
            bench.push_image(upstream.port, image)
            for run in range(options.runs):
                for name, (tree, make) in systems.items():
                    folder = work / f"{name}-{run}"
                    with python_path(tree):
                        runs[name].append(cold_run(make(folder), path, digest, size))
                    shutil.rmtree(folder, ignore_errors=True)
                if "upstream" in runs:
                    result = bench.blob_load(upstream.port, path, 1, size)
                    runs["upstream"].append((result["mib_s"], 0.0))
                print(f"  run {run + 1} of {options.runs}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, results in runs.items():
        rates = [rate for rate, _ in results]
        line = (
            f"{name:10} MiB/s median {statistics.median(rates):6.0f}  "
            f"runs {' '.join(f'{r:.0f}' for r in rates)}"
        )
        if name != "upstream":
            cpus = [cpu for _, cpu in results]
            line += (
                f"\n{'':10} server CPU-s in the transfer median "
                f"{statistics.median(cpus):.2f}  runs "
                f"{' '.join(f'{c:.2f}' for c in cpus)}"
            )
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
