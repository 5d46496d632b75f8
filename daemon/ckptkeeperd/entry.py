"""The ``ckptkeeper`` console script.

For ``run`` the daemon's signals are taken care of before anything heavy is imported (click,
pydantic, rich, structlog, watchdog take a few hundred ms): SIGHUP is ignored first (its default
action would kill a daemon that a reload request reaches during start-up), then SIGTERM, SIGINT
and SIGHUP are recorded for the main thread (``signals``) and acted on once it serves.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    if sys.argv[1:2] == ["run"]:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        from .signals import process_inbox

        process_inbox().install()
    from .cli import main as cli_main

    cli_main()
