"""Helpers of the NeMo-RL compatible manager (`ckptkeeper.manager`) that need no manager state.

Config access for dict *or* attribute-style (pydantic / plain object) configs, tensor and array
conversion by duck typing (neither torch nor numpy is imported), the ``config.yaml`` payload, the
optimizer discovery of ``get_resume_paths``, and the locked finalize/prune steps on a root.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeAlias

import yaml

from .execute import Outcome
from .names import step_name
from .passes import RECOVERY, locked_pass, one_save, recovery_needed
from .plan import Action
from .policy import Policy, metric_value
from .records import RootScan
from .removal import Removal, remove_tree
from .scan import read_training_info, scan_root

__all__ = [
    "REQUIRED",
    "PathLike",
    "best_path",
    "checkpoint_history",
    "config_value",
    "finalize_complete_saves",
    "finalize_save",
    "load_megatron_common_state_dict",
    "plain_training_info",
    "prune",
    "remove_trashed",
    "resume_paths",
    "run_config_data",
]

PathLike: TypeAlias = str | os.PathLike[Any]

REQUIRED: Any = object()

# Values that are already JSON-friendly Python scalars; never converted even if they grow .item().
_PLAIN_SCALARS = (str, bytes, bytearray, bool, int, float, complex, type(None))


def config_value(config: Any, key: str, default: Any = REQUIRED) -> Any:
    """``config[key]`` for a Mapping, ``config.key`` otherwise; ``default`` when absent.

    A missing required key raises ``KeyError`` (Mapping) or ``AttributeError`` (object), as the
    NeMo-RL manager does for ``config["checkpoint_dir"]`` / ``config.checkpoint_dir``.
    """
    if isinstance(config, Mapping):
        if default is REQUIRED:
            return config[key]
        return config.get(key, default)
    if default is REQUIRED:
        return getattr(config, key)
    return getattr(config, key, default)


def plain_training_info(training_info: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy with tensor/array values replaced by ``value.item()`` (top level only).

    Anything with a callable ``item`` that is not a plain Python scalar counts (torch tensors,
    numpy arrays and numpy scalars, jax arrays), so neither library has to be imported. The
    caller's mapping is not modified.
    """
    out: dict[str, Any] = {}
    for key, value in dict(training_info).items():
        if not isinstance(value, _PLAIN_SCALARS) and not isinstance(value, type):
            item = getattr(value, "item", None)
            if callable(item):
                value = item()
        out[key] = value
    return out


def run_config_data(run_config: Any) -> Any:
    """What goes into ``config.yaml``: ``model_dump(mode="json")`` when available, else a dict."""
    dump = getattr(run_config, "model_dump", None)
    if callable(dump):
        try:
            return dump(mode="json")
        except TypeError:  # a model_dump() without the mode keyword
            return dump()
    if isinstance(run_config, Mapping):
        return dict(run_config)
    return run_config  # yaml.safe_dump decides (and raises for unsupported objects)


_MEGATRON_MISSING = (
    "Megatron-Core is required to inspect optimizer state in the distributed checkpoint at "
    "{dir}. Install NeMo-RL with the `mcore` extra."
)


def load_megatron_common_state_dict(iteration_dir: Path) -> Any:
    """Megatron's common state dict of ``iteration_dir`` (lazy imports only).

    Uses ``megatron.core.dist_checkpointing.load_common_state_dict``; without Megatron-Core, a
    ``common.pt`` is read with ``torch.load(map_location="cpu")`` when torch is importable.
    Otherwise raises ``RuntimeError`` (Megatron-Core is required ...).
    """
    try:
        from megatron.core.dist_checkpointing import (
            load_common_state_dict,
        )
    except ImportError:
        common = Path(iteration_dir) / "common.pt"
        if common.exists():
            try:
                import torch
            except ImportError:
                pass
            else:
                return torch.load(common, map_location="cpu")
        raise RuntimeError(_MEGATRON_MISSING.format(dir=iteration_dir)) from None
    return load_common_state_dict(str(iteration_dir))


