"""Shared pytest setup. Makes the repository root importable so tests can `import tests.fusefs`;
the ``daemons`` fixture (every `Daemon` appended to it is killed after the test)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


from tests.helpers import Daemon  # noqa: E402  (importable once the path is set above)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()
