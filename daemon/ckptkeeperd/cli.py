"""The ``ckptkeeper`` command: ``run``, ``sweep``, ``status``, ``check``, ``demo``.

Exit codes: 0 success, 1 a pass had errors, 2 bad usage or config; the sidecar's are in
``sidecar`` (the trainer's code, 75 when the final pass could not finish, 126/127 as a shell);
``check`` uses the Nagios codes (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import click

from ckptkeeper import Policy
from ckptkeeper.errors import errno_text
from ckptkeeper.storage import Storage
from ckptkeeper.stores import Root

from .cliopts import build_config, policy_options, reloader, setup_logs
from .everyroot import every_root
from .logs import ProblemLog, configure_logging, get_logger
from .reconcile import EVENT_FOR, PolicySource, Report, preview, reconcile

__all__ = ["main"]

_MUTATING = set(EVENT_FOR)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptkeeper")
def cli() -> None:
    """ckptkeeper: trainers only write; the keeper finalizes, collects and prunes checkpoints."""


@cli.command()
@click.argument("roots", nargs=-1)
@policy_options
@click.option("--dry-run", is_flag=True, help="Print what would happen; change nothing.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON document of every root's result."
)
@click.option(
    "--shard",
    help='Several keepers: handle only the roots whose stable hash mod n is i ("i/n").',
)
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write Prometheus metrics here (atomically) for node_exporter's textfile collector.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    help="Sweep local roots in this many processes (default: the CPUs available; 1 with "
    "--metrics-file). Output and exit code are those of one process.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep parsed metrics here across sweeps, for the look that decides whether a root "
    "needs a pass (README Command line). Off by default: a sweep writes nothing outside its roots.",
)
def sweep(
    roots: tuple[str, ...],
    dry_run: bool,
    as_json: bool,
    metrics_file: Path | None,
    jobs: int | None,
    cache_dir: Path | None,
    **opts: Any,
) -> None:
    """One pass over every root, then exit (cron, systemd timer)."""
    config = build_config(roots, opts)
    setup_logs(opts, config, to_stderr=as_json)
    looks = None if cache_dir is None or dry_run else _cold_looks(cache_dir)
    metrics = None
    if metrics_file is not None:  # prometheus_client only when asked for (a cold sweep's start)
        from .textfile import sweep_metrics

        if not metrics_file.parent.is_dir():  # before the pass, not a traceback after it
            why = f"{metrics_file.parent}: not a directory (create it, or choose another file)"
            raise click.BadParameter(why, param_hint="'--metrics-file'")

        metrics = sweep_metrics(config, metrics_file)

    def one(where: Root, policy: PolicySource, log: Any, problems: ProblemLog) -> Report:
        root = where.path
        if dry_run:
            now = policy if isinstance(policy, Policy) else policy()
            report = preview(root, now, log=log, problems=problems, storage=where.storage)
            for d in report.plan.decisions if report.plan is not None else ():
                if d.action in _MUTATING:
                    log.info(
                        f"would_{d.action.value}",
                        step=d.step,
                        path=str(d.path),
                        reason="; ".join(d.reasons),
                    )
            return report
        return reconcile(
            root,
            policy,
            log=log,
            problems=problems,
            lock_timeout=30.0,
            delete_workers=config.daemon.delete_workers,
            storage=looks(where.storage) if looks is not None else where.storage,
            on_outcome=None if metrics is None else metrics.finalize_hook(root, marker(policy)),
        )

    def finish(report: Report, policy: Policy | None) -> _Swept:
        # What a worker process hands back: small, and no storage or scan to pickle.
        doc = None
        if as_json:
            from .render import report_to_dict

            doc = report_to_dict(report, policy)
        return _Swept(bool(report.errors), doc, report if metrics is not None else None)

    workers = 1 if metrics is not None else jobs or _default_jobs()
    results = every_root(config, one, finish, workers)
    if metrics is not None and metrics_file is not None:
        from .textfile import write_sweep_metrics

        reports = [r.report for r in results if r.report is not None]
        try:
            write_sweep_metrics(config, metrics, reports, metrics_file)
        except OSError as exc:
            click.echo(f"ckptkeeper: cannot write {metrics_file}: {errno_text(exc)}", err=True)
            raise SystemExit(1) from None
    if as_json:
        doc = {"dry_run": dry_run, "roots": [r.doc for r in results]}
        click.echo(json.dumps(doc, indent=2))
    raise SystemExit(1 if any(r.errors for r in results) else 0)


class _Swept(NamedTuple):
    errors: bool
    doc: dict[str, Any] | None
    report: Report | None  # with --metrics-file only (one process)


def _cold_looks(directory: Path) -> Callable[[Storage], Storage] | None:
    """What gives a local root's storage the metrics cache in ``directory`` for its unlocked
    look; prunes the cache first (`ckptkeeper.coldcache`). None (logged) when the directory
    cannot be ours alone: the sweep goes on without it."""
    from ckptkeeper.coldcache import ColdLookStorage, prune, usable_dir
    from ckptkeeper.storage import PosixStorage

    directory = directory.absolute()
    if (why := usable_dir(directory)) is not None:
        get_logger().warning("cache_unusable", path=str(directory), reason=why)
        return None
    prune(directory)

    def looks(storage: Storage) -> Storage:
        if type(storage) is PosixStorage:
            return ColdLookStorage(directory, storage.fs)
        return storage

    return looks


def _pair(report: Report, policy: Policy | None) -> tuple[Report, Policy]:
    assert policy is not None  # in one process every pass has its policy
    return report, policy


def _default_jobs() -> int:
    from .fanout import default_jobs

    return default_jobs()


def marker(policy: PolicySource) -> Callable[[], str]:
    """The completion marker's name in the policy in effect (resolved when asked)."""
    return lambda: (policy if isinstance(policy, Policy) else policy()).complete_marker


