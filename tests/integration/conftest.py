from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    """Every daemon test must leave no thread of its own behind."""
    before = set(threading.enumerate())
    yield
    deadline_threads = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in deadline_threads:
        t.join(timeout=5)
    leaked = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads leaked: {leaked}"
