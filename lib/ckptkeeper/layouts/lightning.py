"""The ``lightning`` layout: ``*.ckpt`` files written by Lightning's ``ModelCheckpoint``.

A checkpoint is a file (a directory with sharded strategies) whose name holds ``step=<N>``, e.g.
``epoch=0-step=100-val_loss=0.1234.ckpt`` from ``filename="{epoch}-{step}-{val_loss:.4f}"``; its
metrics are the ``key=value`` parts of the name. Lightning writes the file to a temporary in the
system's temp directory and moves it in: a rename on the same filesystem, a copy from another one,
so a checkpoint counts once it is untouched for ``settle_after`` (until then it is in flight).
``last.ckpt`` is outside the grammar (never touched); when it is a
symlink, the checkpoint it names inside the root is never deleted (the link is read, never
followed). A file checkpoint is pinned by ``<name>.KEEP`` beside it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..names import Kind, ParsedName
from .base import COMPLETE_MARKER, Look, Probe, Reader, Survey, Tunable, unsettled

__all__ = ["LIGHTNING", "Lightning"]

_PART = re.compile(r"-(?=[A-Za-z_][A-Za-z0-9_./]*=)")
_STEP = re.compile(r"[0-9]+")
LAST = "last.ckpt"


@dataclass(frozen=True)
class Lightning(Tunable):
    name: str = "lightning"
    default_marker: str = COMPLETE_MARKER
    info_file: str = ""
    file_checkpoints: bool = True

    def parse(self, name: str) -> ParsedName | None:
        fields = _fields(name)
        step = fields.get("step") if fields is not None else None
        if step is None or _STEP.fullmatch(step) is None or len(step) > 30:
            return None
        return ParsedName(Kind.STEP, int(step), name, True)

    def format(self, kind: Kind, step: int) -> str:
        return f"step={step}.ckpt"

    def pin_paths(self, path: Path) -> tuple[Path, ...]:
        return (path.with_name(path.name + "." + self.pin_file), path / self.pin_file)

    def pointers(self, root: Path) -> Mapping[int, str]:
        return self.survey(root, ()).pointers

    def survey(self, root: Path, names: Sequence[str], read: Reader | None = None) -> Survey:
        try:
            target = os.readlink(root / LAST)
        except OSError:  # none, or a plain copy (outside the grammar either way)
            return Survey()
        inside = os.path.dirname(target) in ("", ".") or (
            os.path.isabs(target) and Path(os.path.dirname(target)) == root
        )
        parsed = self.parse(os.path.basename(target))
        if not inside:
            return Survey(
                problems=((LAST, f"symlink to {target!r} outside the root: not followed"),)
            )
        if parsed is None:
            return Survey()
        return Survey({parsed.step: f"target of {LAST}"})

    def classify(self, parsed: ParsedName, probe: Probe) -> Look:
        if (
            look := unsettled(probe, self.settle_after, probe.changed("") or probe.now)
        ) is not None:
            return look
        fields = _fields(parsed.name) or {}
        info: dict[str, Any] = {k: _number(v) for k, v in fields.items()}
        return Look(True, info, None)


def _fields(name: str) -> dict[str, str] | None:
    """``epoch=0-step=100-val_loss=0.1234.ckpt`` -> {"epoch": "0", "step": "100", ...}."""
    if not name.endswith(".ckpt"):
        return None
    out: dict[str, str] = {}
    for part in _PART.split(name[: -len(".ckpt")]):
        key, sep, value = part.partition("=")
        if sep and key:
            out[key] = value
    return out


def _number(text: str) -> float | str:
    """A number as written (``nan`` stays NaN: the planner ranks it last), else the text."""
    try:
        return float(text)
    except ValueError:
        return text


LIGHTNING = Lightning()
