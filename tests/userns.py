"""Real inotify limits for one test: a user namespace whose own ``max_inotify_*`` are set low.

``/proc/sys/user/max_inotify_watches`` and ``max_inotify_instances`` are per user namespace, and a
process is held to the lowest limit on its way up to the initial namespace: lowering them inside
a fresh namespace (``unshare --user --map-root-user``) makes ``inotify_add_watch`` fail with
ENOSPC, or ``inotify_init1`` with EMFILE, for that process alone; the host's limits stay as they
are. The process keeps our uid (0 is mapped to 0), so it reaches the test's files as before.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import cache

__all__ = ["inotify_limited", "userns_unavailable"]

UNSHARE = shutil.which("unshare")


def inotify_limited(
    command: list[str], *, watches: int | None = None, instances: int | None = None
) -> list[str]:
    """``command`` run in a new user namespace with these inotify limits."""
    if UNSHARE is None:
        raise RuntimeError("unshare not found")
    sets = [
        f"echo {n} > /proc/sys/user/max_inotify_{what}"
        for what, n in (("watches", watches), ("instances", instances))
        if n is not None
    ]
    script = " && ".join([*sets, 'exec "$@"'])
    return [UNSHARE, "--user", "--map-root-user", "sh", "-c", script, "sh", *command]


@cache
def userns_unavailable() -> str | None:
    """Why a user namespace with its own inotify limits cannot be had here (None: it can)."""
    if UNSHARE is None:
        return "unshare (util-linux) not found"
    probe = subprocess.run(
        inotify_limited([sys.executable, "-c", "print('ok')"], watches=1),
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if probe.returncode != 0 or probe.stdout.strip() != "ok":
        return f"no user namespace with its own inotify limits: {probe.stderr.strip()[:200]}"
    return None
