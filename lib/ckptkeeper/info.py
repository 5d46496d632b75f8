"""The per-root cache that makes a repeated scan of an unchanged root parse no JSON (keyed by
(inode, mtime_ns, size, ctime_ns)) and, for memoized scans, look inside no unchanged step
directory (see `scan.scan_root`; its entries: `stepmemo`). Reading the metrics file is in
`inforead` (its names are re-exported here). Reads only, never writes."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from .inforead import (
    INFO_FILE,
    MAX_INFO_BYTES,
    read_training_info,
)
from .inforead import _parse_info as _parse_info  # re-exported: scan, classify, tests
from .inforead import _read_info as _read_info
from .inforead import _read_info_at as _read_info_at
from .stepmemo import InfoKey as _InfoKey
from .stepmemo import InfoResult as _InfoResult
from .stepmemo import _StepMemo as _StepMemo

__all__ = [
    "INFO_FILE",
    "MAX_INFO_BYTES",
    "MEMO_TRUST_S",
    "InfoCache",
    "Journal",
    "Listing",
    "read_training_info",
]

#: A step directory's memo entry is trusted only if the scan that made it began at least this long
#: after the directory last changed (st_ctime/st_mtime): far above any timestamp granularity.
MEMO_TRUST_S = 2.0


class Journal(Protocol):
    """What a watcher saw happen in a root (the daemon's `RootWatcher.journals`): set as
    `InfoCache.journal`, it lets a partial scan name a step's entries with no listing of the
    root, from the last full listing and the names created in the root since it began."""

    def mark(self, root: str, identity: tuple[int, int]) -> object | None:
        """A mark of now, taken just before a full listing of ``root`` (the directory of
        (st_dev, st_ino) ``identity``); None when the names created from now on will not be known
        (not watched, or watched by another directory)."""
        ...

    def since(self, root: str, mark: object, identity: tuple[int, int]) -> Collection[str] | None:
        """Every name created in (or renamed into) ``root`` since ``mark``, up to this call
        (events still queued are read first); None when that is not known for certain (events
        lost, the watch ended or watches another directory): the caller lists the root."""
        ...


class Listing:
    """What a full scan's listing of a root found that a partial scan cannot probe for: the
    spellings of a step other than its layout's (``step_07``), by step, and the root's
    (st_dev, st_ino, st_mtime_ns, st_ctime_ns) taken before the listing. While the root still
    has those, no entry was created, removed or renamed in it since, if the listing began at
    least `MEMO_TRUST_S` after the root's last change (``trusted``)."""

    __slots__ = ("layout", "mark", "odd", "stamp", "steps", "trusted")

    def __init__(
        self,
        st: os.stat_result,
        listed_ns: int,
        odd: dict[int, list[str]],
        steps: Mapping[str, object] | None = None,
        layout: str = "",
        mark: object | None = None,
    ) -> None:
        self.stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        self.trusted = listed_ns - max(st.st_mtime_ns, st.st_ctime_ns) >= int(MEMO_TRUST_S * 1e9)
        self.odd = odd
        # The step directories the listing classified, by name (the same scan's step memo, not a
        # copy): a name's step follows from the name alone, so while or after the root changes a
        # partial scan need not classify these again; their spellings of a step other than the
        # layout's are all in ``odd``.
        self.steps: Mapping[str, object] = steps if steps is not None else {}
        self.layout = layout  # the layout the names were classified by
        self.mark = mark  # `Journal.mark` taken before the listing (None: no journal)

    def holds(self, st: os.stat_result) -> bool:
        """Still the root's listing (``st``: the root now)?"""
        return self.trusted and self.stamp == (
            st.st_dev,
            st.st_ino,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )


class InfoCache:
    """Thread-safe cache of parsed training_info.json keyed by path and (inode, mtime_ns, size,
    ctime_ns).

    Entries are grouped per root; a scan of a root drops that root's entries for vanished steps.
    It also holds, per root, the step-directory memo of ``scan_root(..., memo=True)`` (judged by
    ``clock_ns``, the wall clock in ns). A step directory's metrics are kept once: in its memo
    entry (`_StepMemo`) once a full scan made one, else (a save in flight, a partial scan's
    step) as parsed. No plan is kept (every decision of a million checkpoints would be most of
    a keeper's memory, bench P9K): per root only the last look's verdict (`settled.Verdict`, a
    few dozen bytes standing on the memo and listing), which lets a look at a root found as that
    look left it make no records and no plan (bench P3).
    """

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.clock_ns = clock_ns
        self._lock = threading.Lock()
        self._roots: dict[str, dict[str, tuple[_InfoKey, _InfoResult]]] = {}
        self._steps: dict[str, dict[str, _StepMemo]] = {}
        self._sizes: dict[str, dict[tuple[int, int, int], int]] = {}
        self._listings: dict[str, Listing] = {}
        # A root's last look that needed no lock, for the next one (`settled.Verdict`).
        self._verdicts: dict[str, object] = {}
        self.parses = 0  # how many files were actually parsed (for tests and benchmarks)
        self.memo_hits = 0  # step directories a memoized scan did not look inside (for tests)
        self.listing_hits = 0  # partial scans that did not list the root (for tests, benchmarks)
        self.journal: Journal | None = None  # the root's events, where a watcher has them
        self.settled_hits = 0  # looks that found a root as the last look left it (`settled`)

    def get(self, path: Path, key: _InfoKey) -> _InfoResult | None:
        return self.lookup(str(path.parent.parent), path.parent.name, key)

    def put(self, path: Path, key: _InfoKey, result: _InfoResult) -> None:
        self.store(str(path.parent.parent), path.parent.name, key, result)

    def lookup(self, root: str, name: str, key: _InfoKey) -> _InfoResult | None:
        """`get` of the metrics file in ``root/name`` (strings: no path objects on a scan)."""
        with self._lock:
            memo = self._steps.get(root, {}).get(name)
            hit = self._roots.get(root, {}).get(name)
        if memo is not None and memo.info_key == key and memo.of_file:
            return memo.info_result()
        return hit[1] if hit is not None and hit[0] == key else None

    def store(self, root: str, name: str, key: _InfoKey, result: _InfoResult) -> None:
        with self._lock:
            self.parses += 1
            self._roots.setdefault(root, {})[name] = (key, result)

    def retain(self, root: Path, names: Iterable[str]) -> None:
        """Forget the entries of ``root`` whose directory name is not in ``names``."""
        keep = set(names)
        with self._lock:
            entries = self._roots.get(str(root))
            if entries is not None and not keep.issuperset(entries):
                self._roots[str(root)] = {n: v for n, v in entries.items() if n in keep}

    def drop_root(self, root: Path) -> None:
        with self._lock:
            self._roots.pop(str(root), None)
            self._steps.pop(str(root), None)
            self._sizes.pop(str(root), None)
            self._listings.pop(str(root), None)
            self._verdicts.pop(str(root), None)

    def tree_sizes(self, root: Path) -> dict[tuple[int, int, int], int]:
        """Bytes of the checkpoint trees measured in ``root``, by (st_dev, st_ino, st_ctime_ns)."""
        with self._lock:
            return self._sizes.get(str(root), {})

    def keep_tree_sizes(self, root: Path, sizes: dict[tuple[int, int, int], int]) -> None:
        with self._lock:
            self._sizes[str(root)] = sizes  # replaced whole

    def listing(self, root: str) -> Listing | None:
        """The last full scan's `Listing` of ``root`` (None: none yet)."""
        with self._lock:
            return self._listings.get(root)

    def keep_listing(self, root: str, listing: Listing) -> None:
        with self._lock:
            self._listings[root] = listing

    def verdict(self, root: str) -> object | None:
        """The root's `settled.Verdict` (None: none); `settled.settled` judges whether it holds."""
        with self._lock:
            return self._verdicts.get(root)

    def keep_verdict(self, root: str, verdict: object | None) -> None:
        with self._lock:
            if verdict is None:
                self._verdicts.pop(root, None)
            else:
                self._verdicts[root] = verdict

    def used_verdict(self) -> None:
        with self._lock:
            self.settled_hits += 1

    def used_listing(self) -> None:
        with self._lock:
            self.listing_hits += 1

    def step_memo(self, root: str) -> dict[str, _StepMemo]:
        with self._lock:
            return self._steps.get(root, {})

    def set_step_memo(self, root: str, memo: dict[str, _StepMemo], hits: int) -> None:
        with self._lock:
            self._steps[root] = memo  # replaced whole: a concurrent scan of the root reads either
            self._verdicts.pop(root, None)  # it stood on the memo replaced (and would keep it)
            self.memo_hits += hits
            parsed = self._roots.get(root)
            if parsed:  # what the memo holds as the file is not kept twice
                self._roots[root] = {
                    n: v for n, v in parsed.items() if n not in memo or not memo[n].of_file
                }
