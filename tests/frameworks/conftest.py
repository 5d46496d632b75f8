from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import Daemon


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()
