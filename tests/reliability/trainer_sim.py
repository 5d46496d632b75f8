"""A simulated trainer for the reliability harness (run as a subprocess, or imported for helpers).

It saves checkpoints through `ckptkeeper.CheckpointManager` in daemon mode, exactly as a real
trainer would: ``init_tmp_checkpoint`` (training_info.json), then its own files, then
``finalize_checkpoint`` (the ``.complete`` marker only; the keeper renames and prunes).

With ``--manifest`` it records, OUTSIDE the root, what every save contains (relative path ->
size, sha256) and each step's metric. The manifest is replaced atomically twice per save: once
before the marker (``"marked": false``: the files are final, the marker may or may not be
written yet) and once right after it (``"marked": true``). A checker that freezes the trainer
(SIGSTOP) therefore always knows the exact content of every save whose marker may exist.

Everything random derives from ``--seed``: metrics (`metric_for`) and file layout, so a failing
run reproduces. Exit code 0 and an empty stderr mean the trainer saw no exception.

    python tests/reliability/trainer_sim.py ROOT --steps 30 --seed 7 --manifest M --interval 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MARKER = ".complete"
# Files ckptkeeper itself may add to a save (not the trainer's): never compared with the manifest.
IGNORED_FILES = frozenset({MARKER, "KEEP", ".writer.lock"})
_SUBDIRS = ("policy/weights", "policy/optimizer", "generation", "")


# The policy the reliability harnesses keep their roots with (and `expected_kept` checks).
TOP_K, LATEST_N, HIGHER_IS_BETTER = 3, 2, False


def keeper_policy(stale_after: str) -> list[str]:
    """The ``ckptkeeper`` flags of that policy."""
    return [
        *("--keep-top-k", str(TOP_K), "--metric", "val_loss", "--lower-is-better"),
        *("--keep-latest-n", str(LATEST_N), "--stale-after", stale_after),
    ]


def metric_for(seed: int, step: int) -> float:
    """The metric the trainer reports at ``step`` (two decimals, so ties happen and are ranked)."""
    return round(random.Random(f"{seed}:metric:{step}").uniform(0.0, 1.0), 2)


def expected_kept(
    metrics: Mapping[int, float],
    *,
    top_k: int | None,
    higher_is_better: bool,
    latest_n: int | None = None,
    keep_latest: bool = True,
) -> set[int]:
    """The policy oracle, written independently of ckptkeeper.policy (DESIGN section 4):
    latest + latest-n + top-k by metric (ties: the higher step wins)."""
    order = sorted(metrics)
    kept: set[int] = set()
    if keep_latest and order:
        kept.add(order[-1])
    if latest_n:
        kept.update(order[-latest_n:])
    if top_k:
        sign = -1.0 if higher_is_better else 1.0
        ranked = sorted(order, key=lambda s: (sign * metrics[s], -s))
        kept.update(ranked[:top_k])
    return kept


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """(relative path -> path of every regular file, problems: symlinks/special files) below
    ``directory``, without following symlinks. ckptkeeper's own files are left out."""
    files: dict[str, Path] = {}
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        base = Path(dirpath)
        for name in [*dirnames, *filenames]:
            p = base / name
            if p.is_symlink():
                problems.append(f"symlink inside a checkpoint: {p}")
        for name in filenames:
            p = base / name
            rel = str(p.relative_to(directory))
            if rel in IGNORED_FILES or p.is_symlink():
                continue
            files[rel] = p
    return files, problems


