"""A root's "nothing changed" verdict: what lets a keeper's unlocked look at an unchanged root
skip making its records and planning it again (bench P3), at a few dozen bytes per root.

A look (`scan_root(memo=True)` + `plan`) whose plan needs no lock leaves a `Verdict`: the step
memo and the `info.Listing` its scan made (the same objects, not copies), the policy it planned
with, the names in the trash and how long the plan holds (`Plan.revisit_at`). The next look asks
`settled`: the verdict holds when the policy is equal, no earlier than the plan said a decision
changes, the root is unchanged since the trusted listing (no entry created, removed or renamed:
`Listing.holds`), every step directory and its metrics file is as its memo entry says
(`_StepMemo.unchanged`: the system calls of a memoized scan, nothing made of them) and the trash
holds the same names. Then the plan the look would make is the plan the last look made (the
planner is pure and every input it reads is the same), except for the ages it prints in the
reasons of trash held for its grace: so nothing is to be done and nothing new is to be reported.

A verdict is made only where every input of the plan is among those: no save in flight, no
leftover, no anomaly, no pointer, every step a trusted memo entry with a metrics file (so no
writer lock, settle time or staleness is asked), no trash entry dated after the look, a layout
that names by name alone (no `Classifier`, not ``auto``), and no ``min_free`` (free space and
sizes are inputs then). A scan made since (the locked pass's, ``status``'s) replaces the memo or
the listing, and with them the verdict. Like the memo, a verdict only ever tells a look that
there is nothing to do: what is acted on always comes from a full scan under the lock, so a
verdict that held wrongly could delay an action by a pass, never cause one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

from .dirfd import DIR_FLAGS
from .info import InfoCache, Listing
from .layouts import Classifier
from .plan import Plan
from .policy import Policy
from .probes import CKPTKEEPER_DIR
from .records import RootScan
from .stepmemo import _StepMemo

__all__ = ["Verdict", "settled", "verdict_of"]


class Verdict:
    """What a look that needed no lock found in one root (module docstring)."""

    __slots__ = ("checkpoints", "info_below", "listing", "memo", "policy", "trash", "until", "who")

    def __init__(
        self,
        policy: Policy,
        memo: Mapping[str, _StepMemo],
        listing: Listing,
        info_below: str,
        trash: tuple[str, ...],
        until: float | None,
        checkpoints: int,
        who: object = None,
    ) -> None:
        self.policy = policy
        self.memo = memo  # the step memo the look's scan left in the cache (by identity)
        self.listing = listing  # the listing it left there (by identity)
        self.info_below = info_below  # "/" + the layout's metrics file
        self.trash = trash  # the trash's names, sorted
        self.until = until  # the plan's revisit_at: no later than this
        self.checkpoints = checkpoints  # how many step records the scan made
        self.who = who  # what the look's problems were reported to (see `Report.settled`)


def verdict_of(scan: RootScan, plan: Plan, cache: InfoCache, who: object = None) -> Verdict | None:
    """The verdict of a look that needs no lock (``plan`` made from ``scan``, a memoized scan
    through ``cache`` just now); None where the plan has inputs a verdict does not see."""
    policy, layout = plan.policy, scan.layout
    if plan.mutates or policy.min_free is not None or not layout.info_file:
        return None
    if scan.in_flight or scan.leftovers or scan.anomalies or scan.ambiguous_steps:
        return None
    if scan.pointers or isinstance(layout, Classifier) or layout.name != policy.layout:
        return None
    root = str(scan.root)
    memo, listing = cache.step_memo(root), cache.listing(root)
    if listing is None or not listing.trusted or listing.steps is not memo:
        return None
    if len(memo) != len(scan.steps) or any(c.path.name not in memo for c in scan.steps):
        return None
    if not all(e.trusted and e.of_file and e.info_key is not None for e in memo.values()):
        return None  # the next look would find it "changed" anyway
    if any(t.trashed_at > plan.now for t in scan.trash):
        return None  # trashed "later" than now (a clock ahead): its grace counts from now
    trash = tuple(t.path.name for t in scan.trash)
    try:
        fd = os.open(root, DIR_FLAGS)
        try:
            if _trash_names(fd) != trash:  # changed since the scan (or not all listed by it)
                return None
        finally:
            os.close(fd)
    except OSError:
        return None
    below = "/" + layout.info_file
    return Verdict(policy, memo, listing, below, trash, plan.revisit_at, len(scan.steps), who)


def settled(cache: InfoCache, root: str, policy: Policy, now: float) -> Verdict | None:
    """The root's verdict if it still holds (module docstring), else None."""
    verdict = cache.verdict(root)
    if not isinstance(verdict, Verdict):
        return None
    if verdict.until is not None and now >= verdict.until:
        return None
    if policy is not verdict.policy and policy != verdict.policy:
        return None
    if cache.step_memo(root) is not verdict.memo or cache.listing(root) is not verdict.listing:
        return None  # a scan since made its own
    try:
        same = _unchanged(root, verdict)
    except OSError:
        return None
    if same:
        cache.used_verdict()
        return verdict
    return None


def _unchanged(root: str, verdict: Verdict) -> bool:
    """The system calls of a memoized scan of an unchanged root, nothing made of them."""
    fd = os.open(root, DIR_FLAGS)
    try:
        if not verdict.listing.holds(os.fstat(fd)):
            return False
        below = verdict.info_below
        for name, entry in verdict.memo.items():
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            info = os.stat(name + below, dir_fd=fd, follow_symlinks=False)
            if not (stat.S_ISREG(info.st_mode) and entry.unchanged(st, info)):
                return False
        return _trash_names(fd) == verdict.trash
    finally:
        os.close(fd)


def _trash_names(root_fd: int) -> tuple[str, ...]:
    """The names in the root's ``.ckptkeeper/trash``, sorted; () when there is none. Reached
    from a descriptor of the root without following a symlink (OSError for one, as for any
    other error)."""
    fds: list[int] = []
    try:
        for part in (CKPTKEEPER_DIR, "trash"):
            fds.append(os.open(part, DIR_FLAGS, dir_fd=fds[-1] if fds else root_fd))
        return tuple(sorted(os.listdir(fds[-1])))
    except FileNotFoundError:
        return ()
    finally:
        for fd in fds:
            os.close(fd)
