"""What a layout may add to the name grammar: a look inside each entry, a survey of the root.

A layout that only names things (`nemo-rl`, most third-party layouts) implements the `Layout`
protocol alone: an entry's kind comes from its name, a ``tmp`` save is complete once its marker
exists. A layout whose commit signal is inside the checkpoint (a file written last, a tracker
file, a settle time) also implements `Classifier`: the scanner hands it each entry through a
read-only `Probe` and it says whether the entry is a checkpoint, with its metrics, or a save not
(yet) complete, and whether that may ever be collected. A layout with a root-level tracker
implements `Surveyor`: read once per scan, it names the steps that must never go and what is
wrong with the tracker. The hooks are optional, so existing layouts keep working unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..names import Kind, ParsedName

__all__ = [
    "COMPLETE_MARKER",
    "PIN_FILE",
    "SETTLE_AFTER",
    "WRITER_LOCK",
    "Classifier",
    "Conventions",
    "Look",
    "Probe",
    "Reader",
    "Resolver",
    "Survey",
    "Surveyor",
    "TextReader",
    "Tunable",
    "age_text",
    "commit_files",
    "metrics_or_empty",
    "settling",
    "unsettled",
]

Info = tuple[Mapping[str, Any] | None, str | None]

# The ckptkeeper protocol's own names (DESIGN.md section 2), not a framework's: every layout
# spells them the same way.
#: Inside a checkpoint (beside a file checkpoint: ``<name>.KEEP``): never deleted by policy.
PIN_FILE = "KEEP"
#: A writer may hold ``flock(LOCK_EX)`` on it while it writes.
WRITER_LOCK = ".writer.lock"
#: The protocol's completion marker, for a layout whose framework has none of its own.
COMPLETE_MARKER = ".complete"
#: The policy's default ``settle_after`` (seconds), for a layout without a commit signal.
SETTLE_AFTER = 120.0


@dataclass(frozen=True, kw_only=True)
class Conventions:
    """What every built-in layout spells the same way: the protocol's pin file and writer lock,
    and no config file unless the framework has one. Keyword-only, so a layout's own fields keep
    their positions."""

    pin_file: str = PIN_FILE
    writer_lock: str = WRITER_LOCK
    config_file: str = ""


@dataclass(frozen=True, kw_only=True)
class Tunable(Conventions):
    """A layout that takes the policy's ``metrics_file`` and ``settle_after`` (`configured`
    sets them; a layout without these fields keeps its own metrics and commit signal)."""

    metrics_file: str | None = None
    settle_after: float = SETTLE_AFTER


@dataclass(frozen=True, slots=True)
class Survey:
    """What a layout read once per scan at the root's top level."""

    pointers: Mapping[int, str] = field(default_factory=dict)  # step -> why it must stay
    problems: tuple[tuple[str, str], ...] = ()  # (entry name, what is wrong): reported
    tracker: int | None = None  # the step a tracker file names (None: none, or unreadable)
    tracker_error: str = ""  # why there is no usable tracker ("" when there is one)


@dataclass(frozen=True, slots=True)
class Look:
    """A layout's verdict on one entry: a checkpoint (``complete``) with its metrics, or a save
    that is not complete, with why (``waiting``) and whether it is garbage once untouched for
    ``stale_after`` (``collectable``)."""

    complete: bool
    info: Mapping[str, Any] | None = None
    info_error: str | None = None
    waiting: str = ""
    collectable: bool = False
    settles_at: float | None = None  # not complete only until then, if nothing changes


class Probe(Protocol):
    """A read-only look inside one entry of the root (never follows a symlink)."""

    @property
    def path(self) -> Path: ...

    @property
    def is_dir(self) -> bool: ...

    @property
    def now(self) -> float: ...

    @property
    def survey(self) -> Survey: ...

    def exists(self, rel: str) -> bool:
        """Does ``<entry>/<rel>`` exist (a symlink counts, it is not followed)?"""
        ...

    def read_json(self, rel: str) -> Info:
        """``<entry>/<rel>`` as a JSON object, or (None, why not)."""
        ...

    def last_change(self, stop_above: float | None = None) -> float:
        """The newest mtime or ctime in the entry's tree (stops above ``stop_above``)."""
        ...

    def changed(self, rel: str) -> float | None:
        """The mtime or ctime (the newer) of ``<entry>/<rel>`` ("" for the entry itself);
        None when it does not exist."""
        ...


@runtime_checkable
class Classifier(Protocol):
    def classify(self, parsed: ParsedName, probe: Probe) -> Look: ...


#: Reads a JSON object file (through the scan's cache when there is one): (object, None) or
#: (None, why not).
Reader = Callable[[Path], Info]
#: Reads a small text file at the root (a tracker): (text, "") or (None, why not).
TextReader = Callable[[Path], tuple[str | None, str]]


@runtime_checkable
class Surveyor(Protocol):
    """``read``/``read_text`` are the storage's readers (given on every storage but POSIX, where
    a surveyor may read the files itself): a surveyor that reads files must read them through
    these when given. One without a ``read_text`` parameter is not used on an object store."""

    def survey(self, root: Path, names: Sequence[str], read: Reader | None = None) -> Survey: ...


@runtime_checkable
class Resolver(Protocol):
    """A layout that picks the real layout of a root from its entry names (``auto``)."""

    def resolve(self, names: Sequence[str]) -> tuple[Any, str]: ...


def commit_files(layout: Any) -> tuple[str, ...]:
    """The files whose presence makes a checkpoint of ``layout`` complete (its commit signal):
    removed first when it is deleted from an object store, so that no resume loads a
    half-deleted checkpoint. A layout says so with ``commit_files``; else its default marker."""
    files = getattr(layout, "commit_files", None)
    return tuple(files) if files else (str(layout.default_marker),)


def age_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def metrics_or_empty(probe: Probe, metrics_file: str | None) -> Info:
    """The policy's ``metrics_file`` inside the checkpoint, or no metrics (ranked by recency)."""
    if metrics_file:
        return probe.read_json(metrics_file)
    return {}, None


def settling(probe: Probe, settle_after: float, last_written: float) -> str:
    """Why a checkpoint without a commit signal does not count yet ("" once it has settled):
    `unsettled`'s ``waiting``."""
    look = unsettled(probe, settle_after, last_written)
    return "" if look is None else look.waiting


def unsettled(probe: Probe, settle_after: float, last_written: float) -> Look | None:
    """A checkpoint without a commit signal that does not count yet, with why and when it
    settles if nothing changes (``settles_at``): the entry itself (a file created in it) or the
    file its writer writes last, in place (which changed at ``last_written``), changed within
    ``settle_after``. None once it has settled."""
    last = max(probe.changed("") or probe.now, last_written)
    settles_at = last + settle_after
    if settles_at <= probe.now:
        return None
    ago, settle = age_text(probe.now - last), age_text(settle_after)
    why = f"settling: last write {ago} ago (settle_after {settle})"
    return Look(False, waiting=why, settles_at=settles_at)


#: More digits than this are not a step (an int of them would be unreasonably large to parse).
MAX_STEP_DIGITS = 30


def parse_step(digits: str | None, name: str, canonical: Callable[[int], str]) -> ParsedName | None:
    """``name`` as a complete checkpoint of step ``digits`` (ASCII digits already matched by the
    layout's grammar, None when it did not match); ``canonical`` spells a step's own name."""
    if digits is None or not digits or len(digits) > MAX_STEP_DIGITS:
        return None
    step = int(digits)
    return ParsedName(Kind.STEP, step, name, name == canonical(step))
