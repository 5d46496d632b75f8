"""The settings of a root and the schema of the daemon's config file.

`Settings` is what governs one root: the retention policy (validated by `Policy.from_mapping`
alone) plus the daemon's per-root knobs (``sweep_interval``, ``observer``). `ConfigFile` is the
TOML file's shape (DESIGN.md section 5), checked with pydantic; `schema_problems` turns its
errors into ``(key path, reason)`` pairs. Building a `DaemonConfig` from them is
`ckptkeeperd.config`'s (which re-exports the names here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

from ckptkeeper.policy import Policy, PolicyError, parse_duration

from .address import DEFAULT_METRICS_ADDRESS, parse_address
from .shard import parse_shard

__all__ = [
    "DAEMON_KEYS",
    "OBSERVER_MODES",
    "POLICY_KEYS",
    "SETTING_KEYS",
    "ConfigFile",
    "LogLevel",
    "ObserverMode",
    "Settings",
    "schema_problems",
]

ObserverMode = Literal["auto", "inotify", "polling"]
LogLevel = Literal["debug", "info", "warning", "error"]
OBSERVER_MODES: frozenset[str] = frozenset(get_args(ObserverMode))
POLICY_KEYS: frozenset[str] = Policy.keys()
DAEMON_KEYS: frozenset[str] = frozenset({"sweep_interval", "observer"})
SETTING_KEYS: frozenset[str] = POLICY_KEYS | DAEMON_KEYS


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


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    defaults: _Table = Field(default_factory=_Table)
    root: list[_RootTable] = Field(default_factory=list)
    discover: list[_DiscoverTable] = Field(default_factory=list)
    daemon: _DaemonTable = Field(default_factory=_DaemonTable)


_TABLE_KEYS: dict[tuple[str | int, ...], list[str]] = {
    (): list(ConfigFile.model_fields),
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


def schema_problems(exc: ValidationError) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for err in exc.errors(include_url=False):
        ctx = err.get("ctx") or {}
        reason = ctx["reason"] if err["type"] == "setting" else _reason(err)
        out.append((_key_path(list(err["loc"])), str(reason)))
    return out
