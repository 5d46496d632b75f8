"""The daemon's configuration: TOML validated with pydantic; every error names file, key and reason.

The file (DESIGN.md section 5)::

    [defaults]      policy keys (see `ckptkeeper.Policy`) plus sweep_interval ("60s", > 0) and
                    observer (auto | inotify | polling); applies to every root
    [[root]]        path (absolute, or relative to the config file's directory) + any defaults key
    [[discover]]    glob (same; not recursive: ``**`` acts as ``*``) + any defaults key
    [daemon]        workers (roots reconciled in parallel, 4), delete_workers (threads per
                    removal, 8), log_level (debug | info | warning | error, "info"),
                    metrics_address ("host:port" of the Prometheus endpoint, "127.0.0.1:9464";
                    "" turns it off), root_labels (a ``root`` label on metrics, true),
                    max_tmp_watches (in-flight saves watched by inotify, 8192), shard ("i/n":
                    only the roots whose stable hash mod n is i, `ckptkeeperd.shard`); optional

Policy values are validated by `Policy.from_mapping` alone; nothing here repeats its rules.
TOML cannot express "unset", so a table cannot remove a bound set by a lower level; to keep every
step of one root, set ``keep_every_n_steps = 1`` there.

Per-root resolution and discovery live in `ckptkeeperd.roots`.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Self, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from ckptkeeper.errors import strerror
from ckptkeeper.policy import Policy, PolicyError, parse_duration
from ckptkeeper.stores import root_path

from .address import DEFAULT_METRICS_ADDRESS, parse_address
from .shard import Shard, parse_shard

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
    "load_config",
    "merge_flags",
    "with_metrics_address",
    "with_shard",
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
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    root_labels: bool = True
    max_tmp_watches: int = 8192  # beyond: in-flight saves are polled (ckptkeeperd.watch)
    shard: Shard | None = None  # only the roots of this shard (ckptkeeperd.shard)


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
    metrics_address: StrictStr = DEFAULT_METRICS_ADDRESS
    root_labels: bool = Field(default=True, strict=True)

    @field_validator("metrics_address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)  # ValueError names what is wrong
        return value

    max_tmp_watches: int = Field(default=8192, ge=0, strict=True)
    shard: StrictStr | None = None

    @field_validator("shard")
    @classmethod
    def _shard(cls, value: str | None) -> str | None:
        if value is not None:
            parse_shard(value)  # ValueError names what is wrong
        return value


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
    if kind == "value_error":
        return f"{ctx.get('error')}, got {value!r}"
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
        why = f"cannot read config file: {strerror(exc)}"
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
        try:  # an absolute path replaces base_dir; an s3:// URL stays a URL
            root = root_path(table.path, base_dir)
        except ValueError as exc:
            problems.append((f"root[{i}].path", str(exc)))
            continue
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
    options = DaemonOptions(
        d.workers,
        d.delete_workers,
        d.log_level,
        d.metrics_address,
        d.root_labels,
        d.max_tmp_watches,
        parse_shard(d.shard) if d.shard is not None else None,
    )
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


def with_metrics_address(config: DaemonConfig, address: str | None) -> DaemonConfig:
    """``config`` with ``run --metrics-address`` (None: not given) over ``[daemon]``."""
    if address is None:
        return config
    try:
        parse_address(address)
    except ValueError as exc:
        raise ConfigError(COMMAND_LINE, [("--metrics-address", str(exc))]) from None
    return replace(config, daemon=replace(config.daemon, metrics_address=address))


def with_shard(config: DaemonConfig, shard: str | None) -> DaemonConfig:
    """``config`` with ``--shard i/n`` (None: not given) over ``[daemon] shard``."""
    if shard is None:
        return config
    try:
        parsed = parse_shard(shard)
    except ValueError as exc:
        raise ConfigError(COMMAND_LINE, [("--shard", str(exc))]) from None
    return replace(config, daemon=replace(config.daemon, shard=parsed))


def add_roots(config: DaemonConfig, roots: Sequence[str | os.PathLike[str]]) -> DaemonConfig:
    """``config`` plus command-line roots (relative to the working directory, no overrides)."""
    entries = list(config.roots)
    for i, raw in enumerate(roots):
        text = os.fspath(raw)
        if not text or "\0" in text:
            raise ConfigError(COMMAND_LINE, [(f"ROOT[{i}]", f"not a usable path: {text!r}")])
        try:
            entries.append(RootEntry(root_path(text)))
        except ValueError as exc:
            raise ConfigError(COMMAND_LINE, [(f"ROOT[{i}]", str(exc))]) from None
    return replace(config, roots=entries)


def config_from_flags(
    roots: Sequence[str | os.PathLike[str]], flags: Mapping[str, Any]
) -> DaemonConfig:
    """A configuration without a file: ``roots`` governed by ``flags`` (keys of ``[defaults]``)."""
    empty = DaemonConfig(source=None, defaults=Settings(), roots=[], discovers=[])
    return merge_flags(add_roots(empty, roots), flags)
