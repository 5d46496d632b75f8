"""Which directories are roots, and the settings of each root.

Settings of one root (`resolve_settings`), highest precedence first:

1. ``<root>/ckptkeeper.toml``: top-level *policy* keys only. ``sweep_interval`` and ``observer``
   are daemon-wide concerns (load on the shared filesystem) a run's owner does not set. An invalid
   file, a symlink or a non-regular file is ignored as a whole and reported, never raised.
2. the ``[[root]]`` / ``[[discover]]`` entry;
3. ``[defaults]``, with command-line flags merged in by `merge_flags`;
4. the newest ``step_N/config.yaml``: ``checkpointing.metric_name`` when no level sets
   ``metric_name``; ``checkpointing.higher_is_better`` when no level sets it *and* that file's
   metric is the metric in effect (a direction read for another metric would invert the ranking
   and delete the best checkpoints);
5. the built-in defaults of `Policy` and `Settings`.

While ``<root>/ckptkeeper.toml`` is invalid, deletions in that root are paused (its bounds are
dropped, so the planner keeps every step) and the problem is reported: the run's owner wrote that
file to change retention, and guessing what they meant could delete what they wanted kept.

The result is memoized per root. It is reused while the inputs are the same: the same defaults
and entry overrides, ``ckptkeeper.toml`` with the same ``lstat`` (device, inode, mode, size, mtime,
ctime; or still absent) and, when the config.yaml fallback is used, the root directory and that
config.yaml likewise unchanged. A file or directory changed less than `MEMO_TRUST_S` before it
was read is not memoized (a change within one timestamp tick would leave its times equal).
"""

from __future__ import annotations

import errno
import glob as globlib
import os
import re
import stat
import threading
import time
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from ckptkeeper.names import Kind, parse_name
from ckptkeeper.policy import PolicyError
from ckptkeeper.scan import CKPTKEEPER_DIR, MEMO_TRUST_S

from .config import (
    DAEMON_KEYS,
    MAX_RUN_FILE_BYTES,
    MAX_YAML_BYTES,
    POLICY_KEYS,
    RUN_FILE,
    DaemonConfig,
    DiscoverEntry,
    Resolved,
    Settings,
)

__all__ = ["expand_roots", "forget_settings", "resolve_settings"]


_StatKey = tuple[int, ...]  # () when absent
#: (the root directory's key, its newest step_N name or None, that step's config.yaml key)
_YamlInputs = tuple[_StatKey, str | None, _StatKey]


class _Memo:
    __slots__ = ("defaults", "entry", "resolved", "run_key", "yaml")

    def __init__(
        self,
        defaults: Mapping[str, Any],
        entry: Mapping[str, Any],
        run_key: _StatKey,
        yaml: _YamlInputs | None,
        resolved: Resolved,
    ) -> None:
        self.defaults = defaults
        self.entry = entry
        self.run_key = run_key
        self.yaml = yaml  # None: no config.yaml fallback was needed
        self.resolved = resolved


_MEMO: dict[str, _Memo] = {}
_MEMO_LOCK = threading.Lock()
_MEMO_MAX = 65536
_TRUST_NS = int(MEMO_TRUST_S * 1e9)
_now_ns = time.time_ns  # the clock the memo's trust is judged by (tests move it)


def forget_settings() -> None:
    """Drop every memoized `resolve_settings` result (as a freshly started daemon has none)."""
    with _MEMO_LOCK:
        _MEMO.clear()


