"""What one pass over one root did (`Report`), and the report of a look that found the root as
the last look left it (`SettledReport`, `ckptkeeper.settled`). Made by `reconcile`."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from ckptkeeper import Action, Outcome, Plan, Removal, RootScan
from ckptkeeper.decisions import Timing
from ckptkeeper.settled import Verdict
from ckptkeeper.storage import POSIX, Storage

__all__ = ["Make", "Report", "SettledReport"]

#: What makes a settled report's scan and plan: ``make(report=...)`` fills them in.
Make = functools.partial[bool]


@dataclass
class Report:
    root: Path
    status: str = "ok"  # ok | busy (another actor holds the lock) | error (root unusable)
    plan: Plan | None = None
    scan: RootScan | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    removed: list[tuple[Path, Removal]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    duration_ms: float = 0.0
    storage: Storage = POSIX  # the root's: asked for its local directory (metrics' statvfs)
    # The look found the root as the last look left it (`ckptkeeper.settled`): nothing to do,
    # and the scan and plan that look made hold, made again here only if asked for.
    settled: Verdict | None = None

    @property
    def checkpoint_count(self) -> int | None:
        """How many step records the pass's scan made (None: no scan)."""
        return len(self.scan.steps) if self.scan is not None else None

    @property
    def timing(self) -> Timing | None:
        """When the pass's plan changes with no new event (None: no plan)."""
        return self.plan.timing if self.plan is not None else None

    @property
    def errors(self) -> int:
        failed = sum(1 for o in self.outcomes if not o.ok)
        leftovers = sum(1 for _, r in self.removed if r.left)
        return failed + leftovers + (1 if self.status == "error" else 0)

    @property
    def in_flight(self) -> list[Path]:
        return [t.path for t in self.scan.in_flight] if self.scan is not None else []

    def count(self, action: Action) -> int:
        return sum(1 for o in self.outcomes if o.decision.action is action and o.status == "done")


class SettledReport(Report):
    """`Report.settled`: its scan and plan (those of a memoized look at ``now``) are made on the
    first use of either; what the verdict answers needs neither."""

    def __init__(self, root: Path, storage: Storage, verdict: Verdict, make: Make) -> None:
        self._make: Make | None = make
        self._now = make.keywords["now"]
        super().__init__(root, storage=storage, settled=verdict)

    def _made(self) -> None:
        if self._make is not None:
            make, self._make = self._make, None
            make(report=self)

    @property
    def scan(self) -> RootScan | None:
        self._made()
        return self._scan

    @scan.setter
    def scan(self, value: RootScan | None) -> None:
        self._scan = value

    @property
    def plan(self) -> Plan | None:
        self._made()
        return self._plan

    @plan.setter
    def plan(self, value: Plan | None) -> None:
        self._plan = value

    @property
    def checkpoint_count(self) -> int | None:
        if self._make is None or self.settled is None:
            return super().checkpoint_count
        return self.settled.checkpoints

    @property
    def timing(self) -> Timing | None:
        if self._make is None or self.settled is None:
            return super().timing
        return Timing(self._now, self.settled.until)

    @property
    def in_flight(self) -> list[Path]:
        return [] if self._make is not None else super().in_flight  # none: see `settled`
