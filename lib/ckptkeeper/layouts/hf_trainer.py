"""The ``hf-trainer`` layout: ``checkpoint-<N>/`` written by transformers' ``Trainer``.

HF writes a checkpoint in place, with no commit signal: ``trainer_state.json`` comes last (after
the model, optimizer, scheduler and RNG state), so a checkpoint counts once it holds
``trainer_state.json`` and neither that file nor the directory (a file created in it) changed for
``settle_after``; until then it is in flight and never deleted. The checkpoint HF is writing is
also the newest, which is never deleted whatever its state. HF leaves no temporaries, so
nothing is ever collected as garbage. Metrics: the ``log_history`` entries of the checkpoint's own
``trainer_state.json`` whose ``step`` is N (e.g. ``eval_loss``), or the policy's ``metrics_file``.
Never deleted: the newest checkpoint and the ``best_model_checkpoint`` its trainer_state names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..names import Kind, ParsedName
from .base import (
    COMPLETE_MARKER,
    Look,
    Probe,
    Reader,
    Survey,
    TextReader,
    Tunable,
    parse_step,
    unsettled,
)

__all__ = ["HF_TRAINER", "HfTrainer"]

_RE = re.compile(r"checkpoint-([0-9]+)")
STATE = "trainer_state.json"
_MAX_STATE = 64 * 1024 * 1024


@dataclass(frozen=True)
class HfTrainer(Tunable):
    name: str = "hf-trainer"
    default_marker: str = COMPLETE_MARKER
    info_file: str = STATE
    commit_files: tuple[str, ...] = (STATE,)  # HF writes it last: without it, not complete

    def parse(self, name: str) -> ParsedName | None:
        m = _RE.fullmatch(name)
        return parse_step(None if m is None else m[1], name, self._canonical)

    def _canonical(self, step: int) -> str:
        return self.format(Kind.STEP, step)

    def format(self, kind: Kind, step: int) -> str:
        return f"checkpoint-{step}"

    def pointers(self, root: Path) -> Mapping[int, str]:
        with os.scandir(root) as it:
            return self.survey(root, [e.name for e in it]).pointers

    def survey(
        self,
        root: Path,
        names: Sequence[str],
        read: Reader | None = None,
        read_text: TextReader | None = None,  # reads no text file: accepted, so usable on S3
    ) -> Survey:
        """The newest checkpoint, and the best one its trainer_state.json names."""
        steps = sorted(
            (p.step for n in names if (p := self.parse(n)) is not None and p.canonical),
            reverse=True,
        )
        if not steps:
            return Survey()
        newest = steps[0]
        pointers = {newest: "newest checkpoint (HF resumes from it)"}
        problems: list[tuple[str, str]] = []
        for step in steps:  # the newest readable trainer_state.json names the best
            name = self.format(Kind.STEP, step)
            state, why = (read or _load)(root / name / STATE)
            if state is None:
                if why != f"no {STATE}":
                    problems.append((name, f"{why}: best_model_checkpoint read from an older one"))
                continue
            best = state.get("best_model_checkpoint")
            if isinstance(best, str) and best:
                parsed = self.parse(os.path.basename(best.rstrip("/")))
                if parsed is not None:
                    pointers.setdefault(parsed.step, f"best_model_checkpoint in {name}/{STATE}")
            break
        return Survey(pointers, tuple(problems))

    def classify(self, parsed: ParsedName, probe: Probe) -> Look:
        written = probe.changed(STATE)
        if written is None:
            return Look(False, waiting=f"no {STATE} (HF writes in place): not complete, kept")
        if (look := unsettled(probe, self.settle_after, written)) is not None:
            return look
        if self.metrics_file:
            info, why = probe.read_json(self.metrics_file)
            return Look(True, info, why)
        state, why = probe.read_json(STATE)
        if state is None:
            return Look(True, None, why)
        return Look(True, _metrics_at(state, parsed.step), None)


def _metrics_at(state: Mapping[str, Any], step: int) -> dict[str, Any]:
    """The log_history entries of ``step`` merged (later entries win), with the step."""
    out: dict[str, Any] = {}
    history = state.get("log_history")
    for entry in history if isinstance(history, list) else ():
        if isinstance(entry, dict) and entry.get("step") == step:
            out.update(entry)
    out["step"] = step
    return out


def _load(path: Path) -> tuple[Mapping[str, Any] | None, str | None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, f"no {STATE}"
    except OSError as exc:
        return None, f"{STATE} unreadable: {os.strerror(exc.errno or 0)}"
    with os.fdopen(fd, "rb") as fh:
        try:
            raw = fh.read(_MAX_STATE + 1)
        except OSError as exc:
            return None, f"{STATE} unreadable: {os.strerror(exc.errno or 0)}"
    if len(raw) > _MAX_STATE:
        return None, f"{STATE} too large"
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None, f"{STATE} is not valid JSON"
    return (data, "") if isinstance(data, dict) else (None, f"{STATE} is not a JSON object")


HF_TRAINER = HfTrainer()