def _stat_key(path: Path, now_ns: int) -> _StatKey | None:
    """What a change to ``path`` would change: () when absent; None when it cannot be relied on
    (changed within MEMO_TRUST_S of ``now_ns``, or not even ``lstat``-able)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ()
    except OSError:
        return None
    if now_ns - max(st.st_mtime_ns, st.st_ctime_ns) < _TRUST_NS:
        return None
    return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _yaml_unchanged(root: Path, inputs: _YamlInputs, now_ns: int) -> bool:
    root_key, newest, cfg_key = inputs
    if _stat_key(root, now_ns) != root_key:
        return False
    return newest is None or _stat_key(root / newest / "config.yaml", now_ns) == cfg_key


def resolve_settings(
    config: DaemonConfig, root: Path, entry_overrides: Mapping[str, Any]
) -> Resolved:
    """The settings of ``root`` (precedence in the module docstring). Never raises."""
    root = Path(root)
    now_ns = _now_ns()
    run_key = _stat_key(root / RUN_FILE, now_ns)  # before the file is read
    with _MEMO_LOCK:
        memo = _MEMO.get(str(root))
    if (
        memo is not None
        and run_key is not None
        and memo.run_key == run_key
        and memo.defaults == config.default_overrides
        and memo.entry == entry_overrides
        and (memo.yaml is None or _yaml_unchanged(root, memo.yaml, now_ns))
    ):
        hit = memo.resolved
        return Resolved(hit.settings, list(hit.problems), dict(hit.origins))
    resolved, seen = _resolve(config, root, entry_overrides, now_ns)
    yaml: _YamlInputs | None = None
    if seen is not None:
        root_key, newest, cfg_key = seen
        if root_key is None or cfg_key is None:
            return resolved  # changed just now: read again next time
        yaml = (root_key, newest, cfg_key)
    if run_key is not None:
        defaults, entry = dict(config.default_overrides), dict(entry_overrides)  # as they were
        fresh = _Memo(defaults, entry, run_key, yaml, resolved)
        with _MEMO_LOCK:
            if len(_MEMO) >= _MEMO_MAX:
                _MEMO.clear()
            _MEMO[str(root)] = fresh
        resolved = Resolved(resolved.settings, list(resolved.problems), dict(resolved.origins))
    return resolved


def _resolve(
    config: DaemonConfig, root: Path, entry_overrides: Mapping[str, Any], now_ns: int
) -> tuple[Resolved, tuple[_StatKey | None, str | None, _StatKey | None] | None]:
    """`resolve_settings` without the memo; also the config.yaml fallback's inputs (their keys
    taken before they were read), None when the fallback was not needed."""
    problems: list[str] = []
    layers: list[tuple[str, Mapping[str, Any]]] = [
        ("defaults", config.default_overrides),
        ("entry", entry_overrides),
        (RUN_FILE, _read_run_file(root / RUN_FILE, problems)),
    ]
    configured = {key: value for _, values in layers for key, value in values.items()}
    yaml: tuple[_StatKey | None, str | None, _StatKey | None] | None = None
    if "metric_name" not in configured or "higher_is_better" not in configured:
        root_key = _stat_key(root, now_ns)
        newest = _newest_step(root)
        cfg_key = _stat_key(newest / "config.yaml", now_ns) if newest is not None else ()
        yaml = (root_key, None if newest is None else newest.name, cfg_key)
        layers.insert(0, ("config.yaml", _yaml_fallback(newest, configured)))
    run_file_ok = not problems
    settings = Settings()
    origins: dict[str, str] = {}
    for origin, values in layers:
        try:
            settings = settings.apply(values)
        except PolicyError as exc:  # a valid layer over the others can still clash; skip it
            where = root / RUN_FILE if origin == RUN_FILE else origin
            problems.append(f"{where}: {exc.key}: {exc.reason}; {origin} settings ignored")
            run_file_ok = run_file_ok and origin != RUN_FILE
            continue
        origins.update(dict.fromkeys(values, origin))
    if not run_file_ok:
        # The owner meant to change retention here; until the file is fixed, delete nothing.
        policy = replace(settings.policy, keep_top_k=None, keep_latest_n=None)
        settings = replace(settings, policy=policy)
        run_file = str(root / RUN_FILE)
        problems = [
            f"{p}; deletions in this root paused until it is fixed" if p.startswith(run_file) else p
            for p in problems
        ]
    return Resolved(settings, problems, origins), yaml


_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FileKey = tuple[str, int, int, int]


def _read_regular(path: Path, limit: int) -> tuple[bytes, _FileKey] | str | None:
    """Content and cache key of a regular file opened without following a symlink; None when
    absent; the reason when unusable (symlink, not regular, too large, unreadable)."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return "a symlink, not a regular file" if exc.errno == errno.ELOOP else str(exc.strerror)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        with open(fd, "rb", closefd=False) as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    finally:
        os.close(fd)
    if len(raw) > limit:
        return f"larger than {limit} bytes"
    return raw, (str(path), st.st_ino, st.st_mtime_ns, st.st_size)


