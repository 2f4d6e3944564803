"""
Claims shared by the processes of a machine (:mod:`regmirror._claims`):
another real process holds one, this one is refused it, and gets it once
that process ended (the kernel drops its locks).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from regmirror._claims import Claims, _slot

HOLDER = """
import sys
from regmirror._claims import Claims
claims = Claims(sys.argv[1])
print(claims.claim(sys.argv[2]), flush=True)
sys.stdin.read()
"""


def test_a_claim_another_process_holds_is_refused_until_it_ends(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "claims" / "file")
    key, other = "docker.io\nlibrary/busybox\nlatest", "docker.io\nlibrary/alpine\n3"
    assert _slot(key) != _slot(other)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, path, key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "True\n"
        claims = Claims(path)
        assert claims.claim(key) is False
        assert claims.claim(other) is True
        claims.release(other)
    finally:
        holder.communicate("", timeout=30)
    assert claims.claim(key) is True
    claims.release(key)


def test_a_process_is_granted_its_own_claim_again_after_release(
    tmp_path: Path,
) -> None:
    """Record locks are the process's: its single flight, not the claim,
    keeps it to one at a time; a release gives the key back to others."""
    claims = Claims(str(tmp_path / "file"))
    assert claims.claim("a") is True
    assert claims.claim("a") is True
    claims.release("a")


def test_without_a_usable_file_every_claim_is_granted(tmp_path: Path) -> None:
    """A cache folder where the file cannot be made: the process works
    alone, as it did before claims were shared."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    claims = Claims(str(blocker / "claims"))
    assert claims.claim("a") is True
    claims.release("a")
