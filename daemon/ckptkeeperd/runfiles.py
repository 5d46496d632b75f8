"""The files a run keeps beside its checkpoints that settle its settings: ``ckptkeeper.toml`` and
the ``config.yaml`` of its steps. Reads only; never raises for a bad file.

``config.yaml`` (``checkpointing.metric_name`` / ``.higher_is_better``) is taken from the newest
step whose config.yaml names a metric (`walk_config_yaml`): a step saved in place, saved without a
run config, or holding a corrupt or unreadable config.yaml does not hide the metric its older
steps name. The walk goes from the newest step down and stops at the first such file; at most
`WALK_LIMIT` steps are looked at, and a file is parsed once per identity (`YamlCache`).

Every function takes the root as parsed (`stores.Root`): its storage says how its files are read.
A root on a storage that is not a POSIX directory (``s3://``) is read through its
`storage.RootFiles`: one listing serves the whole resolve (and the pass's look after it), a file's
identity is its ETag, and a file is fetched only when its ETag changed.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptkeeper.errors import strerror
from ckptkeeper.layouts import NEMO_RL
from ckptkeeper.names import Kind, parse_name
from ckptkeeper.policy import PolicyError
from ckptkeeper.scan import MEMO_TRUST_S
from ckptkeeper.storage import RootFiles
from ckptkeeper.stores import Root

from .config import (
    DAEMON_KEYS,
    MAX_RUN_FILE_BYTES,
    MAX_YAML_BYTES,
    POLICY_KEYS,
    RUN_FILE,
    Settings,
)

__all__ = [
    "WALK_LIMIT",
    "Looked",
    "RunFile",
    "StatKey",
    "YamlCache",
    "YamlFacts",
    "YamlWalk",
    "read_run_file",
    "stat_key",
    "walk_config_yaml",
]

#: At most this many steps (newest first) are looked at for a config.yaml naming the metric.
WALK_LIMIT = 1000

StatKey = tuple[object, ...]  # () when absent
_TRUST_NS = int(MEMO_TRUST_S * 1e9)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

CONFIG_FILE = NEMO_RL.config_file  # the run config NeMo-RL writes into each step


def root_files(root: Root) -> RootFiles | None:
    """The files of ``root`` through its storage; None: a POSIX directory (read directly)."""
    return root.storage.root_files(root.path)


def stat_key(root: Root, name: str, now_ns: int) -> StatKey | None:
    """What a change to the file ``name`` right in ``root`` would change: () when absent; None
    when it cannot be relied on (changed within MEMO_TRUST_S of ``now_ns``, or not even
    ``lstat``-able)."""
    if (files := root_files(root)) is not None:
        return files.key(name)
    return _stat_key(root.path / name, now_ns)


def _stat_key(path: str | Path, now_ns: int) -> StatKey | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ()
    except OSError:
        return None
    if now_ns - max(st.st_mtime_ns, st.st_ctime_ns) < _TRUST_NS:
        return None
    return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class _Unusable:
    reason: str
    here: bool = True  # False: the directory holding the file cannot be searched


def _read_regular(path: Path, limit: int) -> tuple[bytes, os.stat_result] | _Unusable | None:
    """Content and ``fstat`` of a regular file opened without following a symlink; None when
    absent; why it is unusable otherwise (symlink, not regular, too large, unreadable)."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return _Unusable("a symlink, not a regular file")
        return _Unusable(f"cannot read: {strerror(exc)}", _beside_searchable(path))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return _Unusable("not a regular file")
        with open(fd, "rb", closefd=False) as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        return _Unusable(f"cannot read: {strerror(exc)}")
    finally:
        os.close(fd)
    if len(raw) > limit:
        return _Unusable(f"larger than {limit} bytes")
    return raw, st


