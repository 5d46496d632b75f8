"""Helpers of the NeMo-RL compatible manager (`ckptkeeper.manager`) that need no manager state.

Config access for dict *or* attribute-style (pydantic / plain object) configs, tensor and array
conversion by duck typing (neither torch nor numpy is imported), the ``config.yaml`` payload, the
optimizer discovery of ``get_resume_paths``, and the locked finalize/prune steps on a root.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .effects import RootLock, fsync_dir, move_to_trash
from .execute import Outcome, apply_plan
from .plan import Action, Plan, plan
from .policy import Policy
from .records import RootScan
from .removal import remove_tree
from .scan import scan_root

__all__ = [
    "REQUIRED",
    "config_value",
    "finalize_complete_saves",
    "load_megatron_common_state_dict",
    "plain_training_info",
    "prune",
    "remove_trashed",
    "resume_paths",
    "run_config_data",
    "swap_in",
]

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


# -- locked steps on a root (ckptkeeper's effects; the caller decides when) ----------------------


def remove_trashed(items: Iterable[Outcome | Path | None]) -> None:
    """Remove what was moved into trash (outside the root lock); warn about what could not go."""
    left: list[str] = []
    for item in items:
        path = item.trash_path if isinstance(item, Outcome) else item
        if path is not None:
            left.extend(f"{p} ({why})" for p, why in remove_tree(path).left)
    if left:
        warnings.warn(
            f"ckptkeeper could not remove {len(left)} trashed entries (the daemon or the next "
            f"sweep retries): {', '.join(left[:5])}",
            stacklevel=3,
        )


def swap_in(src: Path, target: Path) -> None:
    """Under the root lock: ``src`` (tmp_step_N) becomes ``target`` (step_N) by one rename; an
    existing ``target`` is first renamed to ``old_step_N``, which then goes through trash.

    A missing ``src`` is success when ``target`` exists (another actor finalized it first).
    """
    root = src.parent
    old = root / f"old_{target.name}"
    trashed: list[Path | None] = []
    with RootLock(root):
        if not os.path.lexists(src):
            if os.path.lexists(target):
                return
            raise FileNotFoundError(2, "checkpoint to finalize is gone", str(src))
        if os.path.lexists(old):  # leftover of an earlier, interrupted replace
            trashed.append(move_to_trash(root, old))
        if os.path.lexists(target):
            target.rename(old)
            src.rename(target)
            fsync_dir(root)
            trashed.append(move_to_trash(root, old))
        else:
            src.rename(target)
            fsync_dir(root)
    remove_trashed(trashed)


def prune(root: Path, policy: Policy, names: Callable[[], set[str]]) -> None:
    """Delete the steps ``plan`` deletes among ``names()`` (computed under the lock).

    Each DELETE is re-checked by `apply_plan` (same directory, not pinned since), renamed into
    trash under the lock and removed after it. Raises OSError when a delete failed.
    """
    with RootLock(root):
        current = names()
        scan = scan_root(root, marker=policy.complete_marker)
        steps = tuple(c for c in scan.steps if c.path.name in current)
        decided = plan(RootScan(root, steps=steps), policy, time.time())
        deletes = decided.by_action(Action.DELETE)
        for d in deletes:
            print(f"Removing checkpoint {d.path} (step {d.step})")
        outcomes = apply_plan(Plan(root, policy, decided.now, deletes))
    remove_trashed(outcomes)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        detail = "; ".join(f"{o.decision.path}: {o.detail}" for o in failed)
        raise OSError(f"could not delete {len(failed)} checkpoint(s): {detail}")


def finalize_complete_saves(root: Path, policy: Policy, timeout: float) -> None:
    """Finalize every complete ``tmp_step_N`` of ``root`` and resolve interrupted replaces
    (what the daemon's pass does first), waiting at most ``timeout`` s for the root lock."""
    try:
        scan = scan_root(root, marker=policy.complete_marker)
    except OSError:
        return  # no root yet
    if not scan.leftovers and not any(t.complete for t in scan.in_flight):
        return
    lock = RootLock(root, timeout=timeout)
    if not lock.acquire():
        warnings.warn(
            f"ckptkeeper: {root} stayed locked for {timeout:g}s; complete tmp_step_N saves "
            "there were not finalized and are not considered by this lookup.",
            stacklevel=4,
        )
        return
    try:
        decided = plan(scan_root(root, marker=policy.complete_marker), policy, time.time())
        todo = decided.by_action(Action.FINALIZE, Action.REPLACE, Action.RESTORE, Action.DISCARD)
        outcomes = apply_plan(Plan(root, policy, decided.now, todo))
    finally:
        lock.release()
    remove_trashed(outcomes)