def _read_run_file(path: Path, problems: list[str]) -> dict[str, Any]:
    """The keys of ``<root>/ckptkeeper.toml``; {} (plus a problem) when absent or invalid."""
    got = _read_regular(path, MAX_RUN_FILE_BYTES)
    if not isinstance(got, tuple):
        if got is not None:
            problems.append(f"{path}: {got}; file ignored")
        return {}
    try:
        values = tomllib.loads(got[0].decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        problems.append(f"{path}: invalid TOML: {exc}; file ignored")
        return {}
    try:
        for key in sorted(values.keys() & DAEMON_KEYS):
            raise PolicyError(key, "a daemon setting, allowed only in the daemon's config file")
        Settings().apply(values, allowed=POLICY_KEYS)
    except PolicyError as exc:
        problems.append(f"{path}: {exc.key}: {exc.reason}; file ignored")
        return {}
    except (TypeError, ValueError) as exc:  # belt and braces: a run's file must never stop us
        problems.append(f"{path}: invalid: {exc}; file ignored")
        return {}
    return values


def _newest_step(root: Path) -> Path | None:
    """The ``step_N`` directory (not a symlink) with the highest N; canonical name on ties."""
    best: tuple[int, bool, str] | None = None
    try:
        with os.scandir(root) as it:
            for entry in it:
                parsed = parse_name(entry.name)
                if parsed is None or parsed.kind is not Kind.STEP:
                    continue
                if not entry.is_dir(follow_symlinks=False):
                    continue
                rank = (parsed.step, parsed.canonical, entry.name)
                best = rank if best is None or rank > best else best
    except OSError:
        return None
    return None if best is None else root / best[2]


_YamlFacts = tuple[str | None, bool | None]
_YAML_CACHE: dict[_FileKey, _YamlFacts] = {}


def _read_checkpointing(path: Path) -> _YamlFacts:
    """``checkpointing.metric_name`` / ``.higher_is_better`` of a config.yaml, None for anything
    missing, wrong-typed or corrupt. Parses are cached by (path, inode, mtime_ns, size)."""
    got = _read_regular(path, MAX_YAML_BYTES)
    if not isinstance(got, tuple):
        return None, None
    raw, key = got
    if (facts := _YAML_CACHE.get(key)) is None:
        try:
            doc = yaml.safe_load(raw)
        except Exception:  # corrupt YAML of any kind (syntax, encoding, depth) is ignored
            doc = None
        section = doc.get("checkpointing") if isinstance(doc, dict) else None
        section = section if isinstance(section, dict) else {}
        metric, direction = section.get("metric_name"), section.get("higher_is_better")
        facts = (
            metric if isinstance(metric, str) and metric else None,
            direction if isinstance(direction, bool) else None,
        )
        if len(_YAML_CACHE) >= 4096:
            _YAML_CACHE.clear()
        _YAML_CACHE[key] = facts
    return facts


def _yaml_fallback(step: Path | None, configured: Mapping[str, Any]) -> dict[str, Any]:
    if step is None:
        return {}
    metric, direction = _read_checkpointing(step / "config.yaml")
    out: dict[str, Any] = {}
    if "metric_name" not in configured and metric is not None:
        out["metric_name"] = metric
    in_effect = configured.get("metric_name", metric)
    if "higher_is_better" not in configured and direction is not None and metric == in_effect:
        out["higher_is_better"] = direction
    return out


# -- root discovery --------------------------------------------------------------------------

_MAGIC = re.compile(r"[*?[]")


def expand_roots(
    config: DaemonConfig, problems: list[str] | None = None
) -> list[tuple[Path, Mapping[str, Any]]]:
    """Explicit roots, then the directories each ``[[discover]]`` glob finds, deduplicated by
    realpath (the first wins, so ``[[root]]`` beats ``[[discover]]``). Never raises; unreadable
    candidates are skipped and described in ``problems`` when given."""
    out: list[tuple[Path, Mapping[str, Any]]] = []
    seen: set[str] = set()

    def add(path: Path, overrides: Mapping[str, Any]) -> None:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            out.append((path, overrides))

    for entry in config.roots:
        add(entry.path, entry.overrides)
    for disc in config.discovers:
        for found in _discover(disc, problems if problems is not None else []):
            add(found, disc.overrides)
    return out


def _discover(entry: DiscoverEntry, problems: list[str]) -> list[Path]:
    """Directories matching the glob that directly hold a checkpoint-named entry.

    Never a directory that is, or lies inside, a checkpoint or ``.ckptkeeper``, nor one reached
    through a symlink below the glob's literal prefix.
    """
    parts = Path(entry.glob).parts
    literal = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
    base = entry.base_dir
    try:
        # Path.glob takes no absolute pattern and no root_dir: glob.glob it is.
        matches = sorted(globlib.glob(entry.glob, root_dir=base))
    except (OSError, ValueError) as exc:
        problems.append(f"discover {entry.glob!r}: {exc}")
        return []
    found: list[Path] = []
    for match in matches:
        rel = Path(os.path.normpath(match))
        start = min(literal, len(rel.parts) - 1)  # a candidate's own name is always checked
        top = Path() if base is None else base
        below = [top.joinpath(*rel.parts[: i + 1]) for i in range(start, len(rel.parts))]
        full = top / rel
        if any(_not_root_part(p) for p in below) or not _holds_checkpoints(full, problems):
            continue
        found.append(full)
    return found


def _not_root_part(path: Path) -> bool:
    if parse_name(path.name) is not None or path.name == CKPTKEEPER_DIR:
        return True
    try:
        return not stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return True


def _holds_checkpoints(directory: Path, problems: list[str]) -> bool:
    try:
        with os.scandir(directory) as it:
            return any(parse_name(entry.name) is not None for entry in it)
    except OSError as exc:
        problems.append(f"{directory}: not examined: {exc.strerror}")
        return False
