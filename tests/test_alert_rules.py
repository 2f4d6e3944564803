"""
The shipped alert rules, ``etc/deploy/prometheus-rules.yml``: valid to
Prometheus (``promtool check rules``), each alert firing when it should
and not when it should not (``promtool test rules`` on
``tests/prometheus/rules-test.yml``, a test per alert), and asking only for
metrics regmirror exports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from configs import write_config
from prometheus_client.exposition import generate_latest
from twisted.internet.testing import MemoryReactorClock

from regmirror.ini import load
from regmirror.service import build_mirror

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "etc" / "deploy" / "prometheus-rules.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "rules-test.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.fail(
            "promtool is not installed (Debian: prometheus): run scripts/dev test"
        )
    return subprocess.run(
        [PROMTOOL, *args],
        cwd=RULE_TESTS.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def alerts() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(), re.MULTILINE)


def test_promtool_check_rules() -> None:
    """Prometheus accepts the rules: YAML, PromQL, templates."""
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    """Each alert fires at the time, with the labels and the text, its test
    expects, and stays quiet in the cases beside it."""
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_its_test() -> None:
    """A test case per alert, firing and quiet; no test of an alert that
    is gone."""
    tests = RULE_TESTS.read_text()
    named = set(re.findall(r"^  - name: (\w+)\s*$", tests, re.MULTILINE))
    assert named == set(alerts())
    for alert in alerts():
        checks = re.findall(
            rf"alertname: {alert}\n\s+exp_alerts:(.*)", tests, re.MULTILINE
        )
        assert "" in [c.strip() for c in checks], f"{alert} never fires"
        assert "[]" in [c.strip() for c in checks], f"{alert} is never quiet"


def exported_names(tmp_path: Path) -> set[str]:
    """
    Every metric name on a mirror's ``/metrics``, those that appear only
    in some states included: a pull quota learnt, a size limit set.
    """
    config = write_config(
        tmp_path,
        extra="\n[upstream:two]\nurl = http://127.0.0.1:9\n\n"
        "[namespace:ghcr.io]\nupstreams = one two\norigin = two\n",
    )
    config.write_text(
        config.read_text().replace(
            "directory = cache", "directory = cache\nmax_size = 1GiB"
        )
    )
    mirror = build_mirror(load(str(config)), MemoryReactorClock())
    mirror.store.open()
    mirror.upstreams["one"].rate_limit = (100, 50)
    text = generate_latest(mirror.metrics.registry).decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE)) | {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_rules_ask_only_for_metrics_regmirror_exports(tmp_path: Path) -> None:
    """Every metric an expression names is one the mirror exports (a
    misspelt name would make an alert that never fires)."""
    expressions = re.findall(
        r"^\s+expr: (?:>-\n)?((?:.+\n)+?)\s+(?:for|labels):",
        RULES.read_text(),
        re.MULTILINE,
    )
    assert len(expressions) == len(alerts())
    asked = set(re.findall(r"\bregmirror_[a-z0-9_]+", "\n".join(expressions)))
    assert len(asked) >= 10, asked
    missing = asked - exported_names(tmp_path)
    assert not missing, f"not exported: {sorted(missing)}"
