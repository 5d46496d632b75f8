"""The settings of each root (which directories are roots: `ckptkeeperd.roots`).

Settings of one root (`SettingsResolver.resolve`), highest precedence first:

1. ``<root>/ckptkeeper.toml``: top-level *policy* keys only. ``sweep_interval`` and ``observer``
   are daemon-wide concerns (load on the shared filesystem) a run's owner does not set. An invalid
   file, a symlink or a non-regular file is ignored as a whole and reported, never raised.
2. the ``[[root]]`` / ``[[discover]]`` entry;
3. ``[defaults]``, with command-line flags merged in by `merge_flags`;
4. the ``config.yaml`` of the newest step that has a usable one naming a metric
   (`runfiles.walk_config_yaml`): ``checkpointing.metric_name`` when no level sets
   ``metric_name``; ``checkpointing.higher_is_better`` when no level sets it *and* that file's
   metric is the metric in effect (a direction read for another metric would invert the ranking
   and delete the best checkpoints);
5. the built-in defaults of `Policy` and `Settings`.

Deletions in a root are paused (its bounds dropped, so the planner keeps every step) and the
reason reported, never guessed around:

- while ``<root>/ckptkeeper.toml`` is invalid: its owner wrote it to change retention;
- while ``keep_top_k`` needs the metric (or its direction) from config.yaml and it cannot be
  known: a config.yaml exists but none can be used (corrupt, unreadable), or no config.yaml
  naming a metric is among the newest `WALK_LIMIT` steps while older ones exist. Ranking by
  recency instead would delete the best checkpoints. A usable older config.yaml under newer
  unusable ones still applies; the unusable ones are reported.

A root that cannot even be searched reports only its own problem (from the pass), not its files'.

Results are memoized by a `SettingsResolver` (one per keeper or sweep), reused while the inputs
are the same: the same defaults and entry overrides, ``ckptkeeper.toml`` with the same ``lstat``
(device, inode, mode, size, mtime, ctime; or still absent) and, when the config.yaml fallback is
used, the root directory and every config.yaml the walk looked at likewise unchanged. A file or
directory changed less than `MEMO_TRUST_S` before it was read is not memoized (a change within one
timestamp tick would leave its times equal). Resolving costs a few ``lstat`` calls when nothing
changed, so the daemon resolves in every pass: an edit applies to the next pass.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ckptkeeper.policy import Policy, PolicyError
from ckptkeeper.stores import Root

from .config import RUN_FILE, DaemonConfig, Resolved, Settings
from .runfiles import (
    WALK_LIMIT,
    StatKey,
    YamlCache,
    YamlWalk,
    read_run_file,
    stat_key,
    walk_config_yaml,
    walk_unchanged,
)

__all__ = ["WALK_LIMIT", "SettingsResolver", "resolve_settings"]


@dataclass(frozen=True, slots=True)
class _Memo:
    defaults: Mapping[str, Any]
    entry: Mapping[str, Any]
    run_key: StatKey
    walk: YamlWalk | None  # None: no config.yaml fallback was needed
    resolved: Resolved


def _copy(resolved: Resolved) -> Resolved:
    return Resolved(resolved.settings, list(resolved.problems), dict(resolved.origins))


class SettingsResolver:
    """Resolves each root's settings and memoizes them (module docstring). Thread-safe.

    ``clock_ns`` is the clock a file's age is judged by (whether it changed too recently to be
    memoized). ``reads`` counts the files read by name (``ckptkeeper.toml``, ``config.yaml``)."""

    def __init__(
        self, *, clock_ns: Callable[[], int] = time.time_ns, max_roots: int = 65536
    ) -> None:
        self._clock_ns = clock_ns
        self._max_roots = max_roots
        self._lock = threading.Lock()
        self._memo: dict[str, _Memo] = {}
        self.yaml = YamlCache()
        self.reads: Counter[str] = Counter()
        # Layers -> what `_apply_layers` made of them, when that raised no problem (a problem
        # names its root): a fleet of roots configured alike validates its settings once.
        self._layered: dict[object, tuple[Settings, dict[str, str]]] = {}

    def forget(self) -> None:
        """Drop every memoized result (as a freshly started keeper has none)."""
        with self._lock:
            self._memo.clear()

    def resolve(
        self, config: DaemonConfig, root: Root, entry_overrides: Mapping[str, Any]
    ) -> Resolved:
        """The settings of ``root`` (precedence in the module docstring), its files read
        through its storage. Never raises."""
        now_ns = self._clock_ns()
        run_key = stat_key(root, RUN_FILE, now_ns)  # before the file is read
        with self._lock:
            memo = self._memo.get(str(root.path))
        if (
            memo is not None
            and run_key is not None
            and memo.run_key == run_key
            and memo.defaults == config.default_overrides
            and memo.entry == entry_overrides
            and (memo.walk is None or walk_unchanged(root, memo.walk, now_ns))
        ):
            return _copy(memo.resolved)
        resolved, walk = self._resolve(config, root, entry_overrides, now_ns)
        if run_key is None or (walk is not None and not _memoizable(walk)):
            return resolved  # something changed just now: read again next time
        fresh = _Memo(
            dict(config.default_overrides), dict(entry_overrides), run_key, walk, resolved
        )
        with self._lock:
            if len(self._memo) >= self._max_roots:
                self._memo.clear()
            self._memo[str(root.path)] = fresh
        return _copy(resolved)

    def resolve_unranked(
        self, config: DaemonConfig, root: Root, entry_overrides: Mapping[str, Any]
    ) -> Resolved:
        """`resolve` without config.yaml's metric and direction (no walk over the root's
        newest steps, no memo): what a keeper needs to watch and schedule a root (observer,
        marker, sweep interval), which config.yaml never sets."""
        resolved, _ = self._resolve(config, root, entry_overrides, 0, ranking=False)
        return resolved

    def recovery_policy(
        self, config: DaemonConfig, root: Root, entry_overrides: Mapping[str, Any]
    ) -> Policy:
        """The policy of a pass limited to recovery actions (a marker's save: finalize or
        replace, which rank nothing): the settings without config.yaml's metric and direction,
        so the newest steps' config.yaml files (and the root's names) are not looked at."""
        resolved, _ = self._resolve(config, root, entry_overrides, 0, ranking=False)
        return resolved.settings.policy

    def _apply(
        self, root: Path, layers: list[tuple[str, Mapping[str, Any]]], problems: list[str]
    ) -> tuple[Settings, dict[str, str], bool]:
        """`_apply_layers`, memoized by the layers' values while they raise no problem."""
        key = _layers_key(layers)
        with self._lock:
            hit = None if key is None else self._layered.get(key)
        if hit is not None:
            return hit[0], dict(hit[1]), True
        before = len(problems)
        settings, origins, run_file_ok = _apply_layers(root, layers, problems)
        if key is not None and len(problems) == before and run_file_ok:
            with self._lock:
                if len(self._layered) >= self._max_roots:
                    self._layered.clear()
                self._layered[key] = (settings, dict(origins))
        return settings, origins, run_file_ok

    def _resolve(
        self,
        config: DaemonConfig,
        where: Root,
        entry_overrides: Mapping[str, Any],
        now_ns: int,
        *,
        ranking: bool = True,
    ) -> tuple[Resolved, YamlWalk | None]:
        """`resolve` without the memo; also the config.yaml walk (None when not needed)."""
        root = where.path
        self.reads[RUN_FILE] += 1
        run_file = read_run_file(where)
        layers: list[tuple[str, Mapping[str, Any]]] = [
            ("defaults", config.default_overrides),
            ("entry", entry_overrides),
            (RUN_FILE, run_file.values),
        ]
        configured = {key: value for _, values in layers for key, value in values.items()}
        walk: YamlWalk | None = None
        if ranking and ("metric_name" not in configured or "higher_is_better" not in configured):
            parses = self.yaml.parses  # (a count for tests: other threads may parse meanwhile)
            walk = walk_config_yaml(where, self.yaml, now_ns)
            self.reads["config.yaml"] += self.yaml.parses - parses
            layers.insert(0, ("config.yaml", _from_yaml(walk, configured)))
        problems = [run_file.problem] if run_file.problem else []
        settings, origins, run_file_ok = self._apply(root, layers, problems)
        run_file_ok = run_file_ok and run_file.problem is None and run_file.reachable
        doubt = _yaml_doubt(walk, configured, settings)
        if walk is not None:
            problems.extend(_yaml_problems(root, walk, configured, doubt))
        if not run_file_ok or doubt:
            # Until what the owner or the run meant is known, delete nothing (pressure included).
            policy = replace(settings.policy, keep_top_k=None, keep_latest_n=None, min_free=None)
            settings = replace(settings, policy=policy)
        if not run_file_ok:
            prefix = str(root / RUN_FILE)
            problems = [
                f"{p}; deletions in this root paused until it is fixed"
                if p.startswith(prefix)
                else p
                for p in problems
            ]
        return Resolved(settings, problems, origins), walk