def _run_config_saves_optimizer(iteration_dir: Path) -> bool:
    run_config = iteration_dir / "run_config.yaml"
    if not run_config.exists():
        return False
    with open(run_config) as fh:
        data = yaml.safe_load(fh) or {}
    checkpoint = data.get("checkpoint") if isinstance(data, dict) else None
    return isinstance(checkpoint, dict) and checkpoint.get("save_optim") is True


def resume_paths(
    last_checkpoint_path: Any,
    model_component: str,
    loader: Callable[[Path], Any],
) -> tuple[Path | None, Path | None]:
    """(weights, optimizer) of ``<checkpoint>/<model_component>``; optimizer None when absent.

    Order: a DTensor ``optimizer`` directory wins (Megatron is not touched); then Megatron's common
    state (``loader(iter_0000000)``, errors propagate) holding an ``optimizer`` key; then a
    ``run_config.yaml`` with ``checkpoint.save_optim: true``; otherwise a UserWarning.
    """
    if not last_checkpoint_path:
        return None, None
    component = Path(last_checkpoint_path) / model_component
    weights, optimizer = component / "weights", component / "optimizer"
    if optimizer.exists():
        return weights, optimizer
    iteration_dir = weights / "iter_0000000"
    if (iteration_dir / "common.pt").exists() or (iteration_dir / "metadata.json").exists():
        state = loader(iteration_dir)
        if state is not None and "optimizer" in state:
            return weights, optimizer
    if _run_config_saves_optimizer(iteration_dir):
        return weights, optimizer
    warnings.warn(
        f"Optimizer state not found at {optimizer} (DTensor path), and no embedded optimizer "
        f"state detected under {weights} (Megatron path). Optimizer will be freshly initialized.",
        stacklevel=3,
    )
    return weights, None


# -- the checkpoint history (step_N holding a training_info.json) -----------------------------


def checkpoint_history(
    paths: Iterable[tuple[int, str]],
) -> list[tuple[int, PathLike, dict[str, Any]]]:
    """(step, path, training_info) of the ``step_N`` at ``paths`` whose training_info.json is a
    readable JSON object (the others are left out), in the order given."""
    history: list[tuple[int, PathLike, dict[str, Any]]] = []
    for step, path in paths:
        info, _ = read_training_info(Path(path))
        if info is not None:
            history.append((step, path, dict(info)))
    return history


def best_path(
    history: list[tuple[int, PathLike, dict[str, Any]]], metric: Any, higher_is_better: bool
) -> str | None:
    """The best of ``history`` by ``metric`` (ties: the higher step), warning about checkpoints
    without it; None (a second warning) when none has it. Non-numeric, NaN and inf values rank
    after every number. Warnings name the caller of the manager's method."""
    valid = [h for h in history if metric in h[2]]
    missing = [h[0] for h in history if metric not in h[2]]
    hint = "Consider enabling val_at_end or adjusting val_period to align with max_steps."
    if missing:
        warnings.warn(
            f"Ignoring {len(missing)} checkpoint(s) at step(s) {missing} that do not have "
            f"metric '{metric}'. {hint}",
            stacklevel=3,
        )
    if not valid:
        warnings.warn(
            f"No checkpoints contain metric '{metric}'. Returning latest checkpoint. {hint}",
            stacklevel=3,
        )
        return None
    sign = -1.0 if higher_is_better else 1.0

    def rank(entry: tuple[int, PathLike, dict[str, Any]]) -> tuple[int, float, int]:
        value = metric_value(entry[2], str(metric))
        if isinstance(value, str):
            return (1, 0.0, -entry[0])
        return (0, sign * value, -entry[0])

    return str(min(valid, key=rank)[1])


# -- passes on a root (ckptkeeper's one locked pass; the caller decides when) ----------------


