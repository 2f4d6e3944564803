"""Fixtures of the in-memory unit tests (the e2e suite has its own)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fakeregistry import FakeRegistry
from memory import Harness
from twisted.logger import LogEvent, globalLogPublisher


@pytest.fixture
def origin() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def mirror(tmp_path: Path, origin: FakeRegistry) -> Harness:
    return Harness(str(tmp_path / "cache"), {"origin": origin})


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