def _layers_key(layers: list[tuple[str, Mapping[str, Any]]]) -> object | None:
    """A hashable key of ``layers`` that tells ``1``, ``1.0`` and ``True`` apart (None: a value
    is not hashable, e.g. a list)."""
    key = tuple(
        (origin, tuple(sorted((k, type(v), v) for k, v in values.items())))
        for origin, values in layers
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _memoizable(walk: YamlWalk) -> bool:
    root_key, looked = walk.inputs
    return root_key is not None and all(key is not None for _, key in looked)


def _apply_layers(
    root: Path, layers: list[tuple[str, Mapping[str, Any]]], problems: list[str]
) -> tuple[Settings, dict[str, str], bool]:
    settings = Settings()
    origins: dict[str, str] = {}
    run_file_ok = True
    for origin, values in layers:
        try:
            settings = settings.apply(values)
        except PolicyError as exc:  # a valid layer over the others can still clash; skip it
            where = root / RUN_FILE if origin == RUN_FILE else origin
            problems.append(f"{where}: {exc.key}: {exc.reason}; {origin} settings ignored")
            run_file_ok = run_file_ok and origin != RUN_FILE
            continue
        origins.update(dict.fromkeys(values, origin))
    return settings, origins, run_file_ok


def _from_yaml(walk: YamlWalk, configured: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "metric_name" not in configured and walk.metric is not None:
        out["metric_name"] = walk.metric
    in_effect = configured.get("metric_name", walk.metric)
    if (
        "higher_is_better" not in configured
        and walk.direction is not None
        and walk.metric == in_effect
    ):
        out["higher_is_better"] = walk.direction
    return out


_PAUSED = "deletions in this root paused until a config.yaml names it or {key} is set"


def _yaml_doubt(walk: YamlWalk | None, configured: Mapping[str, Any], settings: Settings) -> bool:
    """Must deletions pause for want of config.yaml? Only ``keep_top_k`` ranks by the metric. It
    (or its direction) is in doubt when it was to come from config.yaml, no usable one names it,
    and a config.yaml could not be used, or (for the metric) older steps were not looked at."""
    if walk is None or walk.source is not None or settings.policy.keep_top_k is None:
        return False
    return bool(walk.problems) or (walk.exhausted and "metric_name" not in configured)


def _yaml_problems(
    root: Path, walk: YamlWalk, configured: Mapping[str, Any], doubt: bool
) -> list[str]:
    if walk.source is not None:
        return [f"{p}; metric {walk.metric!r} taken from {walk.source}" for p in walk.problems]
    if not doubt:
        return [f"{p}; ignored" for p in walk.problems]
    key = "metric_name" if "metric_name" not in configured else "higher_is_better"
    what = "metric" if key == "metric_name" else "metric direction"
    paused = _PAUSED.format(key=key)
    if not walk.problems:
        return [
            f"{root}: no config.yaml names checkpointing.metric_name in the newest {WALK_LIMIT} "
            f"steps and older ones were not read: the {what} for keep_top_k is unknown; {paused}"
        ]
    return [f"{p}; the {what} for keep_top_k is unknown; {paused}" for p in walk.problems]


def resolve_settings(
    config: DaemonConfig, root: Root, entry_overrides: Mapping[str, Any]
) -> Resolved:
    """The settings of ``root`` resolved afresh (no memo): for one-off callers and tests. A
    keeper or sweep that resolves repeatedly owns a `SettingsResolver` instead."""
    return SettingsResolver().resolve(config, root, entry_overrides)
