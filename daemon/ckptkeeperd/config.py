"""The daemon's configuration: TOML validated with pydantic; every error names file, key and reason.

The file (DESIGN.md section 5)::

    [defaults]      policy keys (see `ckptkeeper.Policy`) plus sweep_interval ("60s", > 0) and
                    observer (auto | inotify | polling); applies to every root
    [[root]]        path (absolute, or relative to the config file's directory) + any defaults key
    [[discover]]    glob (same; not recursive: ``**`` acts as ``*``) + any defaults key
    [daemon]        workers (roots reconciled in parallel, 4), delete_workers (threads per
                    removal, 8), log_level (debug | info | warning | error, "info"); optional

Policy values are validated by `Policy.from_mapping` alone; nothing here repeats its rules.
TOML cannot express "unset", so a table cannot remove a bound set by a lower level; to keep every
step of one root, set ``keep_every_n_steps = 1`` there.

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
"""

from __future__ import annotations

import errno
import glob as globlib
import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Self, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, model_validator
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from ckptkeeper.names import Kind, parse_name
from ckptkeeper.policy import Policy, PolicyError, parse_duration
from ckptkeeper.scan import CKPTKEEPER_DIR

__all__ = [
    "DAEMON_KEYS",
    "POLICY_KEYS",
    "RUN_FILE",
    "SETTING_KEYS",
    "ConfigError",
    "DaemonConfig",
    "DaemonOptions",
    "DiscoverEntry",
    "LogLevel",
    "ObserverMode",
    "Resolved",
    "RootEntry",
    "Settings",
    "add_roots",
    "config_from_flags",
    "expand_roots",
    "load_config",
    "merge_flags",
    "resolve_settings",
]