def verify_against(directory: Path, expected: Mapping[str, Iterable[Any]]) -> list[str]:
    """Problems found comparing ``directory`` with a manifest entry's files (byte for byte)."""
    found, problems = tree_files(directory)
    want = {rel: tuple(v) for rel, v in expected.items()}
    for rel in sorted(set(want) - set(found)):
        problems.append(f"{directory.name}: missing file {rel}")
    for rel in sorted(set(found) - set(want)):
        problems.append(f"{directory.name}: unexpected file {rel}")
    for rel in sorted(set(want) & set(found)):
        size, digest = want[rel]
        path = found[rel]
        try:
            actual_size = path.stat().st_size
            actual = sha256_file(path) if actual_size == size else None
        except OSError as exc:
            problems.append(f"{directory.name}: cannot read {rel}: {exc}")
            continue
        if actual_size != size:
            problems.append(f"{directory.name}: {rel} has {actual_size} bytes, expected {size}")
        elif actual != digest:
            problems.append(f"{directory.name}: {rel} content differs from the manifest")
    return problems


def load_manifest(path: Path) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data: dict[str, Any] = json.load(fh)
    except FileNotFoundError:
        return {"steps": {}}
    return data


def _write_atomically(path: Path, doc: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(doc, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_files(directory: Path, rng: random.Random, args: argparse.Namespace) -> None:
    count = rng.randint(args.files_min, args.files_max)
    for i in range(count):
        sub = rng.choice(_SUBDIRS)
        target = directory / sub if sub else directory
        target.mkdir(parents=True, exist_ok=True)
        size = rng.randint(args.size_min, args.size_max)
        with open(target / f"shard_{i:03d}.bin", "wb") as fh:
            fh.write(rng.randbytes(size))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--steps", type=int, default=30, help="checkpoints to save")
    parser.add_argument("--stride", type=int, default=10, help="training steps between saves")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metric", default="val_loss")
    parser.add_argument("--manifest", type=Path, default=None)
    parser.add_argument("--files-min", type=int, default=2)
    parser.add_argument("--files-max", type=int, default=6)
    parser.add_argument("--size-min", type=int, default=1)
    parser.add_argument("--size-max", type=int, default=256 * 1024)
    parser.add_argument("--interval", type=float, default=0.0, help="simulated compute per save")
    parser.add_argument(
        "--lookup-every",
        type=int,
        default=0,
        help="every N saves, call get_latest_checkpoint_path() (the resume lookup, which "
        "finalizes complete saves itself under the root lock)",
    )
    args = parser.parse_args(argv)

    from ckptkeeper import CheckpointManager

    manager = CheckpointManager(
        {
            "enabled": True,
            "checkpoint_dir": str(args.root),
            "metric_name": args.metric,
            "higher_is_better": False,
            "save_period": args.stride,
            "keep_top_k": None,
            "retention": "daemon",
        }
    )
    manifest: dict[str, Any] = {
        "seed": args.seed,
        "metric": args.metric,
        "stride": args.stride,
        "planned": args.steps,
        "steps": {},
    }
    lookups = 0
    for i in range(1, args.steps + 1):
        step = i * args.stride
        info = {"step": step, args.metric: metric_for(args.seed, step)}
        path = manager.init_tmp_checkpoint(step, info)
        _write_files(path, random.Random(f"{args.seed}:files:{step}"), args)
        if args.manifest is not None:
            files, _ = tree_files(path)
            entry = {
                "metric": info[args.metric],
                "marked": False,
                "files": {rel: [p.stat().st_size, sha256_file(p)] for rel, p in files.items()},
            }
            manifest["steps"][str(step)] = entry
            _write_atomically(args.manifest, manifest)
        manager.finalize_checkpoint(path)
        if args.manifest is not None:
            manifest["steps"][str(step)]["marked"] = True
            _write_atomically(args.manifest, manifest)
        if args.lookup_every and i % args.lookup_every == 0:
            latest = manager.get_latest_checkpoint_path()
            lookups += 1
            if latest is None:
                raise AssertionError(f"resume lookup found no checkpoint after saving step {step}")
        if args.interval > 0:
            time.sleep(args.interval)  # the "training" between two saves
    manager.shutdown()
    print(f"trainer_sim: done steps={args.steps} lookups={lookups}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
