"""Drop-in for NeMo-RL's ``nemo_rl.utils.checkpoint``, built on ckptkeeper's planner and effects.

Behaviour follows NeMo-RL's newest dict-config manager (tmp_step_N -> step_N, top-k retention with
the latest kept, ``ft_keep_latest_k`` union, async finalization), with these deliberate changes:

- Every mutation of a root happens under ``.ckptkeeper/lock`` and every delete goes through
  ``.ckptkeeper/trash/`` (no half-deleted ``step_N`` is ever visible), so the manager, the daemon
  and a cron sweep can share a root.
- The completion marker (``.complete``) is written into ``tmp_step_N`` before any rename, so the
  daemon can always finish a replace that crashed half-way.
- ``retention="daemon"``: ``finalize_checkpoint`` only writes the marker; the daemon renames and
  prunes. ``get_latest_checkpoint_path``/``get_best_checkpoint_path`` finalize complete saves first.

Importing this module imports neither torch nor numpy.
"""

from __future__ import annotations

import glob
import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NotRequired

import yaml
from typing_extensions import TypedDict

from . import _nemo_compat as compat
from ._nemo_compat import PathLike
from .effects import RootLock, move_to_trash, write_marker
from .layouts.nemo_rl import NEMO_RL
from .names import Kind
from .policy import Policy
from .scan import INFO_FILE

__all__ = ["CheckpointManager", "CheckpointingConfig", "PathLike", "PretrainedCheckpointConfig"]

_RETENTION_MODES = ("inline", "daemon")


class PretrainedCheckpointConfig(TypedDict):
    path: str
    format: Literal["megatron_bridge", "megatron_lm"]


class CheckpointingConfig(TypedDict):
    """NeMo-RL's checkpointing config (typing_extensions.TypedDict: pydantic accepts it on 3.11).

    ckptkeeper adds ``retention`` ("inline" | "daemon") and ``complete_marker``.
    """

    enabled: bool
    checkpoint_dir: PathLike
    metric_name: str | None
    higher_is_better: bool
    save_period: int
    keep_top_k: NotRequired[int | None]
    ft_keep_latest_k: NotRequired[int | None]
    ft_save_period: NotRequired[int | None]
    checkpoint_must_save_by: NotRequired[str | None]
    pretrained_checkpoint: NotRequired[PretrainedCheckpointConfig | None]
    save_optimizer: NotRequired[bool]
    model_save_format: NotRequired[str]
    save_consolidated: NotRequired[bool]
    model_cache_dir: NotRequired[str]
    model_repo_id: NotRequired[str]
    is_peft: NotRequired[bool]
    peft_config: NotRequired[Any]
    is_async: NotRequired[bool]
    retention: NotRequired[Literal["inline", "daemon"]]
    complete_marker: NotRequired[str]


def _step_paths(checkpoint_dir: PathLike) -> list[tuple[int, str]]:
    """(step, path) of every entry named exactly ``step_<ASCII digits>``, in glob order."""
    pattern = str(Path(glob.escape(os.fspath(checkpoint_dir))) / NEMO_RL.glob(Kind.STEP))
    found: list[tuple[int, str]] = []
    for path in glob.glob(pattern):
        parsed = NEMO_RL.parse(Path(path).name)
        if parsed is not None and parsed.kind is Kind.STEP:
            found.append((parsed.step, path))
    return found


def _history_paths(checkpoint_dir: PathLike) -> list[tuple[int, str]]:
    return [(s, p) for s, p in _step_paths(checkpoint_dir) if (Path(p) / INFO_FILE).exists()]


def _load_checkpoint_history(
    checkpoint_dir: PathLike,
) -> list[tuple[int, PathLike, dict[str, Any]]]:
    """(step, path, training_info) of every ``step_N`` holding a training_info.json, in glob order.

    Unlike NeMo-RL, a training_info.json that is not a readable JSON object leaves its checkpoint
    out instead of raising. A missing ``checkpoint_dir`` gives ``[]``.
    """
    return compat.checkpoint_history(_history_paths(checkpoint_dir))