ObserverMode = Literal["auto", "inotify", "polling"]
LogLevel = Literal["debug", "info", "warning", "error"]
OBSERVER_MODES: frozenset[str] = frozenset(get_args(ObserverMode))
POLICY_KEYS: frozenset[str] = Policy.keys()
DAEMON_KEYS: frozenset[str] = frozenset({"sweep_interval", "observer"})
SETTING_KEYS: frozenset[str] = POLICY_KEYS | DAEMON_KEYS
RUN_FILE = "ckptkeeper.toml"
MAX_RUN_FILE_BYTES = 64 * 1024
MAX_YAML_BYTES = 4 * 1024 * 1024
COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """Invalid configuration. ``problems`` holds ``(key path or None, reason)`` pairs; the message
    has one ``<source>: <key path>: <reason>`` line per problem."""

    def __init__(self, source: str, problems: Sequence[tuple[str | None, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = [f"{source}: {key}: {why}" if key else f"{source}: {why}" for key, why in problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True, slots=True)
class Settings:
    """What governs one root: the retention policy plus the daemon's per-root knobs."""

    policy: Policy = field(default_factory=Policy)
    sweep_interval: float = 60.0
    observer: ObserverMode = "auto"

    def __post_init__(self) -> None:
        value = self.sweep_interval
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PolicyError("sweep_interval", f"expected seconds as a number, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise PolicyError("sweep_interval", f"must be a duration > 0, got {value!r}")
        if not isinstance(self.observer, str) or self.observer not in OBSERVER_MODES:
            raise PolicyError(
                "observer", f"expected one of 'auto', 'inotify', 'polling', got {self.observer!r}"
            )

    def apply(
        self, values: Mapping[str, Any], *, allowed: frozenset[str] = SETTING_KEYS
    ) -> Settings:
        """These settings with ``values`` (user-facing keys, durations as text) laid over them.

        Raises `PolicyError` naming the first unknown key or invalid value.
        """
        for key in sorted(values):
            if key not in allowed:
                raise PolicyError(key, f"unknown key (known keys: {', '.join(sorted(allowed))})")
        policy_values = {k: v for k, v in values.items() if k in POLICY_KEYS}
        policy = Policy.from_mapping(policy_values, base=self.policy)
        sweep = self.sweep_interval
        if "sweep_interval" in values:
            raw = values["sweep_interval"]
            sweep = parse_duration(raw, "sweep_interval")
            if sweep <= 0:
                raise PolicyError("sweep_interval", f"must be a duration > 0, got {raw!r}")
        return Settings(policy, sweep, values.get("observer", self.observer))


@dataclass(frozen=True, slots=True)
class RootEntry:
    path: Path
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DiscoverEntry:
    """``glob`` as written; a relative one is matched from ``base_dir`` (the config's directory)."""

    glob: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    base_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    workers: int = 4
    delete_workers: int = 8
    log_level: LogLevel = "info"


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """A validated configuration. ``default_overrides`` are the keys ``[defaults]`` and flags set
    (``defaults`` is them applied over the built-in settings)."""

    source: Path | None
    defaults: Settings
    roots: list[RootEntry]
    discovers: list[DiscoverEntry]
    daemon: DaemonOptions = field(default_factory=DaemonOptions)
    default_overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Resolved:
    """The settings of one root, problems met on the way (never raised), and where each
    configured key came from (``ckptkeeper.toml``, ``entry``, ``defaults`` or ``config.yaml``)."""

    settings: Settings
    problems: list[str] = field(default_factory=list)
    origins: Mapping[str, str] = field(default_factory=dict)


# -- the file's schema -----------------------------------------------------------------------


class _Table(BaseModel):
    """A table of settings keys, checked by `Settings.apply` (and so by `Policy.from_mapping`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _check_settings(self) -> Self:
        """Each key on its own, so that every bad key is reported, then all of them together."""
        values = self.settings
        failed = [exc for key, value in values.items() if (exc := _apply_error({key: value}))]
        if not failed and (exc := _apply_error(values)):
            failed = [exc]
        if failed:
            details = [
                InitErrorDetails(
                    type=PydanticCustomError("setting", "{reason}", {"reason": exc.reason}),
                    loc=(exc.key,),
                    input=values.get(exc.key),
                )
                for exc in failed
            ]
            raise ValidationError.from_exception_data(type(self).__name__, details)
        return self


def _apply_error(values: Mapping[str, Any]) -> PolicyError | None:
    try:
        Settings().apply(values)
    except PolicyError as exc:
        return exc
    return None


class _RootTable(_Table):
    path: StrictStr = Field(min_length=1)


class _DiscoverTable(_Table):
    glob: StrictStr = Field(min_length=1)


class _DaemonTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    workers: int = Field(default=4, ge=1, strict=True)
    delete_workers: int = Field(default=8, ge=1, strict=True)
    log_level: LogLevel = "info"


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    defaults: _Table = Field(default_factory=_Table)
    root: list[_RootTable] = Field(default_factory=list)
    discover: list[_DiscoverTable] = Field(default_factory=list)
    daemon: _DaemonTable = Field(default_factory=_DaemonTable)


_TABLE_KEYS: dict[tuple[str | int, ...], list[str]] = {
    (): list(_File.model_fields),
    ("daemon",): list(_DaemonTable.model_fields),
}
_TOML_TYPES = {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}
_TOML_TYPES |= {int: "an integer", float: "a float"}


def _key_path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _reason(err: ErrorDetails) -> str:
    kind, loc, value = err["type"], err["loc"], err.get("input")
    ctx = err.get("ctx") or {}
    got = _TOML_TYPES.get(type(value), type(value).__name__)
    if kind == "extra_forbidden":
        known = _TABLE_KEYS.get(tuple(loc[:-1]), [])
        return f"unknown key (known keys: {', '.join(known)})"
    if kind == "missing":
        return "required key is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a table, got {got}"
    if kind == "list_type":
        return f"expected an array of tables ([[{loc[-1]}]]), got {got}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}, got {value!r}"
    msg = str(err["msg"])
    return f"{msg[:1].lower()}{msg[1:]}, got {value!r}"


def _problems(exc: ValidationError) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for err in exc.errors(include_url=False):
        ctx = err.get("ctx") or {}
        reason = ctx["reason"] if err["type"] == "setting" else _reason(err)
        out.append((_key_path(list(err["loc"])), str(reason)))
    return out


# -- building configurations -----------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> DaemonConfig:
    """Read and validate a config file; every problem raises `ConfigError`."""
    name = os.fspath(path)
    source = Path(path).absolute()
    try:
        text = source.read_bytes().decode("utf-8")
    except OSError as exc:
        why = f"cannot read config file: {exc.strerror or exc}"
        raise ConfigError(name, [(None, why)]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(name, [(None, f"not valid UTF-8 (byte {exc.start})")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(name, [(None, f"invalid TOML: {exc}")]) from None
    return _from_data(data, name=name, source=source)


def _from_data(data: Mapping[str, Any], *, name: str, source: Path) -> DaemonConfig:
    try:
        parsed = _File.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(name, _problems(exc)) from None
    base_dir = source.parent
    problems: list[tuple[str | None, str]] = []
    defaults_values = parsed.defaults.settings
    defaults = Settings().apply(defaults_values)  # each table was checked by the schema
    roots: list[RootEntry] = []
    seen: dict[str, int] = {}
    for i, table in enumerate(parsed.root):
        if "\0" in table.path:
            problems.append((f"root[{i}].path", "contains a NUL character"))
            continue
        root = base_dir / table.path  # an absolute path replaces base_dir
        if (first := seen.setdefault(os.path.normpath(root), i)) != i:
            problems.append((f"root[{i}].path", f"same directory as root[{first}]: {root}"))
        problems.extend(_check_over(defaults, table.settings, f"root[{i}]"))
        roots.append(RootEntry(root, table.settings))
    discovers: list[DiscoverEntry] = []
    for i, dtable in enumerate(parsed.discover):
        if "\0" in dtable.glob:
            problems.append((f"discover[{i}].glob", "contains a NUL character"))
        problems.extend(_check_over(defaults, dtable.settings, f"discover[{i}]"))
        base = None if Path(dtable.glob).is_absolute() else base_dir
        discovers.append(DiscoverEntry(dtable.glob, dtable.settings, base))
    if problems:
        raise ConfigError(name, problems)
    d = parsed.daemon
    options = DaemonOptions(d.workers, d.delete_workers, d.log_level)
    return DaemonConfig(source, defaults, roots, discovers, options, defaults_values)


def _check_over(
    base: Settings, values: Mapping[str, Any], where: str
) -> list[tuple[str | None, str]]:
    """An entry over the defaults (catches rules that involve keys from both levels)."""
    try:
        base.apply(values)
    except PolicyError as exc:
        return [(f"{where}.{exc.key}", exc.reason)]
    return []


def merge_flags(
    config: DaemonConfig,
    flags: Mapping[str, Any],
    *,
    extra_roots: Sequence[str | os.PathLike[str]] = (),
) -> DaemonConfig:
    """``config`` with command-line ``flags`` (same keys as ``[defaults]``) overriding its
    ``[defaults]`` (not its entries), plus ``extra_roots`` given as arguments (`add_roots`).
    Flags whose value is None were not given and are skipped."""
    config = add_roots(config, extra_roots) if extra_roots else config
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return config
    try:
        Settings().apply(given)
        values = {**config.default_overrides, **given}
        defaults = Settings().apply(values)
    except PolicyError as exc:
        raise ConfigError(COMMAND_LINE, [(exc.key, exc.reason)]) from None
    return replace(config, defaults=defaults, default_overrides=values)


def add_roots(config: DaemonConfig, roots: Sequence[str | os.PathLike[str]]) -> DaemonConfig:
    """``config`` plus command-line roots (relative to the working directory, no overrides)."""
    entries = list(config.roots)
    for i, raw in enumerate(roots):
        text = os.fspath(raw)
        if not text or "\0" in text:
            raise ConfigError(COMMAND_LINE, [(f"ROOT[{i}]", f"not a usable path: {text!r}")])
        entries.append(RootEntry(Path(text).absolute()))
    return replace(config, roots=entries)


def config_from_flags(
    roots: Sequence[str | os.PathLike[str]], flags: Mapping[str, Any]
) -> DaemonConfig:
    """A configuration without a file: ``roots`` governed by ``flags`` (keys of ``[defaults]``)."""
    empty = DaemonConfig(source=None, defaults=Settings(), roots=[], discovers=[])
    return merge_flags(add_roots(empty, roots), flags)


# -- per-root resolution ---------------------------------------------------------------------


def resolve_settings(
    config: DaemonConfig, root: Path, entry_overrides: Mapping[str, Any]
) -> Resolved:
    """The settings of ``root`` (precedence in the module docstring). Never raises."""
    root = Path(root)
    problems: list[str] = []
    layers: list[tuple[str, Mapping[str, Any]]] = [
        ("defaults", config.default_overrides),
        ("entry", entry_overrides),
        (RUN_FILE, _read_run_file(root / RUN_FILE, problems)),
    ]
    configured = {key: value for _, values in layers for key, value in values.items()}
    if "metric_name" not in configured or "higher_is_better" not in configured:
        layers.insert(0, ("config.yaml", _yaml_fallback(root, configured)))
    settings = Settings()
    origins: dict[str, str] = {}
    for origin, values in layers:
        try:
            settings = settings.apply(values)
        except PolicyError as exc:  # a valid layer over the others can still clash; skip it
            where = root / RUN_FILE if origin == RUN_FILE else origin
            problems.append(f"{where}: {exc.key}: {exc.reason}; {origin} settings ignored")
            continue
        origins.update(dict.fromkeys(values, origin))
    return Resolved(settings, problems, origins)


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


def _yaml_fallback(root: Path, configured: Mapping[str, Any]) -> dict[str, Any]:
    step = _newest_step(root)
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
        matches = sorted(globlib.glob(entry.glob, root_dir=base))  # noqa: PTH207
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
