"""Read one checkpoint root into plain records (`records.RootScan`). Reads only, never writes.
The probes beside the listing (writer lock, last change, the trash) are in `probes`.

Symlinks are never followed: a ``step_N`` that is a symlink or a regular file is an anomaly.
Parsed ``training_info.json`` is cached by (inode, mtime_ns, size, ctime_ns) so a repeated scan
of an unchanged root parses no JSON.

With ``memo=True`` (and a cache) a scan also reuses what the previous scan found inside a
``step_N`` directory (its ``KEEP``) when that directory is unchanged, so an unchanged
step costs two ``lstat`` calls: its directory and its training_info.json. "Unchanged" means the
same (st_dev, st_ino, st_mtime_ns, st_ctime_ns): creating, removing or renaming an entry in a
directory updates its mtime and ctime, and ``utime`` cannot set the ctime. A timestamp has a
granularity (a kernel tick, a second on some filesystems), so a change made within the same tick
as the last one would leave the times equal: an entry is reused only if the previous scan began
at least `MEMO_TRUST_S` after the directory's last change, and then any later change gives it a
later time. training_info.json is still stat'ed on every scan (a rewrite in place changes its own
times, not the directory's). ``tmp_step_N``, ``old_step_N`` and the trash are always read in full.
A memoized scan is for deciding whether to act; what is acted on comes from a scan without it, so
a stale memo can delay an action by a pass, never cause one. (On NFS the directory's times are as
fresh as the client's attribute cache, which also bounds the per-file ``lstat`` they replace:
negative lookups of ``KEEP`` are revalidated by the same directory times.)
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections import defaultdict
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .classify import classify_entry
from .dirfd import DIR_FLAGS
from .errors import errno_text
from .info import (
    INFO_FILE,
    MAX_INFO_BYTES,
    MEMO_TRUST_S,
    InfoCache,
    Listing,
    _read_info,
    _read_info_at,
    _StepMemo,
    read_training_info,
)
from .layouts import (
    NEMO_RL,
    Classifier,
    Layout,
    Refused,
    Resolver,
    Survey,
    file_checkpoints,
    survey,
)
from .names import Kind
from .probes import (
    CKPTKEEPER_DIR,
    WRITER_LOCK,
    LockProbe,
    exists,
    newest_mtime,
    parse_trash_name,
    probe_writer_lock,
    scan_trash,
    stale_probe,
    trash_dir,
    writer_lock_held,
)
from .records import Anomaly, Checkpoint, InFlight, Leftover, RootScan, TrashEntry

if TYPE_CHECKING:
    from .coldcache import MetricsSeed

__all__ = [
    "CKPTKEEPER_DIR",
    "INFO_FILE",
    "MAX_INFO_BYTES",
    "MEMO_TRUST_S",
    "PIN_FILE",
    "WRITER_LOCK",
    "InfoCache",
    "LockProbe",
    "newest_mtime",
    "parse_trash_name",
    "probe_writer_lock",
    "read_training_info",
    "scan_root",
    "trash_dir",
    "writer_lock_held",
]

PIN_FILE = NEMO_RL.pin_file  # the nemo-rl layout's (a scan uses its layout's)


def scan_root(
    root: Path,
    *,
    marker: str = "",
    cache: InfoCache | None = None,
    stale_before: float | None = None,
    memo: bool = False,
    layout: Layout = NEMO_RL,
    steps: Collection[int] | None = None,
    seed: MetricsSeed | None = None,
) -> RootScan:
    """Scan ``root`` as ``layout`` names it. ``marker``: the completion marker ("" for the
    layout's). ``stale_before`` (epoch seconds): probe unmarked tmp dirs for staleness.

    ``memo`` (needs ``cache``): reuse the previous scan's findings inside unchanged ``step_N``
    directories (module docstring). Every full scan with a cache refreshes the memo.

    ``steps``: a partial scan of these steps only (a marker's save: its cost does not grow with
    the root). Any spelling of a step (``step_07`` beside ``step_7``) must be seen for the step
    to be called ambiguous as a full scan would: the root is listed, unless the cache's last full
    listing still holds, or the cache's `info.Journal` (the daemon's watch of the root) names
    every entry created since that listing began; only the entries of ``steps`` are looked at,
    and their records are those a full scan makes. No trash, and the cache's memo and entries of
    other steps are left as they are.

    ``seed``: metrics files are read through it (`coldcache`: a cron sweep's unlocked look).

    Raises OSError only when the root itself cannot be listed.
    """
    root = Path(root)
    scanner = _Scanner(root, layout, marker or layout.default_marker, cache, stale_before, memo)
    scanner.only = None if steps is None else frozenset(steps)
    scanner.seed = seed
    # Entries are stat'ed relative to a descriptor of the root (a one-component lookup each),
    # which also reaches the trash without following a symlink.
    try:
        root_fd = os.open(root, DIR_FLAGS)
        direct = True
    except NotADirectoryError:  # a symlink (its trash is refused below) or not a directory
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        direct = False
    try:
        scanner.read_entries(root_fd)
        partial = scanner.only is not None
        trash = [] if partial else scan_trash(root, scanner.anomalies, root_fd if direct else None)
    finally:
        os.close(root_fd)
    return scanner.result(trash)


class _Scanner:
    """One scan of one root: groups the entries by step, then makes a record of each group."""

    def __init__(
        self,
        root: Path,
        layout: Layout,
        marker: str,
        cache: InfoCache | None,
        stale_before: float | None,
        memo: bool,
    ) -> None:
        self.root, self.layout, self.marker = root, layout, marker
        self.cache, self.stale_before = cache, stale_before
        self.started_ns = cache.clock_ns() if cache is not None else time.time_ns()
        self.previous = cache.step_memo(str(root)) if cache is not None else {}
        self.trusted = self.previous if memo else {}
        self.info_below = "/" + layout.info_file
        self.root_str = str(root)  # the hot loop names files by strings, not path objects
        self.root_fd = -1  # set by read_entries
        self.steps: list[Checkpoint] = []
        self.in_flight: list[InFlight] = []
        self.leftovers: list[Leftover] = []
        self.anomalies: list[Anomaly] = []
        self.ambiguous: set[int] = set()
        self.memo_out: dict[str, _StepMemo] = {}
        self.hits = 0
        self.layout_reason = ""
        self.survey = Survey()
        self.classifier = False  # the layout looks inside entries (set once the root is listed)
        self.only: frozenset[int] | None = None  # a partial scan of these steps (`scan_root`)
        self.root_st: os.stat_result | None = None  # the root before the listing (with a cache)
        self.spellings: dict[int, list[str]] = defaultdict(list)  # non-canonical names by step
        self.mark: object | None = None  # the cache's `Journal.mark` before a full listing
        self.seed: MetricsSeed | None = None  # metrics read through it (`scan_root`)

    def read_entries(self, root_fd: int) -> None:
        self.root_fd = root_fd
        if self.cache is not None:
            self.root_st = os.fstat(root_fd)  # before the listing: see `info.Listing`
        groups = self.group_entries()
        for (step, order), names in sorted(groups.items()):
            if len(names) > 1:
                both = " and ".join(sorted(names))
                for name in names:
                    self.odd(name, f"ambiguous: {both} name one step", step)
                self.ambiguous.add(step)
                continue
            name = names[0]
            try:
                st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            except OSError as exc:
                self.odd(name, f"cannot stat: {errno_text(exc)}", step)
                continue
            if self.classifier:
                self.classified(root_fd, name, st)
            elif order == _STEP:
                self.steps.append(self.checkpoint(root_fd, name, step, st))
            else:
                self.save_or_leftover(name, step, order, st)
        if self.cache is not None and self.only is None:
            self.cache.retain(self.root, [name for names in groups.values() for name in names])

    def group_entries(self) -> dict[tuple[int, int], list[str]]:
        """Checkpoint-named directories keyed by (step, kind order); the rest are anomalies."""
        groups: dict[tuple[int, int], list[str]] = defaultdict(list)
        if self.only is not None and self.probes_names():
            self.group_some(groups)
            return groups
        self.mark = self.journal_mark()
        with os.scandir(self.root) as it:  # by path: scandir(fd) costs 6 more system calls
            entries = list(it)
        self.look_around([entry.name for entry in entries])
        files = file_checkpoints(self.layout)
        for entry in entries:
            name = entry.name
            if (key := self.classify(name)) is None:
                continue
            step = key[0]
            if self.only is not None and step not in self.only:
                continue
            if key[2]:  # not the layout's spelling: a partial scan cannot probe for it
                self.spellings[step].append(name)
            try:
                # Not following symlinks, a directory is a real one (d_type; lstat if unknown).
                if entry.is_dir(follow_symlinks=False) or (
                    files and entry.is_file(follow_symlinks=False)
                ):
                    groups[key[:2]].append(name)
                    continue
                odd = "symlink: not followed" if entry.is_symlink() else "not a directory"
            except OSError as exc:
                odd = f"cannot stat: {errno_text(exc)}"
            self.odd(name, odd, step)
        return groups

    def look_around(self, names: list[str]) -> None:
        """The root's own entries: ``auto`` picks the layout, a tracker is read (once)."""
        if _shape(self.layout)[0]:
            assert isinstance(self.layout, Resolver)
            self.layout, self.layout_reason = self.layout.resolve(names)
            self.info_below = "/" + self.layout.info_file
            if isinstance(self.layout, Refused):
                self.anomalies.append(Anomaly(self.root, self.layout.reason))
        self.classifier = _shape(self.layout)[1]
        if self.classifier:
            cache = self.cache
            self.survey = survey(self.layout, self.root, names, lambda p: _read_info(p, cache)[0])
            for name, why in self.survey.problems:
                self.anomalies.append(Anomaly(self.root / name, why))

    def classified(self, root_fd: int, name: str, st: os.stat_result) -> None:
        """An entry of a layout that looks inside (`classify.classify_entry`). A checkpoint is
        memoized as a ``step_N`` is (`checkpoint`): its verdict and metrics are reused while the
        entry (and the layout's ``info_file`` in it) is unchanged."""
        known = self.trusted.get(name)
        if known is not None and self.unchanged(root_fd, name, known, st):
            self.hits += 1
            self.memo_out[sys.intern(name)] = known
            self.steps.append(known.record(self.root / name))
            return
        # The layout's info_file, stat'ed before the layout reads it (a rewrite after that
        # changes the key the memo keeps) and handed to the probe (not stat'ed twice).
        seen = self.info_stat(root_fd, name, st)
        info_key = None
        if seen and (ist := seen[self.layout.info_file]) is not None and stat.S_ISREG(ist.st_mode):
            info_key = (ist.st_ino, ist.st_mtime_ns, ist.st_size, ist.st_ctime_ns)
        now = self.started_ns / 1e9
        record = classify_entry(
            self.layout, self.root / name, st, now, self.survey, self.cache, self.stale_before, seen
        )
        if isinstance(record, InFlight):
            self.in_flight.append(record)
            return
        self.steps.append(record)
        self.remember(name, st, info_key, record, derived=True)

    def info_stat(
        self, root_fd: int, name: str, st: os.stat_result
    ) -> dict[str, os.stat_result | None]:
        """{info_file: its lstat, None if missing} inside a directory entry; {} when the layout
        has no info_file or the entry is a file."""
        if not self.info_below[1:] or not stat.S_ISDIR(st.st_mode):
            return {}
        try:
            ist = os.stat(name + self.info_below, dir_fd=root_fd, follow_symlinks=False)
        except OSError:
            ist = None
        return {self.layout.info_file: ist}

    def info_key(
        self, root_fd: int, name: str, st: os.stat_result
    ) -> tuple[int, int, int, int] | None:
        """The key of the layout's ``info_file`` inside a directory entry (None: none there)."""
        ist = self.info_stat(root_fd, name, st).get(self.layout.info_file)
        if ist is None or not stat.S_ISREG(ist.st_mode):
            return None
        return (ist.st_ino, ist.st_mtime_ns, ist.st_size, ist.st_ctime_ns)

    def probes_names(self) -> bool:
        """Can a partial scan go by names alone? Not for a layout that is resolved from the
        root's entries, looks inside them, or keeps checkpoints as files: those list the root
        as a full scan does (keeping only the steps asked for)."""
        layout = self.layout
        return not (any(_shape(layout)) or file_checkpoints(layout))

    def classify(self, name: str) -> tuple[int, int, bool] | None:
        """(step, kind order, not the layout's spelling) of a checkpoint name; None for any
        other name."""
        known = self.previous.get(name)
        if known is not None:  # a step directory last time: no need to parse its name
            step = known.step
            return step, _STEP, name != self.layout.format(Kind.STEP, step)
        if (parsed := self.layout.parse(name)) is not None:
            return parsed.step, _ORDER[parsed.kind], not parsed.canonical
        return None

    def group_some(self, groups: dict[tuple[int, int], list[str]]) -> None:
        """`group_entries` of a partial scan, and an ``lstat`` of the few names of
        ``self.only``: every spelling the layout gives them, and those the last full listing
        found, while the root is unchanged since a trusted listing (`info.Listing`) or with the
        names created since the listing (`created_since`); otherwise the names of a listing (no
        directory entry objects)."""
        only = self.only
        assert only is not None
        names, probing = self.names_of(only)
        for name in names:
            key = self.classify(name)
            if key is None or key[0] not in only:
                continue
            try:
                mode = os.stat(name, dir_fd=self.root_fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                if probing:
                    continue  # not there: the spelling a probe tried
                self.odd(name, "cannot stat: No such file or directory", key[0])
                continue
            except OSError as exc:
                self.odd(name, f"cannot stat: {errno_text(exc)}", key[0])
                continue
            if stat.S_ISDIR(mode):
                groups[key[:2]].append(name)
            else:
                odd = "symlink: not followed" if stat.S_ISLNK(mode) else "not a directory"
                self.odd(name, odd, key[0])

    def names_of(self, only: frozenset[int]) -> tuple[list[str], bool]:
        """The names a partial scan looks at, and whether they are probes (may not exist)."""
        listing = None if self.cache is None else self.cache.listing(self.root_str)
        if listing is not None and listing.layout != self.layout.name:
            listing = None  # classified by another layout: its names say nothing here
        spelled = (
            []
            if listing is None
            else [
                name
                for n in sorted(only)
                for name in (
                    *(self.layout.format(kind, n) for kind in _KINDS),
                    *listing.odd.get(n, ()),
                )
            ]
        )
        if listing is not None and self.root_st is not None and listing.holds(self.root_st):
            assert self.cache is not None
            self.cache.used_listing()
            return spelled, True
        if listing is not None and (created := self.created_since(listing)) is not None:
            # Names created since the listing began, as the root's watch saw them: any of
            # ``only`` among them is looked at too (`group_some` keeps only those).
            return list(dict.fromkeys([*spelled, *created])), True
        names = os.listdir(self.root)
        if listing is None or not listing.steps:
            return names, False
        # The root changed since the last full listing: of the names it classified as step
        # directories only those spelled for `only` (the layout's or the odd ones it found) can
        # be of these steps; every other name is new to it and classified by the caller.
        present = set(names)
        fresh = present.difference(listing.steps)
        return [*fresh, *(n for n in spelled if n in present and n not in fresh)], False

    def journal_mark(self) -> object | None:
        """`Journal.mark` for the listing about to begin (None without a cache's journal)."""
        journal = None if self.cache is None else self.cache.journal
        if journal is None or self.root_st is None or self.only is not None:
            return None
        return journal.mark(self.root_str, (self.root_st.st_dev, self.root_st.st_ino))

    def created_since(self, listing: Listing) -> list[str] | None:
        """The names created in the root since ``listing`` began, as the cache's journal saw
        them, when it knows them all (the root still the directory listed); else None."""
        journal = None if self.cache is None else self.cache.journal
        st = self.root_st
        if journal is None or listing.mark is None or st is None:
            return None
        if listing.stamp[:2] != (st.st_dev, st.st_ino):
            return None  # another directory there now
        created = journal.since(self.root_str, listing.mark, (st.st_dev, st.st_ino))
        if created is None:
            return None
        assert self.cache is not None
        self.cache.used_listing()
        return [name for name in created if self.classify(name) is not None]

    def checkpoint(self, root_fd: int, name: str, step: int, st: os.stat_result) -> Checkpoint:
        known = self.trusted.get(name)
        if known is not None and self.unchanged(root_fd, name, known, st):
            self.hits += 1
            self.memo_out[sys.intern(name)] = known
            return known.record(self.root / name)
        layout = self.layout
        (info, why), info_key = self.info(name)
        # No probe for the layout's config_file: nothing acts on its presence (the settings
        # resolver reads the newest step's config.yaml itself), so ``config_yaml`` stays None.
        pinned = None if self.seed is None else self.seed.pinned(name, st)
        if pinned is None:
            pinned = exists(f"{name}/{layout.pin_file}", root_fd)
            if self.seed is not None:
                self.seed.probed(name, st, pinned)
        identity = (st.st_dev, st.st_ino)
        record = Checkpoint(step, self.root / name, info, why, pinned, identity)
        self.remember(name, st, info_key, record)
        return record

    def remember(
        self,
        name: str,
        st: os.stat_result,
        key: tuple[int, int, int, int] | None,
        record: Checkpoint,
        derived: bool = False,
    ) -> None:
        """A memo entry for the next memoized scan (with a cache); ``derived``: see
        `_StepMemo.make`."""
        if self.cache is not None and record.path.name == name:
            trusted = self.started_ns - max(st.st_mtime_ns, st.st_ctime_ns) >= _MEMO_TRUST_NS
            if (entry := _StepMemo.make(st, trusted, key, record, derived)) is not None:
                self.memo_out[sys.intern(name)] = entry

    def unchanged(self, root_fd: int, name: str, known: _StepMemo, st: os.stat_result) -> bool:
        """Unchanged since a scan that came MEMO_TRUST_S after its last change: no entry was
        created or removed in it since. Only the metrics file may have been rewritten in place,
        which changes its own key: look at that alone."""
        if not known.matches(st):
            return False
        if self.classifier and known.info_key is None:  # no info_file to re-check (a .ckpt)
            return self.info_key(root_fd, name, st) is None
        try:
            ist = os.stat(name + self.info_below, dir_fd=root_fd, follow_symlinks=False)
        except OSError:
            return False
        key = (ist.st_ino, ist.st_mtime_ns, ist.st_size, ist.st_ctime_ns)
        return key == known.info_key and stat.S_ISREG(ist.st_mode)

    def info(self, name: str) -> tuple[tuple[Any, str | None], tuple[int, int, int, int] | None]:
        """The metrics file of ``name`` (read relative to the root's descriptor) and its key."""
        rel, label = name + self.info_below, self.layout.info_file
        if self.seed is not None:
            return self.seed.read(self.root_fd, rel, name, label)
        return _read_info_at(self.root_fd, rel, (self.root_str, name), label, self.cache)

    def save_or_leftover(self, name: str, step: int, order: int, st: os.stat_result) -> None:
        path, layout = self.root / name, self.layout
        identity = (st.st_dev, st.st_ino)
        info, why = self.info(name)[0]
        pinned = exists(f"{name}/{layout.pin_file}", self.root_fd)
        if order == _OLD:
            self.leftovers.append(Leftover(step, path, identity, info, why, pinned))
            return
        complete = exists(f"{name}/{self.marker}", self.root_fd)
        probed = (
            stale_probe(path, layout.writer_lock, self.stale_before)
            if not complete
            else (None, None, None)
        )
        locked, newest, unreadable = probed
        self.in_flight.append(
            InFlight(step, path, complete, info, why, pinned, identity, locked, newest, unreadable)
        )

    def odd(self, name: str, why: str, step: int | None) -> None:
        self.anomalies.append(Anomaly(self.root / name, why, step))

    def result(self, trash: list[TrashEntry]) -> RootScan:
        if self.cache is not None and self.only is None:
            self.cache.set_step_memo(str(self.root), self.memo_out, self.hits)
            if self.root_st is not None:
                spellings = dict(self.spellings)
                listing = Listing(
                    self.root_st,
                    self.started_ns,
                    spellings,
                    self.memo_out,
                    self.layout.name,
                    self.mark,
                )
                self.cache.keep_listing(self.root_str, listing)
        return RootScan(
            self.root,
            tuple(self.steps),
            tuple(self.in_flight),
            tuple(self.leftovers),
            tuple(sorted(trash, key=lambda t: t.path.name)),
            tuple(self.anomalies),
            frozenset(self.ambiguous),
            layout=self.layout,
            layout_reason=self.layout_reason,
            pointers=self.survey.pointers,
        )


# (is a Resolver, is a Classifier) by layout: a runtime protocol check costs about 7 us, twice
# per root. Layouts are immutable (`Layout`); each is held here, so its id is not reused.
_SHAPES: dict[int, tuple[Layout, bool, bool]] = {}


def _shape(layout: Layout) -> tuple[bool, bool]:
    known = _SHAPES.get(id(layout))
    if known is None or known[0] is not layout:
        if len(_SHAPES) >= 256:
            _SHAPES.clear()
        known = (layout, isinstance(layout, Resolver), isinstance(layout, Classifier))
        _SHAPES[id(layout)] = known
    return known[1], known[2]


# The order of the kinds of one step in a scan's records (alphabetical, as it always was).
_OLD, _STEP, _TMP = 0, 1, 2
_ORDER = {Kind.OLD: _OLD, Kind.STEP: _STEP, Kind.TMP: _TMP}
_KINDS = (Kind.OLD, Kind.STEP, Kind.TMP)
_MEMO_TRUST_NS = int(MEMO_TRUST_S * 1e9)
