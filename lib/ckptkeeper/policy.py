"""Retention policy: validated settings and small composable keep rules.

A step is kept if any rule keeps it. Deletion needs a bounding rule (``keep_top_k`` or
``keep_latest_n``); without one nothing is deleted. ``min_free`` bounds by free disk space instead
(`ckptkeeper.pressure`, DESIGN section 13). Every rule returns reasons, so every decision can be
explained. No I/O here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from .layouts import DEFAULT_LAYOUT, NEMO_RL, Layout, LayoutError, configured, get_layout
from .layouts.base import PIN_FILE, SETTLE_AFTER
from .records import Checkpoint
from .sizes import MinFree, parse_min_free

__all__ = [
    "PROTOCOL_FILES",
    "KeepEveryN",
    "KeepLatest",
    "KeepLatestN",
    "KeepPinned",
    "KeepTopK",
    "KeepUnranked",
    "Policy",
    "PolicyError",
    "Rule",
    "Verdicts",
    "format_duration",
    "metric_value",
    "parse_duration",
]


class PolicyError(ValueError):
    """An invalid policy value; ``key`` names the offending key."""

    def __init__(self, key: str, reason: str, source: str | None = None) -> None:
        self.key = key
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {reason}")


_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d)")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str | int | float, key: str = "duration") -> float:
    """``"30s"``, ``"10m"``, ``"6h"``, ``"2d"`` (or a number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise PolicyError(key, f"expected a duration like '30s', '10m', '6h', '2d', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())):
        seconds = float(m[1]) * _UNIT_SECONDS[m[2]]
    else:
        raise PolicyError(key, f"expected a duration like '30s', '10m', '6h', '2d', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise PolicyError(key, f"duration must be a finite number >= 0, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True, slots=True)
class Policy:
    """Everything that decides what happens in one root. Immutable and validated on creation."""

    keep_top_k: int | None = None
    metric_name: str | None = None
    higher_is_better: bool = False
    save_period: int = 1
    keep_latest: bool = True
    keep_latest_n: int | None = None
    keep_every_n_steps: int | None = None
    keep_unranked: bool = False
    stale_after: float = 6 * 3600.0
    complete_marker: str = NEMO_RL.default_marker
    trash_grace: float = 0.0
    layout: str = DEFAULT_LAYOUT
    min_free: str | None = None  # "15%" or "500G": delete beyond the rules below it (pressure)
    min_keep: int = 1  # under disk pressure, at least this many checkpoints remain
    metrics_file: str | None = None  # JSON file inside each checkpoint (layouts without metrics)
    settle_after: float = SETTLE_AFTER  # no commit signal: untouched this long -> counts

    def __post_init__(self) -> None:
        for name in ("keep_top_k", "keep_latest_n"):
            _check_count(name, getattr(self, name), minimum=0, optional=True)
        _check_count("keep_every_n_steps", self.keep_every_n_steps, minimum=1, optional=True)
        _check_count("save_period", self.save_period, minimum=1, optional=False)
        for name in ("higher_is_better", "keep_latest", "keep_unranked"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(name, f"expected true or false, got {getattr(self, name)!r}")
        if self.metric_name is not None and (
            not isinstance(self.metric_name, str) or not self.metric_name
        ):
            raise PolicyError(
                "metric_name", f"expected a non-empty string, got {self.metric_name!r}"
            )
        _check_marker(self.complete_marker, _layout_named(self.layout))
        _check_metrics_file(self.metrics_file)
        for name in ("stale_after", "trash_grace", "settle_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PolicyError(name, f"expected seconds as a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise PolicyError(name, f"must be a finite number >= 0, got {value!r}")
        if self.min_free is not None:
            try:
                parse_min_free(self.min_free)
            except ValueError as exc:
                raise PolicyError("min_free", str(exc)) from None
            if isinstance(self.min_free, int):  # bytes, as TOML can write them: kept as text
                object.__setattr__(self, "min_free", str(self.min_free))
        _check_count("min_keep", self.min_keep, minimum=1, optional=False)

    @property
    def pressure_threshold(self) -> MinFree | None:
        """``min_free`` parsed; None when disk pressure is not watched."""
        return None if self.min_free is None else parse_min_free(self.min_free)

    def scan_layout(self) -> Layout:
        """The layout a scan of a root uses: ``layout`` with ``metrics_file``/``settle_after``."""
        return configured(
            self.layout, metrics_file=self.metrics_file, settle_after=self.settle_after
        )

    @property
    def bounded(self) -> bool:
        """True when some rule limits how many steps are kept, so deletion can happen.

        ``min_free`` is not counted: it deletes only while the filesystem is short of space."""
        return self.keep_top_k is not None or self.keep_latest_n is not None

    @classmethod
    def keys(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], *, base: Policy | None = None, source: str | None = None
    ) -> Policy:
        """Build a policy from user-facing keys (durations as strings), over ``base``.

        Unknown keys and invalid values raise `PolicyError` naming the key (and ``source``).
        """
        unknown = sorted(set(values) - cls.keys())
        if unknown:
            known = ", ".join(sorted(cls.keys()))
            raise PolicyError(unknown[0], f"unknown key (known keys: {known})", source)
        merged: dict[str, Any] = {f.name: getattr(base or cls(), f.name) for f in fields(cls)}
        for key, value in values.items():
            if key in ("stale_after", "trash_grace", "settle_after"):
                try:
                    value = parse_duration(value, key)
                except PolicyError as exc:
                    raise PolicyError(key, exc.reason, source) from None
            merged[key] = value
        try:
            return cls(**merged)
        except PolicyError as exc:
            raise PolicyError(exc.key, exc.reason, source) from None


#: Names a checkpoint directory's protocol gives a meaning of its own (DESIGN.md section 2): a
#: completion marker by one of these names would be present before the save is complete (e.g.
#: ``training_info.json`` is written first), or a pin or lock would read as completion.
def protocol_files(layout: Layout = NEMO_RL) -> frozenset[str]:
    names = (layout.info_file, layout.config_file, layout.pin_file, layout.writer_lock)
    return frozenset(n for n in names if n)


PROTOCOL_FILES: frozenset[str] = protocol_files()


def _layout_named(name: object) -> Layout:
    if not isinstance(name, str):
        raise PolicyError("layout", f"expected a layout name, got {name!r}")
    try:
        return get_layout(name)
    except LayoutError as exc:
        raise PolicyError("layout", str(exc)) from None


def _check_metrics_file(value: object) -> None:
    if value is None:
        return
    parts = value.split("/") if isinstance(value, str) else []
    if not parts or "\0" in str(value) or any(p in {"", ".", ".."} for p in parts):
        raise PolicyError(
            "metrics_file",
            f"expected a relative file path inside each checkpoint (no '..', no leading '/'), "
            f"got {value!r}",
        )


def _check_marker(marker: object, layout: Layout) -> None:
    if not isinstance(marker, str) or marker in {"", ".", ".."} or "/" in marker or "\0" in marker:
        raise PolicyError(
            "complete_marker",
            f"expected a plain file name (not empty, '.', '..', no '/' or NUL), got {marker!r}",
        )
    used = protocol_files(layout)
    if marker in used:
        raise PolicyError(
            "complete_marker",
            f"{marker!r} is a file the checkpoint protocol already uses "
            f"({', '.join(sorted(used))}): it would mark saves complete too early",
        )


def _check_count(name: str, value: object, *, minimum: int, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(name, f"expected a whole number >= {minimum}, got {value!r}")
    if value < minimum:
        raise PolicyError(name, f"must be >= {minimum}, got {value}")


def metric_value(info: Mapping[str, Any] | None, metric: str) -> float | str:
    """The usable metric of a checkpoint, or the reason it is unranked (a ``str``)."""
    if info is None or metric not in info:
        return "metric missing"
    value = info[metric]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"metric not a number ({type(value).__name__})"
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float, e.g. 10**400 in JSON
        return "metric not finite (too large)"
    if not math.isfinite(number):
        return f"metric not finite ({value})"
    return number


# -- rules -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdicts:
    """What one rule says: steps it keeps and (bounding rules) steps it lets go, with reasons."""

    kept: Mapping[int, str]
    dropped: Mapping[int, str]


class Rule(Protocol):
    def __call__(self, checkpoints: Sequence[Checkpoint]) -> Verdicts: ...


def _fmt(value: float) -> str:
    return f"{value:.6g}"


@dataclass(frozen=True, slots=True)
class KeepLatest:
    def __call__(self, checkpoints: Sequence[Checkpoint]) -> Verdicts:
        if not checkpoints:
            return Verdicts({}, {})
        return Verdicts({max(c.step for c in checkpoints): "latest"}, {})


@dataclass(frozen=True, slots=True)
class KeepTopK:
    k: int
    metric_name: str | None
    higher_is_better: bool
    save_period: int = 1
    keep_unranked: bool = False

    def __call__(self, checkpoints: Sequence[Checkpoint]) -> Verdicts:
        candidates = [c for c in checkpoints if c.step % self.save_period == 0]
        ranked: list[tuple[int, float]] = []
        unranked: list[tuple[int, str]] = []
        for c in candidates:
            value = metric_value(c.info, self.metric_name) if self.metric_name else float(c.step)
            if isinstance(value, str):
                unranked.append((c.step, value))
            else:
                ranked.append((c.step, value))
        sign = -1.0 if self.higher_is_better or self.metric_name is None else 1.0
        # Best first; equal metric -> the higher step wins.
        ranked.sort(key=lambda sv: (sign * sv[1], -sv[0]))
        unranked.sort(key=lambda su: -su[0])
        by = self.metric_name or "recency"
        kept: dict[int, str] = {}
        dropped: dict[int, str] = {}
        for rank, (step, value) in enumerate(ranked):
            label = f"{by}={_fmt(value)}" if self.metric_name else "recency"
            if rank < self.k:
                kept[step] = f"top-{self.k} by {label}"
            else:
                dropped[step] = f"outside top-{self.k} by {label}"
        for rank, (step, why) in enumerate(unranked, start=len(ranked)):
            if self.keep_unranked:
                continue  # KeepUnranked speaks for these
            if rank < self.k:
                kept[step] = f"top-{self.k}: {why}, ranked last"
            else:
                dropped[step] = f"outside top-{self.k}: {why}, ranked last"
        for c in checkpoints:
            if c.step % self.save_period != 0:
                dropped[c.step] = (
                    f"not a top-{self.k} candidate (step % save_period {self.save_period} != 0)"
                )
        return Verdicts(kept, dropped)


@dataclass(frozen=True, slots=True)
class KeepLatestN:
    n: int

    def __call__(self, checkpoints: Sequence[Checkpoint]) -> Verdicts:
        order = sorted((c.step for c in checkpoints), reverse=True)
        kept = {s: f"latest {self.n}" for s in order[: self.n]}
        dropped = {s: f"not among latest {self.n}" for s in order[self.n :]}
        return Verdicts(kept, dropped)


@dataclass(frozen=True, slots=True)
class KeepEveryN:
    n: int

    def __call__(self, checkpoints: Sequence[Checkpoint]) -> Verdicts:
        kept = {
            c.step: f"milestone (every {self.n} steps)" for c in checkpoints if c.step % self.n == 0
        }
        return Verdicts(kept, {})


@dataclass(frozen=True, slots=True)
class KeepPinned:
    pin_file: str = PIN_FILE

    def __call__(self, checkpoints: Sequence[Checkpoint]) -> Verdicts:
        why = f"pinned ({self.pin_file} file)"
        return Verdicts({c.step: why for c in checkpoints if c.pinned}, {})


@dataclass(frozen=True, slots=True)
class KeepUnranked:
    metric_name: str

    def __call__(self, checkpoints: Sequence[Checkpoint]) -> Verdicts:
        kept: dict[int, str] = {}
        for c in checkpoints:
            value = metric_value(c.info, self.metric_name)
            if isinstance(value, str):
                kept[c.step] = f"{value}: kept (keep_unranked)"
        return Verdicts(kept, {})


def rules_for(policy: Policy, layout: Layout = NEMO_RL) -> tuple[Rule, ...]:
    rules: list[Rule] = [KeepPinned(layout.pin_file)]
    if policy.keep_latest:
        rules.append(KeepLatest())
    if policy.keep_top_k is not None:
        rules.append(
            KeepTopK(
                policy.keep_top_k,
                policy.metric_name,
                policy.higher_is_better,
                policy.save_period,
                policy.keep_unranked,
            )
        )
    if policy.keep_latest_n is not None:
        rules.append(KeepLatestN(policy.keep_latest_n))
    if policy.keep_every_n_steps is not None:
        rules.append(KeepEveryN(policy.keep_every_n_steps))
    if policy.keep_unranked and policy.metric_name is not None:
        rules.append(KeepUnranked(policy.metric_name))
    return tuple(rules)