def _load_megatron_common_state_dict(iteration_dir: Path) -> Any:
    """Megatron-Core's common state dict of a distributed checkpoint iteration directory.

    Imports Megatron-Core lazily; without it a ``common.pt`` is read with ``torch.load`` when torch
    is importable, otherwise ``RuntimeError("Megatron-Core is required ...")``.
    """
    return compat.load_megatron_common_state_dict(iteration_dir)


def _tmp_dir(checkpoint_path: PathLike) -> Path:
    path = Path(checkpoint_path)
    parsed = NEMO_RL.parse(path.name)
    if parsed is None or parsed.kind is not Kind.TMP:
        raise ValueError(f"not a save directory ({NEMO_RL.glob(Kind.TMP)}): {path}")
    return path


class CheckpointManager:
    """NeMo-RL's checkpoint manager: ``tmp_step_N`` while saving, ``step_N`` once finalized.

    ``config`` is a dict (``CheckpointingConfig``) or any object with the same attributes
    (NeMo-RL's pydantic config). Required: ``checkpoint_dir``, ``metric_name``,
    ``higher_is_better``. Defaults: ``keep_top_k=None``, ``save_period=1``,
    ``ft_keep_latest_k=None``, ``save_optimizer=True``, ``retention="inline"``,
    ``complete_marker=".complete"``.
    """

    #: daemon mode: how long a lookup waits for the root lock before skipping finalization.
    resume_lock_timeout: float = 30.0

    def __init__(self, config: CheckpointingConfig | Any) -> None:
        get = compat.config_value
        self.checkpoint_dir = Path(get(config, "checkpoint_dir"))
        self.metric_name: str | None = get(config, "metric_name")
        self.higher_is_better: bool = get(config, "higher_is_better")
        self.keep_top_k: int | None = get(config, "keep_top_k", None)
        self.save_period: int = get(config, "save_period", 1)
        self.ft_keep_latest_k: int | None = get(config, "ft_keep_latest_k", None)
        self.save_optimizer: bool = get(config, "save_optimizer", True)
        self.model_save_format: str = get(config, "model_save_format", "safetensors")
        self.save_consolidated: bool = get(config, "save_consolidated", False)
        self.model_cache_dir: str = get(config, "model_cache_dir", "")
        self.model_repo_id: str = get(config, "model_repo_id", "")
        self.is_peft: bool = get(config, "is_peft", False)
        self.peft_config: Any = get(config, "peft_config", None)
        self.is_async: bool = get(config, "is_async", False)
        retention = get(config, "retention", None) or "inline"
        if retention not in _RETENTION_MODES:
            raise ValueError(
                "checkpointing config key 'retention': expected 'inline' or 'daemon', "
                f"got {retention!r}"
            )
        self.retention: str = retention
        self.complete_marker: str = get(config, "complete_marker", None) or NEMO_RL.default_marker
        self._policy(exclude_latest=True)  # validate now: ValueError naming the key
        self._finalize_thread: threading.Thread | None = None
        self._pending_checkpoint_path: Path | None = None
        self._finalize_error: BaseException | None = None
        self._delete_executor = ThreadPoolExecutor(max_workers=1)

    # -- saving -----------------------------------------------------------------------------

    def init_tmp_checkpoint(
        self, step: int, training_info: Mapping[str, Any], run_config: Any = None
    ) -> Path:
        """Create ``tmp_step_{step}`` with training_info.json (and config.yaml); returns its path.

        A leftover ``tmp_step_{step}`` is removed first (through trash, under the root lock).
        Tensor/array values (anything with ``.item()``) are converted on a copy.
        """
        save_dir = self.checkpoint_dir / NEMO_RL.format(Kind.TMP, step)
        if os.path.lexists(save_dir):
            started = time.monotonic()
            with RootLock(self.checkpoint_dir):
                trashed = move_to_trash(self.checkpoint_dir, save_dir)
            compat.remove_trashed([trashed])
            print(f"Removed stale {save_dir.name} in {time.monotonic() - started:.2f}s")
        save_dir.mkdir(parents=True, exist_ok=True)
        with open(save_dir / INFO_FILE, "w") as fh:
            json.dump(compat.plain_training_info(training_info), fh)
        if run_config is not None:
            with open(save_dir / NEMO_RL.config_file, "w") as fh:
                yaml.safe_dump(compat.run_config_data(run_config), fh)
        return Path(os.path.abspath(save_dir))

    def finalize_checkpoint(self, checkpoint_path: PathLike) -> None:
        """Inline: marker, ``tmp_step_N -> step_N``, then prune. Daemon: only the marker."""
        if self.retention == "daemon":
            write_marker(_tmp_dir(checkpoint_path), self.complete_marker)
            return
        self._rename_checkpoint(checkpoint_path)
        self.remove_old_checkpoints()

    def _rename_checkpoint(self, checkpoint_path: PathLike) -> None:
        """``tmp_step_N -> step_N``; an existing ``step_N`` is replaced through ``old_step_N``.

        The marker is written first, so a crash between the renames leaves a state the daemon
        finishes (DESIGN section 2). Renames happen under the root lock; the replaced copy is
        removed through trash afterwards. A missing ``tmp_step_N`` raises FileNotFoundError unless
        another actor (the daemon) already finalized it.
        """
        src = _tmp_dir(checkpoint_path)
        write_marker(src, self.complete_marker)
        parsed = NEMO_RL.parse(src.name)
        assert parsed is not None  # _tmp_dir checked it
        compat.finalize_save(src, parsed.step, self._policy(exclude_latest=True))

    # -- retention --------------------------------------------------------------------------

    def _policy(self, exclude_latest: bool) -> Policy:
        """NeMo-RL's retention settings as a `Policy` (raises ValueError naming a key).

        keep_top_k None with ft_keep_latest_k set protects every periodic step in NeMo-RL:
        that is ``keep_every_n_steps=save_period``. An empty metric name ranks by recency,
        as NeMo-RL does when no checkpoint has the metric.
        """
        period = 1 if self.save_period is None else self.save_period
        every = period if self.keep_top_k is None and self.ft_keep_latest_k is not None else None
        metric = self.metric_name if isinstance(self.metric_name, str) else None
        return Policy(
            keep_top_k=self.keep_top_k,
            metric_name=metric or None,
            higher_is_better=bool(self.higher_is_better),
            save_period=period,
            keep_latest=exclude_latest,
            keep_latest_n=self.ft_keep_latest_k,
            keep_every_n_steps=every,
            complete_marker=self.complete_marker,
        )

    def remove_old_checkpoints(self, exclude_latest: bool = True) -> None:
        """Delete the ``step_N`` that NeMo-RL would delete, as decided by `ckptkeeper.plan`.

        Kept: the latest (``exclude_latest``), the ``keep_top_k`` best of the ``save_period``
        steps (all of them when keep_top_k is None), the ``ft_keep_latest_k`` most recent, and
        ckptkeeper pins (``KEEP`` file). With keep_top_k and ft_keep_latest_k both None nothing
        is deleted. Only ``step_N`` (strict name) holding a training_info.json take part. Missing
        metrics rank below every real value, ties go to the higher step (as in NeMo-RL); NaN,
        inf, strings and bools also rank last, where NeMo-RL would crash or mis-sort.
        Deletion: rename into ``.ckptkeeper/trash/`` under the root lock (each step re-checked
        first), then removal outside it.
        """
        policy = self._policy(exclude_latest)
        root = self.checkpoint_dir
        if not policy.bounded or not _history_paths(root):
            return
        compat.prune(root, policy, lambda: {Path(p).name for _, p in _history_paths(root)})

    # -- lookups ----------------------------------------------------------------------------

    def _finalize_complete_saves(self) -> None:
        """Daemon mode: finalize complete ``tmp_step_N`` (and resolve interrupted replaces)."""
        policy = self._policy(exclude_latest=True)
        compat.finalize_complete_saves(self.checkpoint_dir, policy, self.resume_lock_timeout)

    def get_best_checkpoint_path(self) -> str | None:
        """Path of the best checkpoint by ``metric_name`` (ties: the higher step), or None.

        Checkpoints without the metric are ignored with a warning; with none left, the latest is
        returned (second warning). Non-numeric, NaN and inf values rank after every number.
        """
        if self.retention == "daemon":
            self._finalize_complete_saves()
        history = _load_checkpoint_history(self.checkpoint_dir)
        if not history:
            return None
        best = compat.best_path(history, self.metric_name, self.higher_is_better)
        return best if best is not None else self._latest_path()

    def get_latest_checkpoint_path(self) -> str | None:
        """Path of the highest ``step_N`` (strict name; ``step_1-hf`` is ignored), or None."""
        if self.retention == "daemon":
            self._finalize_complete_saves()
        return self._latest_path()

    def _latest_path(self) -> str | None:
        steps = _step_paths(self.checkpoint_dir)
        return str(max(steps)[1]) if steps else None

    def load_training_info(self, checkpoint_path: PathLike | None = None) -> dict[str, Any] | None:
        if checkpoint_path is None:
            return None
        with open(Path(checkpoint_path) / INFO_FILE) as fh:
            data: dict[str, Any] = json.load(fh)
        return data

    @staticmethod
    def get_resume_paths(
        last_checkpoint_path: PathLike | None, *, model_component: str = "policy"
    ) -> tuple[Path | None, Path | None]:
        """(weights, optimizer) to resume ``model_component`` from; optimizer None if not saved."""
        # Looked up at call time: tests (and users) monkeypatch the module-level loader.
        loader: Callable[[Path], Any] = _load_megatron_common_state_dict
        return compat.resume_paths(last_checkpoint_path, model_component, loader)

    # -- async finalization -----------------------------------------------------------------

    def begin_finalization(
        self, checkpoint_path: PathLike, wait_fn: Callable[[], Any] | None = None
    ) -> None:
        """Finalize in a background thread after ``wait_fn`` (e.g. waiting for async writes).

        Blocks on (and re-raises) an earlier pending finalization first. Inline mode prunes on a
        one-worker executor afterwards; daemon mode only writes the marker.
        """
        self.finalize_pending()
        path = Path(checkpoint_path)
        self._pending_checkpoint_path = path
        self._finalize_error = None
        thread = threading.Thread(
            target=self._finalize_in_background,
            args=(path, wait_fn),
            name="ckptkeeper-finalize",
            daemon=True,
        )
        self._finalize_thread = thread
        thread.start()

    def _finalize_in_background(self, path: Path, wait_fn: Callable[[], Any] | None) -> None:
        try:
            if wait_fn is not None:
                wait_fn()
            if self.retention == "daemon":
                write_marker(_tmp_dir(path), self.complete_marker)
                return
            self._rename_checkpoint(path)
            future = self._delete_executor.submit(self.remove_old_checkpoints)
            future.add_done_callback(self._warn_on_delete_failure)
        except BaseException as exc:  # re-raised by finalize_pending
            self._finalize_error = exc

    def finalize_pending(self) -> None:
        """Wait for the background finalization; raise RuntimeError if it failed. Idempotent."""
        thread = self._finalize_thread
        if thread is not None:
            thread.join()
            self._finalize_thread = None
        self._pending_checkpoint_path = None
        error, self._finalize_error = self._finalize_error, None
        if error is not None:
            raise RuntimeError("Background checkpoint finalization failed") from error

    @property
    def has_pending_finalization(self) -> bool:
        """True from `begin_finalization` until `finalize_pending`/`shutdown` collects it."""
        return self._pending_checkpoint_path is not None

    def shutdown(self) -> None:
        """Finish pending finalization and deletions; the manager stays usable. Idempotent."""
        try:
            self.finalize_pending()
        finally:
            self._delete_executor.shutdown(wait=True)
            self._delete_executor = ThreadPoolExecutor(max_workers=1)

    @staticmethod
    def _warn_on_delete_failure(future: Future[Any]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            warnings.warn(
                f"Failed to prune old checkpoints in the background: {exc!r}. Training is "
                "unaffected, but stale checkpoints may remain on disk.",
                stacklevel=2,
            )

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        if exc_type is None:
            self.shutdown()
            return False
        try:
            self.shutdown()
        except Exception:
            warnings.warn(
                "Checkpoint finalization failed while handling an exception; the original "
                "exception will be re-raised.",
                stacklevel=2,
            )
        return False
