"""Headless Chromium for the status-page tests and the P6 benchmark (Debian's ``chromium``).

The profile and Chromium's own temporary files go to a short directory under /tmp: Chromium
keeps a Unix socket there, and a socket path longer than 107 bytes (easily reached under pytest's
or the benchmark's work directories) makes it abort.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["FLAGS", "find_chromium", "run_chromium"]

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(
    exe: str, page: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Load ``page`` (a local file) once with ``args`` (e.g. ``--dump-dom``); a fresh profile."""
    with tempfile.TemporaryDirectory(prefix="ckchr-", dir="/tmp") as short:
        env = {**os.environ, "TMPDIR": short}
        cmd = [exe, *FLAGS, f"--user-data-dir={short}/profile", *args, page.as_uri()]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
        )
