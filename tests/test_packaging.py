"""The built wheel works on its own, outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Left out of the copy that the wheel is built from: a stale build/ or
# egg-info would leak deleted files into the wheel and hide a packaging bug.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "dropin.cache",
    ".*_cache",
    ".hypothesis",
    "_trial_temp",
    "data",
)


def _run(
    argv: list[str | Path], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    return subprocess.run(
        [str(arg) for arg in argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


def test_wheel_installs_twistd_plugin_into_clean_venv(tmp_path: Path) -> None:
    """
    The wheel built from the project carries the ``twistd`` plugin
    (``twisted/plugins/regmirror_plugin.py``) without shadowing Twisted's own
    ``twisted`` or ``twisted.plugins`` packages (no ``__init__.py`` of ours),
    and once installed into a fresh virtualenv ``twistd regmirror --help``
    finds the plugin, exits 0 and documents ``--config``.
    """
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    dist = tmp_path / "dist"
    _check(
        _run(
            [sys.executable, "-m", "build", "--wheel", "--outdir", dist, source],
            cwd=tmp_path,
            timeout=600,
        )
    )
    wheels = list(dist.glob("regmirror-*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]

    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/regmirror_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names

    venv = tmp_path / "venv"
    _check(_run([sys.executable, "-m", "venv", venv], cwd=tmp_path, timeout=300))
    _check(
        _run(
            [venv / "bin" / "python", "-m", "pip", "install", "-q", wheel],
            cwd=tmp_path,
            timeout=900,
        )
    )

    # Run from an empty folder so nothing of the source tree is importable.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _run(
        [venv / "bin" / "twistd", "regmirror", "--help"], cwd=elsewhere, timeout=120
    )
    _check(result)
    assert "--config" in result.stdout
