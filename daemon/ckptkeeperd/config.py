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

`Settings` and the file's pydantic schema live in `ckptkeeperd.settings` (re-exported here);
per-root resolution in `ckptkeeperd.resolver`, discovery in `ckptkeeperd.roots`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ckptkeeper.errors import strerror
from ckptkeeper.policy import PolicyError
from ckptkeeper.storage import POSIX, Storage
from ckptkeeper.stores import Root, parse_root

from .address import DEFAULT_METRICS_ADDRESS, parse_address
from .settings import (
    DAEMON_KEYS,
    POLICY_KEYS,
    SETTING_KEYS,
    ConfigFile,
    LogLevel,
    ObserverMode,
    Settings,
    schema_problems,
)
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
class RootEntry:
    """A ``[[root]]`` (or command-line root): its path, overrides and the storage it lives on,
    decided once from its spelling (`ckptkeeper.stores.parse_root`)."""

    path: Path
    overrides: Mapping[str, Any] = field(default_factory=dict)
    storage: Storage = POSIX

    @property
    def root(self) -> Root:
        return Root(self.path, self.storage)


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
        parsed = ConfigFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(name, schema_problems(exc)) from None
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
            root = parse_root(table.path, base_dir)
        except ValueError as exc:
            problems.append((f"root[{i}].path", str(exc)))
            continue
        if (first := seen.setdefault(os.path.normpath(root.path), i)) != i:
            problems.append((f"root[{i}].path", f"same directory as root[{first}]: {root.url}"))
        problems.extend(_check_over(defaults, table.settings, f"root[{i}]"))
        roots.append(RootEntry(root.path, table.settings, root.storage))
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
            root = parse_root(text)
        except ValueError as exc:
            raise ConfigError(COMMAND_LINE, [(f"ROOT[{i}]", str(exc))]) from None
        entries.append(RootEntry(root.path, storage=root.storage))
    return replace(config, roots=entries)


def config_from_flags(
    roots: Sequence[str | os.PathLike[str]], flags: Mapping[str, Any]
) -> DaemonConfig:
    """A configuration without a file: ``roots`` governed by ``flags`` (keys of ``[defaults]``)."""
    empty = DaemonConfig(source=None, defaults=Settings(), roots=[], discovers=[])
    return merge_flags(add_roots(empty, roots), flags)