class _Leftovers:
    """Collects what removal left behind; one warning after the pass (the daemon retries)."""

    def __init__(self) -> None:
        self.left: list[str] = []

    def __call__(self, _cause: object, removal: Removal, _ms: float = 0.0) -> None:
        self.left.extend(f"{p} ({why})" for p, why in removal.left)

    def warn(self) -> None:
        if self.left:
            warnings.warn(
                f"ckptkeeper could not remove {len(self.left)} trashed entries (the daemon or "
                f"the next sweep retries): {', '.join(self.left[:5])}",
                stacklevel=4,
            )


def remove_trashed(items: Iterable[Path | None]) -> None:
    """Remove entries this process moved into trash (outside the root lock); warn on leftovers."""
    leftovers = _Leftovers()
    for path in items:
        if path is not None:
            leftovers(None, remove_tree(path))
    leftovers.warn()


def finalize_save(src: Path, step: int, policy: Policy) -> None:
    """Inline finalize of ``src`` (tmp_step_N, its marker written): one locked pass limited to
    `RECOVERY` over step N, so it finalizes (or replaces, carrying a pin) exactly as the daemon
    would. Other complete saves in the root are left to their writer or the daemon.

    Raises FileNotFoundError when ``src`` is gone and no ``step_N`` exists (nobody finalized it),
    OSError when the pass failed or decided not to finalize it (the reason is in the message).
    """
    root = src.parent
    leftovers = _Leftovers()
    # This save only (other complete saves are not ours), from a partial scan of its step.
    select = one_save(src, step)
    result = locked_pass(
        root, policy, actions=RECOVERY, select=select, steps={step}, on_removed=leftovers
    )
    leftovers.warn()
    outcome = result.outcome_for(src)
    if outcome is not None and not outcome.ok:
        raise OSError(f"could not finalize {src}: {outcome.detail}")
    if os.path.lexists(src):
        decision = result.decision_for(src)
        why = outcome.detail if outcome is not None else ""
        why = why or "; ".join(decision.reasons if decision is not None else ())
        raise OSError(f"{src} was not finalized: {why or 'not complete'}")
    if not os.path.lexists(root / step_name(step)):
        raise FileNotFoundError(2, "checkpoint to finalize is gone", str(src))


def prune(root: Path, policy: Policy, names: Callable[[], set[str]]) -> None:
    """Delete the steps the planner deletes among ``names()`` (computed under the lock): one
    locked pass limited to DELETE over those steps only. Each deletion is re-checked by the
    executor (same directory, not pinned since), trashed under the lock, removed after it.
    Raises OSError when a delete failed."""

    def select(scan: RootScan) -> RootScan:
        current = names()
        return RootScan(root, steps=tuple(c for c in scan.steps if c.path.name in current))

    def announce(outcome: Outcome) -> None:
        d = outcome.decision
        if outcome.status == "done":
            print(f"Removing checkpoint {d.path} (step {d.step})")

    leftovers = _Leftovers()
    result = locked_pass(
        root,
        policy,
        actions={Action.DELETE},
        select=select,
        on_outcome=announce,
        on_removed=leftovers,
    )
    leftovers.warn()
    failed = [o for o in result.outcomes if o.status == "failed"]
    if failed:
        detail = "; ".join(f"{o.decision.path}: {o.detail}" for o in failed)
        raise OSError(f"could not delete {len(failed)} checkpoint(s): {detail}")


def finalize_complete_saves(root: Path, policy: Policy, timeout: float) -> None:
    """Finalize every complete ``tmp_step_N`` of ``root`` and resolve interrupted replaces (a
    pass limited to `RECOVERY`), waiting at most ``timeout`` s for the root lock."""
    try:
        scan = scan_root(root, marker=policy.complete_marker)
    except OSError:
        return  # no root yet
    if not recovery_needed(scan):
        return  # nothing to finalize: no lock taken
    leftovers = _Leftovers()
    result = locked_pass(root, policy, actions=RECOVERY, lock_timeout=timeout, on_removed=leftovers)
    leftovers.warn()
    if result.status == "busy":
        warnings.warn(
            f"ckptkeeper: {root} stayed locked for {timeout:g}s; complete saves "
            "there were not finalized and are not considered by this lookup.",
            stacklevel=4,
        )
