"""The options every ``ckptkeeper`` command shares, and the config they build (flags over a
``--config`` file)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from .config import (
    ConfigError,
    DaemonConfig,
    config_from_flags,
    load_config,
    merge_flags,
    with_metrics_address,
    with_shard,
)
from .logs import LEVELS, configure_logging

__all__ = ["build_config", "policy_options", "reloader", "setup_logs"]


def policy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--config",
            "config_path",
            type=click.Path(dir_okay=False, path_type=Path),
            help="TOML config file (see systemd/ckptkeeper.toml).",
        ),
        click.option(
            "--keep-top-k", type=click.IntRange(min=0), help="Keep the k best steps by --metric."
        ),
        click.option("--metric", "metric_name", help="Key in training_info.json to rank by."),
        click.option(
            "--higher-is-better/--lower-is-better",
            "higher_is_better",
            default=None,
            help="Metric direction (default: from config.yaml, else lower).",
        ),
        click.option(
            "--keep-latest-n", type=click.IntRange(min=0), help="Keep the n most recent steps."
        ),
        click.option(
            "--keep-every-n-steps",
            type=click.IntRange(min=1),
            help="Keep steps with step % n == 0 forever.",
        ),
        click.option(
            "--min-free",
            help="Under this free space (15% or 500G), delete beyond the other rules.",
        ),
        click.option(
            "--min-keep",
            type=click.IntRange(min=1),
            help="Under disk pressure, keep at least this many checkpoints (default 1).",
        ),
        click.option(
            "--save-period",
            type=click.IntRange(min=1),
            help="Only steps with step % p == 0 are top-k candidates.",
        ),
        click.option(
            "--keep-latest/--no-keep-latest",
            "keep_latest",
            default=None,
            help="Always keep the highest step (default: on).",
        ),
        click.option(
            "--stale-after", help="Collect unmarked tmp_step_N untouched this long (e.g. 6h)."
        ),
        click.option("--trash-grace", help="Keep deleted steps in trash this long before removal."),
        click.option("--complete-marker", help="Completion marker file name (default .complete)."),
        click.option(
            "--layout",
            help="How the trainer names its checkpoints: nemo-rl (default), auto, hf-trainer, "
            "torchtitan, megatron, deepspeed, orbax, lightning (README Layouts).",
        ),
        click.option(
            "--metrics-from",
            "metrics_from",  # policy key metrics_file (sweep's --metrics-file: the textfile)
            help="JSON file inside each checkpoint to read metrics from (policy key metrics_file).",
        ),
        click.option(
            "--settle-after",
            help="A layout without commit signal (hf-trainer): untouched this long counts (2m).",
        ),
        click.option("--sweep-interval", help="Full pass of every root this often (e.g. 60s)."),
        click.option(
            "--observer", type=click.Choice(["auto", "inotify", "polling"]), help="Event source."
        ),
        click.option(
            "--log-level", type=click.Choice(LEVELS), default=None, help="Log level (default info)."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


_FLAG_KEYS = (
    "keep_top_k",
    "metric_name",
    "higher_is_better",
    "keep_latest_n",
    "keep_every_n_steps",
    "min_free",
    "min_keep",
    "save_period",
    "keep_latest",
    "stale_after",
    "trash_grace",
    "complete_marker",
    "layout",
    "settle_after",
    "sweep_interval",
    "observer",
)


def _flags(opts: dict[str, Any]) -> dict[str, Any]:
    """The policy and daemon keys given on the command line (over the config file's)."""
    flags = {k: opts[k] for k in _FLAG_KEYS if opts.get(k) is not None}
    if opts.get("metrics_from") is not None:
        flags["metrics_file"] = opts["metrics_from"]
    return flags


def build_config(roots: Sequence[str], opts: dict[str, Any]) -> DaemonConfig:
    flags = _flags(opts)
    path: Path | None = opts.get("config_path")
    try:
        if path is not None:
            config = merge_flags(load_config(path), flags, extra_roots=list(roots))
        else:
            config = config_from_flags(list(roots), flags)
        config = with_metrics_address(config, opts.get("metrics_address"))
        config = with_shard(config, opts.get("shard"))
    except ConfigError as exc:
        click.echo(f"ckptkeeper: {exc}", err=True)
        raise SystemExit(2) from None
    if not config.roots and not config.discovers:
        click.echo(
            "ckptkeeper: no roots: pass ROOT arguments or --config with [[root]] or [[discover]]",
            err=True,
        )
        raise SystemExit(2)
    return config


def setup_logs(opts: dict[str, Any], config: DaemonConfig | None, to_stderr: bool = False) -> None:
    level = opts.get("log_level") or (config.daemon.log_level if config is not None else "info")
    configure_logging(level, stream=sys.stderr if to_stderr else sys.stdout)


def reloader(roots: Sequence[str], opts: dict[str, Any]) -> Callable[[], DaemonConfig] | None:
    """What SIGHUP re-reads: the config file with the same flags and roots on top, if any."""
    path: Path | None = opts.get("config_path")
    if path is None:
        return None
    flags = _flags(opts)
    address, shard = opts.get("metrics_address"), opts.get("shard")
    return lambda: with_shard(
        with_metrics_address(
            merge_flags(load_config(path), flags, extra_roots=list(roots)), address
        ),
        shard,
    )