def _beside_searchable(path: Path) -> bool:
    """False when ``path`` cannot even be looked up (its directory denies search, or is not a
    directory): then the directory's problem is the one to report, not the file's."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


# -- <root>/ckptkeeper.toml ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunFile:
    """The keys of a run's ckptkeeper.toml ({} when absent or unusable) and, when the file is
    unusable, why (``problem``). ``reachable`` is False when the root itself cannot be searched:
    the file's content is unknown, and the root's own problem is reported by the pass."""

    values: Mapping[str, Any]
    problem: str | None = None
    reachable: bool = True


def _read_through(files: RootFiles, rel: str, limit: int) -> bytes | _Unusable | None:
    got = files.read(rel, limit)
    return _Unusable(got) if isinstance(got, str) else got


def read_run_file(root: Root) -> RunFile:
    """``<root>/ckptkeeper.toml``, read through the root's storage."""
    path = root.path / RUN_FILE
    files = root_files(root)
    got: tuple[bytes, Any] | bytes | _Unusable | None
    if files is not None:
        if files.key(RUN_FILE) is None:  # the root cannot be listed: its problem is reported
            return RunFile({}, reachable=False)
        got = _read_through(files, RUN_FILE, MAX_RUN_FILE_BYTES)
    else:
        got = _read_regular(path, MAX_RUN_FILE_BYTES)
    if got is None:
        return RunFile({})
    if isinstance(got, _Unusable):
        if not got.here:
            return RunFile({}, reachable=False)
        return RunFile({}, f"{path}: {got.reason}; file ignored")
    raw = got if isinstance(got, bytes) else got[0]
    try:
        values = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return RunFile({}, f"{path}: invalid TOML: {exc}; file ignored")
    try:
        for key in sorted(values.keys() & DAEMON_KEYS):
            raise PolicyError(key, "a daemon setting, allowed only in the daemon's config file")
        Settings().apply(values, allowed=POLICY_KEYS)
    except PolicyError as exc:
        return RunFile({}, f"{path}: {exc.key}: {exc.reason}; file ignored")
    except (TypeError, ValueError) as exc:  # belt and braces: a run's file must never stop us
        return RunFile({}, f"{path}: invalid: {exc}; file ignored")
    return RunFile(values)


# -- step_N/config.yaml -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class YamlFacts:
    """What one config.yaml says: ``metric`` (``checkpointing.metric_name``) and ``direction``
    (``checkpointing.higher_is_better``), None when it does not say; ``problem`` when the file
    exists but cannot be used (unreadable, corrupt, wrong types): then it says nothing."""

    metric: str | None = None
    direction: bool | None = None
    problem: str | None = None


def _parse(raw: bytes) -> YamlFacts:
    import yaml  # only when a config.yaml is read: a sweep given the metric never loads it

    try:
        doc = yaml.safe_load(raw)
    except Exception as exc:  # corrupt YAML of any kind (syntax, encoding, tags, depth)
        return YamlFacts(problem=f"invalid YAML: {_yaml_error(exc)}")
    if doc is None:
        return YamlFacts(problem="empty (no YAML document)")
    if not isinstance(doc, dict):
        return YamlFacts(problem=f"not a YAML mapping (got {type(doc).__name__})")
    section = doc.get("checkpointing")
    if section is None:
        return YamlFacts()
    if not isinstance(section, dict):
        return YamlFacts(problem=f"checkpointing: expected a mapping, got {section!r:.60}")
    metric, direction = section.get("metric_name"), section.get("higher_is_better")
    if metric is not None and not (isinstance(metric, str) and metric):
        why = f"checkpointing.metric_name: expected a non-empty string, got {metric!r:.60}"
        return YamlFacts(problem=why)
    if direction is not None and not isinstance(direction, bool):
        why = f"checkpointing.higher_is_better: expected true or false, got {direction!r:.60}"
        return YamlFacts(problem=why)
    return YamlFacts(metric, direction)


def _yaml_error(exc: Exception) -> str:
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem or exc.context}"
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class YamlCache:
    """Parsed config.yaml facts by file identity (path, device, inode, size, mtime, ctime).

    A file changed less than MEMO_TRUST_S before it was read is not cached (a rewrite within one
    timestamp tick would keep its identity). Bounded; thread-safe."""

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._facts: dict[tuple[Any, ...], YamlFacts] = {}
        self.parses = 0  # how many files were parsed (a cached one is not)

    def facts_of(self, files: RootFiles, root: Path, rel: str, key: StatKey) -> YamlFacts:
        """``rel`` below a root read through its `storage.RootFiles` (``key``: its ETag), parsed
        once per key (an ETag changes with every write: no tick to wait for)."""
        ident = (str(root), rel, *key)
        with self._lock:
            known = self._facts.get(ident)
        if known is not None:
            return known
        got = _read_through(files, rel, MAX_YAML_BYTES)
        if got is None:
            return YamlFacts()
        if isinstance(got, _Unusable):
            return YamlFacts(problem=got.reason)
        facts = _parse(got)
        with self._lock:
            self.parses += 1
            if len(self._facts) >= self._limit:
                self._facts.clear()
            self._facts[ident] = facts
        return facts

    def facts(self, path: Path, now_ns: int) -> YamlFacts:
        got = _read_regular(path, MAX_YAML_BYTES)
        if got is None:
            return YamlFacts()
        if isinstance(got, _Unusable):
            return YamlFacts(problem=got.reason)
        raw, st = got
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            known = self._facts.get(key)
        if known is not None:
            return known
        facts = _parse(raw)
        with self._lock:
            self.parses += 1
            if now_ns - max(st.st_mtime_ns, st.st_ctime_ns) >= _TRUST_NS:
                if len(self._facts) >= self._limit:
                    self._facts.clear()
                self._facts[key] = facts
        return facts


