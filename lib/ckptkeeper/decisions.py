"""What the planner decides for one entry of a root: an `Action` with its reasons (`Decision`),
and when a decision that waits on time alone stops holding (`Decision.until`).

`plan.plan` makes them; `execute.apply_plan` carries out the `APPLIED` ones.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

__all__ = ["APPLIED", "MIN_REVISIT_DELAY", "RECOVERY", "Action", "Decision", "Timing", "first"]


class Action(enum.StrEnum):
    KEEP = "keep"  # a step that stays
    DELETE = "delete"  # a step moved to trash and removed
    FINALIZE = "finalize"  # complete tmp_step_N -> step_N (one rename)
    REPLACE = "replace"  # complete tmp_step_N over an existing step_N (via old_step_N)
    RESTORE = (
        "restore"  # old_step_N -> step_N (replace interrupted before the new one was complete)
    )
    DISCARD = "discard"  # old_step_N beside step_N: garbage of a finished replace
    COLLECT = "collect"  # stale tmp_step_N (no marker, no writer lock, untouched) -> trash
    WAIT = "wait"  # tmp_step_N still being written
    PURGE = "purge"  # trash entry past trash_grace -> removed
    HOLD = "hold"  # trash entry within trash_grace
    IGNORE = "ignore"  # checkpoint-like name that is not a checkpoint; never touched


#: A keeper passes a root again for `plan.Plan.revisit_at` no sooner than this after the plan:
#: a time already past (an mtime in the future by our clock, a threshold of 0) cannot make it loop.
MIN_REVISIT_DELAY = 1.0

#: The actions `execute.apply_plan` carries out under the root lock (PURGE runs after the unlock).
APPLIED = frozenset(
    {
        Action.RESTORE,
        Action.FINALIZE,
        Action.REPLACE,
        Action.DISCARD,
        Action.COLLECT,
        Action.DELETE,
    }
)
#: What makes saves visible and resolves interrupted replaces; never deletes a checkpoint.
RECOVERY = frozenset({Action.RESTORE, Action.FINALIZE, Action.REPLACE, Action.DISCARD})


@dataclass(frozen=True, slots=True)
class Decision:
    step: int | None
    path: Path
    action: Action
    reasons: tuple[str, ...]
    identity: tuple[int, int] = (0, 0)  # (st_dev, st_ino) the plan saw; re-checked before acting
    metric: float | str | None = None  # for display: the metric value or why it is missing
    replaces: Path | None = None  # REPLACE: the existing step directory (whatever its spelling)
    carry_pin: bool = False  # FINALIZE/REPLACE: the replaced step was pinned; pin the new one
    # WAIT: the action held back by something that stays until someone fixes it (a step_N that
    # is a symlink, a writer lock we cannot probe); reasons[0] says what, in stable words, so
    # a daemon can report it once rather than on every pass.
    blocked: Action | None = None
    # WAIT/HOLD that time alone ends: when it stops holding with no new event (a save settles
    # or turns stale, a trash entry outlives its grace); None: only a change on disk ends it.
    until: float | None = None


def first(*times: float | None) -> float | None:
    """The earliest of ``times`` that is set (None: none is)."""
    return min((t for t in times if t is not None), default=None)


@dataclass(frozen=True, slots=True)
class Timing:
    """When a plan made at ``now`` changes with no new event (``revisit_at``, `first` of its
    decisions' `Decision.until`; None: only a change on disk changes it)."""

    now: float
    revisit_at: float | None

    def next_visit(self, before: float) -> float | None:
        """When a keeper should pass the root again for ``revisit_at``: no sooner than
        `MIN_REVISIT_DELAY` after ``now`` (an mtime ahead of our clock cannot make it loop);
        None without a revisit, or when ``before`` (the next periodic pass) is sooner."""
        at = self.revisit_at
        if at is None:
            return None
        at = max(at, self.now + MIN_REVISIT_DELAY)
        return at if at < before else None
