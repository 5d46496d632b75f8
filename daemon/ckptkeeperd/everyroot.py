"""One action (a sweep's pass, a status look, a check) on every root of a config, each root's
policy resolved as the action asks for it; local roots optionally on forked workers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ckptkeeper import Policy
from ckptkeeper.stores import Root

from .config import DaemonConfig
from .lockscope import LockScopeWarner
from .logs import ProblemLog, get_logger
from .reconcile import PolicySource, Report
from .resolver import SettingsResolver
from .roots import expand

__all__ = ["every_root"]

_T = TypeVar("_T")


def every_root(
    config: DaemonConfig,
    action: Callable[[Root, PolicySource, Any, ProblemLog], Report],
    finish: Callable[[Report, Policy | None], _T],
    jobs: int = 1,
) -> list[_T]:
    """``finish`` of ``action`` on every root, given what resolves the root's policy: the first
    call has the settings resolved just before the pass (their problems logged first), each
    later one resolves afresh, so a sweep's plan under the lock uses the settings as they are
    then.
    ``jobs`` > 1: local roots on up to that many processes (`fanout`), in the order given."""
    roots = expand(config)

    def chunk(part: Sequence[tuple[Root, Mapping[str, Any]]]) -> list[_T]:
        problems = ProblemLog()
        resolver = SettingsResolver()
        scopes = LockScopeWarner()
        out: list[_T] = []
        for where, overrides in part:
            root = where.path
            log = get_logger(root=str(root))
            if (local := where.local_dir) is not None:
                scopes.check(local, log)
            source = _policy_source(resolver, config, where, overrides, problems, log)
            first = source()  # its problems are logged before the pass, whatever the pass does
            report = action(where, _first_then(first, source), log, problems)
            out.append(finish(report, report.plan.policy if report.plan is not None else first))
        return out

    if jobs <= 1 or len(roots) < 2 or not _forkable(roots):
        return chunk(roots)
    from .fanout import WorkerFailed, map_chunks

    results = map_chunks(roots, jobs, chunk)
    for i, result in enumerate(results):
        if isinstance(result, WorkerFailed):  # its roots' passes did not report: an error each
            failed = Report(roots[i][0].path, status="error", problems=[str(result)])
            results[i] = finish(failed, None)
    return results  # type: ignore[return-value]


def _first_then(first: Policy, source: Callable[[], Policy]) -> Callable[[], Policy]:
    """``first`` once (the unlocked look: not resolved twice in a row), then ``source``."""
    pending = [first]
    return lambda: pending.pop() if pending else source()


def _forkable(roots: Sequence[tuple[Root, Mapping[str, Any]]]) -> bool:
    """Worth and safe to fork for: local roots only (an object store's client is not shared
    across a fork), and stdout/stderr are the process's own descriptors (the workers' output
    is copied through them)."""
    try:
        real = sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False
    return real and all(where.local_dir is not None for where, _ in roots)


def _policy_source(
    resolver: SettingsResolver,
    config: DaemonConfig,
    where: Root,
    overrides: Mapping[str, Any],
    problems: ProblemLog,
    log: Any,
) -> Callable[[], Policy]:
    root = where.path

    def policy() -> Policy:
        resolved = resolver.resolve(config, where, overrides)
        current = {
            (str(root), p): {"event": "config_problem", "reason": p} for p in resolved.problems
        }
        problems.report(f"config:{root}", current, log)
        return resolved.settings.policy

    return policy