class Looked:
    """The (step directory name, its config.yaml's `StatKey`) pairs a walk looked at, in order,
    kept compactly (a keeper holds one walk per root, of up to `WALK_LIMIT` steps): the names
    in one string, the keys in a tuple (an absent file's ``()`` is shared)."""

    __slots__ = ("_keys", "_names")

    def __init__(self, pairs: Iterable[tuple[str, StatKey | None]] = ()) -> None:
        names, keys = [], []
        for name, key in pairs:
            names.append(name)
            keys.append(key)
        self._names = "/".join(names)  # "/" is in no directory name
        self._keys: tuple[StatKey | None, ...] = tuple(keys)

    def __iter__(self) -> Iterator[tuple[str, StatKey | None]]:
        names = self._names.split("/") if self._keys else []
        return zip(names, self._keys, strict=True)

    def __len__(self) -> int:
        return len(self._keys)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Looked):
            return NotImplemented
        return (self._names, self._keys) == (other._names, other._keys)

    def __hash__(self) -> int:
        return hash((self._names, self._keys))

    def __repr__(self) -> str:
        return f"Looked({list(self)!r})"


@dataclass(frozen=True, slots=True)
class YamlWalk:
    """What the newest usable config.yaml says, and what the walk met on its way.

    ``source``: the config.yaml the metric came from (None: no step's config.yaml names one).
    ``problems``: the unusable config.yaml files looked at (all newer than ``source``).
    ``exhausted``: the walk stopped at `WALK_LIMIT` with older steps not looked at.
    ``inputs``: the root's key and each looked-at file's key, taken before it was read (a None
    key: changed just now, so the result must not be memoized)."""

    metric: str | None = None
    direction: bool | None = None
    source: Path | None = None
    problems: tuple[str, ...] = ()
    exhausted: bool = False
    inputs: tuple[StatKey | None, Looked] = ((), Looked())


def _steps_newest_first(root: Path) -> list[str]:
    """Names of the ``step_N`` directories (not symlinks), highest N first."""
    found: list[tuple[int, bool, str]] = []
    try:
        with os.scandir(root) as it:
            for entry in it:
                parsed = parse_name(entry.name)
                if parsed is None or parsed.kind is not Kind.STEP:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    found.append((parsed.step, parsed.canonical, entry.name))
    except OSError:
        return []  # a root that cannot be listed is reported by the pass
    return [name for *_, name in sorted(found, reverse=True)]


def _steps_of(names: list[str]) -> list[str]:
    found: list[tuple[int, bool, str]] = []
    for name in names:
        parsed = parse_name(name)
        if parsed is not None and parsed.kind is Kind.STEP:
            found.append((parsed.step, parsed.canonical, name))
    return [name for *_, name in sorted(found, reverse=True)]


def walk_config_yaml(where: Root, cache: YamlCache, now_ns: int) -> YamlWalk:
    """The newest step's config.yaml that names a metric, walking down from the newest step."""
    root, files = where.path, root_files(where)
    if files is not None:
        root_key, names = files.names_key(), _steps_of(files.dirs())
    else:
        root_key, names = _stat_key(root, now_ns), _steps_newest_first(root)
    problems: list[str] = []
    looked: list[tuple[str, StatKey | None]] = []
    prefix = f"{root}/"  # strings: a path object per step would cost more than its lstat
    for name in names[:WALK_LIMIT]:
        rel = f"{name}/{CONFIG_FILE}"
        key = _stat_key(f"{prefix}{rel}", now_ns) if files is None else files.key(rel)
        looked.append((name, key))
        if key == ():
            continue
        path = root / name / CONFIG_FILE
        if files is not None and key is not None:
            facts = cache.facts_of(files, root, rel, key)
        else:
            facts = cache.facts(path, now_ns)
        if facts.problem is not None:
            problems.append(f"{path}: {facts.problem}")
        elif facts.metric is not None:
            inputs = (root_key, Looked(looked))
            return YamlWalk(facts.metric, facts.direction, path, tuple(problems), False, inputs)
    exhausted = len(names) > WALK_LIMIT
    return YamlWalk(None, None, None, tuple(problems), exhausted, (root_key, Looked(looked)))


def walk_unchanged(where: Root, inputs: YamlWalk, now_ns: int) -> bool:
    """True when the files a walk looked at (and the root's listing) are as they were."""
    root_key, looked = inputs.inputs
    root, files = where.path, root_files(where)
    now_root = _stat_key(root, now_ns) if files is None else files.names_key()
    if root_key is None or now_root != root_key:
        return False
    prefix = f"{root}/"
    for name, key in looked:
        rel = f"{name}/{CONFIG_FILE}"
        now_key = _stat_key(f"{prefix}{rel}", now_ns) if files is None else files.key(rel)
        if key is None or now_key != key:
            return False
    return True
