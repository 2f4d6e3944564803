"""
What the ``regmirror`` commands share (``cli.py``, ``prefetch.py``): the
error that ends a command, and sizes written for people.
"""

from __future__ import annotations


class Failed(Exception):
    """A command failed; the message says why, in one line."""


def human_size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{count} B"
