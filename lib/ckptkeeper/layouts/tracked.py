"""Layouts whose trainer names its last complete checkpoint in a tracker file at the root.

``megatron``: ``iter_<7 digits>/`` and ``latest_checkpointed_iteration.txt`` (an iteration, or
``release``); ``release/`` is outside the grammar, so never touched. ``deepspeed``:
``global_step<N>/`` tags and ``latest`` (the tag). The trainer writes the tracker after the
checkpoint, so a checkpoint at or below the tracker is complete; one above it is a save in
progress, or abandoned: garbage once untouched for ``stale_after``. Without a usable tracker
nothing is known complete or garbage: every checkpoint-named entry is kept and the tracker is
reported. Neither keeps metrics: recency, unless the policy's ``metrics_file`` names a file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..names import Kind, ParsedName
from .base import (
    COMPLETE_MARKER,
    Look,
    Probe,
    Reader,
    Survey,
    TextReader,
    Tunable,
    metrics_or_empty,
    parse_step,
)

__all__ = ["DEEPSPEED", "MEGATRON", "Tracked"]

_MAX_TRACKER = 4096


@dataclass(frozen=True)
class Tracked(Tunable):
    name: str
    prefix: str
    width: int  # zero padding of the canonical name (0: none)
    tracker_file: str
    default_marker: str = COMPLETE_MARKER
    info_file: str = ""

    def parse(self, name: str) -> ParsedName | None:
        if not name.startswith(self.prefix):
            return None
        digits = name[len(self.prefix) :]
        ascii_digits = all("0" <= c <= "9" for c in digits)
        return parse_step(digits if ascii_digits else None, name, self._canonical)

    def _canonical(self, step: int) -> str:
        return self.format(Kind.STEP, step)

    def format(self, kind: Kind, step: int) -> str:
        return f"{self.prefix}{step:0{self.width}d}" if self.width else f"{self.prefix}{step}"

    def pointers(self, root: Path) -> Mapping[int, str]:
        return self.survey(root, ()).pointers

    def survey(
        self,
        root: Path,
        names: Sequence[str],
        read: Reader | None = None,
        read_text: TextReader | None = None,
    ) -> Survey:
        text, error = (read_text or _read_small)(root / self.tracker_file)
        if text is None:
            return Survey(tracker_error=error)
        value = text.strip()
        step = self._tracked_step(value)
        if step is None:
            why = f"{self.tracker_file} holds {value[:40]!r}, not a {self.name} checkpoint"
            if value == "release":
                return Survey(tracker_error=f"{self.tracker_file} says release")
            return Survey(problems=((self.tracker_file, why),), tracker_error=why)
        pointers = {step: f"named by {self.tracker_file}"}
        problems: tuple[tuple[str, str], ...] = ()
        target = self.format(Kind.STEP, step)
        if names and not any((p := self.parse(n)) is not None and p.step == step for n in names):
            problems = ((self.tracker_file, f"names {target}, which is not in the root"),)
        return Survey(pointers, problems, step)

    def _tracked_step(self, value: str) -> int | None:
        if self.prefix == "iter_":  # megatron writes the bare iteration number
            return int(value) if value.isascii() and value.isdigit() and len(value) <= 30 else None
        parsed = self.parse(value)
        return parsed.step if parsed is not None else None

    def classify(self, parsed: ParsedName, probe: Probe) -> Look:
        survey = probe.survey
        if survey.tracker is None:
            why = survey.tracker_error or f"no {self.tracker_file}"
            return Look(False, waiting=f"{why}: completeness unknown, kept")
        if parsed.step > survey.tracker:
            why = f"above {self.tracker_file} ({survey.tracker}): not complete"
            return Look(False, waiting=why, collectable=True)
        info, error = metrics_or_empty(probe, self.metrics_file)
        return Look(True, info, error)


def _read_small(path: Path) -> tuple[str | None, str]:
    """A small regular file's text (never through a symlink), or (None, why not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, f"no {path.name}"
    except OSError as exc:
        return None, f"{path.name} unreadable: {os.strerror(exc.errno or 0)}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, f"{path.name} is not a regular file"
        raw = os.read(fd, _MAX_TRACKER + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_TRACKER:
        return None, f"{path.name} too large"
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, f"{path.name} is not text"


MEGATRON = Tracked("megatron", "iter_", 7, "latest_checkpointed_iteration.txt")
DEEPSPEED = Tracked("deepspeed", "global_step", 0, "latest")
