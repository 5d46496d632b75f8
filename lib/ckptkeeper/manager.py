"""Placeholder until the NeMo-RL compatible manager lands."""
from __future__ import annotations
import os
from typing import Any, TypedDict
PathLike = str | os.PathLike[str]
class CheckpointingConfig(TypedDict, total=False):
    enabled: bool
class CheckpointManager:
    def __init__(self, config: Any) -> None:
        raise NotImplementedError
def _load_checkpoint_history(checkpoint_dir: Any) -> list[Any]:
    raise NotImplementedError