@cli.command()
@click.argument("roots", nargs=-1)
@policy_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the status page (HTML with the metric chart) to this file instead of tables.",
)
def status(roots: tuple[str, ...], as_json: bool, html_path: Path | None, **opts: Any) -> None:
    """What is on disk and what the policy decides for each step, with reasons. Changes nothing."""
    from rich.console import Console

    from .render import print_reports, report_to_dict

    config = build_config(roots, opts)
    setup_logs(opts, config, to_stderr=True)

    def one(where: Root, policy: PolicySource, log: Any, problems: ProblemLog) -> Report:
        now = policy if isinstance(policy, Policy) else policy()
        return preview(where.path, now, log=log, problems=problems, storage=where.storage)

    results = every_root(config, one, _pair)
    if html_path is not None:
        from .page import write_page

        try:
            write_page(html_path, results)
        except OSError as exc:
            click.echo(f"ckptkeeper: cannot write {html_path}: {exc.strerror or exc}", err=True)
            raise SystemExit(2) from None
    unshown = 0
    if as_json:
        click.echo(json.dumps({"roots": [report_to_dict(r, p) for r, p in results]}, indent=2))
    elif html_path is None:
        unshown = print_reports(results, Console(soft_wrap=False, width=max(Console().width, 120)))
    raise SystemExit(1 if unshown or any(r.status == "error" for r, _ in results) else 0)


class _ProbeUsageError(click.UsageError):
    exit_code = 3  # UNKNOWN: a monitoring system reads 2 as CRITICAL


class _ProbeCommand(click.Command):
    """A monitoring plugin: a usage error is UNKNOWN (3), not 2."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _ProbeUsageError(exc.format_message(), exc.ctx) from None


@cli.command(cls=_ProbeCommand)
@click.argument("roots", nargs=-1)
@policy_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead.")
def check(roots: tuple[str, ...], as_json: bool, **opts: Any) -> None:
    """Monitoring probe (Nagios/Icinga): judge every root from what is on disk; no keeper needed.

    Exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN; one summary line (or --json)."""
    from .check import run_check

    try:
        config = build_config(roots, opts)
    except SystemExit:  # the reason is on stderr
        click.echo("CKPTKEEPER UNKNOWN - bad usage or configuration (see stderr)")
        raise SystemExit(3) from None
    configure_logging(opts.get("log_level") or "error", stream=sys.stderr)
    code, line, doc = run_check(config)
    click.echo(json.dumps(doc, indent=2) if as_json else line)
    raise SystemExit(code)


@cli.command(context_settings={"allow_interspersed_args": True})
@click.argument("roots", nargs=-1)
@policy_options
@click.option(
    "--watch-pid",
    type=click.IntRange(min=1),
    help="Sidecar: exit after this process exits (after one final pass).",
)
@click.option(
    "--shard",
    help='Several keepers: handle only the roots whose stable hash mod n is i ("i/n").',
)
@click.option(
    "--metrics-address",
    help='Serve /metrics on HOST:PORT (default [daemon] metrics_address, 127.0.0.1:9464; "" off).',
)
@click.pass_context
def run(ctx: click.Context, /, roots: tuple[str, ...], watch_pid: int | None, **opts: Any) -> None:
    """The keeper daemon. With --watch-pid or `-- TRAINER CMD...` it is a sidecar.

    \b
    ckptkeeper run --config /etc/ckptkeeper/ckptkeeper.toml
    ckptkeeper run /ckpt/run-a --keep-top-k 3 --metric val_reward --higher-is-better
    ckptkeeper run /ckpt/run-a --keep-top-k 3 -- python train.py --lr 1e-4
    """
    from .service import Keeper
    from .sidecar import Sidecar, SidecarError

    trainer_cmd: list[str] = (ctx.obj or {}).get("trainer_cmd", [])
    if trainer_cmd and watch_pid is not None:
        click.echo("ckptkeeper: --watch-pid and a trainer command exclude each other", err=True)
        raise SystemExit(2)
    config = build_config(roots, opts)
    setup_logs(opts, config)
    try:
        sidecar = (
            Sidecar.spawn(trainer_cmd)
            if trainer_cmd
            else (Sidecar.watch(watch_pid) if watch_pid is not None else None)
        )
    except SidecarError as exc:
        click.echo(f"ckptkeeper: {exc}", err=True)
        raise SystemExit(exc.code) from None
    keeper = Keeper(config, reload=reloader(roots, opts), sidecar=sidecar)
    raise SystemExit(keeper.run())


@cli.command()
@click.option(
    "--steps",
    default=12,
    show_default=True,
    type=click.IntRange(min=3, max=200),
    help="Checkpoints the simulated trainer writes.",
)
def demo(steps: int) -> None:
    """Self-contained demo: a simulated trainer writes checkpoints while the keeper keeps them."""
    from .demo import run_demo

    raise SystemExit(run_demo(steps))


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    trainer_cmd: list[str] = []
    if args and args[0] == "run" and "--" in args:
        cut = args.index("--")
        args, trainer_cmd = args[:cut], args[cut + 1 :]
        if not trainer_cmd:
            click.echo("ckptkeeper: `--` must be followed by the trainer command", err=True)
            raise SystemExit(2)
    cli.main(args=args, prog_name="ckptkeeper", obj={"trainer_cmd": trainer_cmd})


if __name__ == "__main__":
    main()
