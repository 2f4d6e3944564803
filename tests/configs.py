"""
Configuration files for unit tests that build the real service: one
namespace over one upstream that never answers (127.0.0.1:9, discard),
listening on an ephemeral loopback port.
"""

from __future__ import annotations

from pathlib import Path

LISTEN = "tcp:0:interface=127.0.0.1"


def write_config(
    folder: Path, server: str = "", extra: str = "", listen: str = LISTEN
) -> Path:
    """
    ``mirror.ini`` in *folder*: *server* lines go into ``[server]`` after
    ``listen``, *extra* (whole sections) at the end.
    """
    path = folder / "mirror.ini"
    path.write_text(
        f"[server]\nlisten = {listen}\n{server}\n\n"
        "[cache]\ndirectory = cache\n\n"
        "[upstream:one]\nurl = http://127.0.0.1:9\n\n"
        "[namespace:docker.io]\nupstreams = one\ndefault = true\n" + extra
    )
    return path
