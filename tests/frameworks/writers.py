"""The real frameworks' checkpoint writers, run as ``python -m tests.frameworks.writers WHAT ROOT``
in a subprocess (their imports and threads stay out of the test process). Each prints one JSON
line with what the test needs to check."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def dcp_save(root: Path, steps: list[int], interrupted: int | None) -> dict[str, Any]:
    """``step-N/`` as torchtitan saves them with ``torch.distributed.checkpoint``; the save of
    ``interrupted`` stops before DCP writes ``.metadata`` (its last file)."""
    import torch
    import torch.distributed.checkpoint as dcp

    class Interrupted(Exception):
        pass

    class DiesBeforeMetadata(dcp.FileSystemWriter):
        def finish(self, metadata: Any, results: Any) -> None:
            raise Interrupted("killed before .metadata")

    for step in steps:
        state = {"model": {"w": torch.full((4,), float(step))}}
        dcp.save(state, checkpoint_id=str(root / f"step-{step}"))
    if interrupted is not None:
        path = root / f"step-{interrupted}"
        try:
            dcp.save({"model": {"w": torch.zeros(4)}}, storage_writer=DiesBeforeMetadata(path))
        except BaseException as exc:  # DCP wraps it in a CheckpointException (a BaseException)
            text = "".join(traceback.format_exception(exc)) + str(exc)
            if "killed before .metadata" not in text:
                raise
    return {"written": sorted(os.listdir(root))}


def dcp_load(root: Path, step: int) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.zeros(4)}}
    dcp.load(state, checkpoint_id=str(root / f"step-{step}"))
    return {"w": state["model"]["w"].tolist()}


def lightning_fit(root: Path, save_last: str) -> dict[str, Any]:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: Any, _: int) -> Any:
            x, y = batch
            return ((self.layer(x) - y) ** 2).mean()

        def validation_step(self, batch: Any, _: int) -> None:
            x, y = batch
            self.log("val_loss", ((self.layer(x) - y) ** 2).mean())

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 2), torch.randn(16, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    checkpoint = ModelCheckpoint(
        dirpath=root,
        save_top_k=-1,
        every_n_train_steps=2,
        filename="{epoch}-{step}-{val_loss:.4f}",
        save_last="link" if save_last == "link" else True,
    )
    trainer = L.Trainer(
        max_steps=12,
        callbacks=[checkpoint],
        val_check_interval=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    trainer.fit(Tiny(), loader, loader)
    return {"written": sorted(os.listdir(root))}


def hf_train(root: Path, max_steps: int, resume: bool) -> dict[str, Any]:
    """transformers' Trainer on a tiny randomly initialised GPT-2 built from a config."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(1)
    data = [
        {
            "input_ids": torch.randint(0, 32, (8,), generator=gen),
            "labels": torch.randint(0, 32, (8,), generator=gen),
        }
        for _ in range(64)
    ]
    args = TrainingArguments(
        output_dir=str(root),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        logging_steps=2,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to=[],
        use_cpu=True,
        learning_rate=0.05,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
    trainer.train(resume_from_checkpoint=True if resume else None)
    return {"global_step": trainer.state.global_step, "written": sorted(os.listdir(root))}


def orbax_save(root: Path, losses: dict[str, float], crash_at: int | None) -> dict[str, Any]:
    """Orbax's CheckpointManager saving steps with metrics; ``crash_at``: the process dies while
    that step is still in its temporary directory."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    # Orbax writes the metrics item only when it tracks the best (best_fn): as users who pass
    # metrics= do. max_to_keep None: Orbax itself deletes nothing, the keeper does.
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    manager = ocp.CheckpointManager(root, options=options)
    for step, loss in sorted((int(k), v) for k, v in losses.items()):
        args = ocp.args.StandardSave({"w": jnp.full((4,), float(step))})
        manager.save(step, args=args, metrics={"loss": loss})
    manager.wait_until_finished()
    if crash_at is not None:
        args = ocp.args.StandardSave({"w": jnp.zeros(1 << 20)})
        manager.save(crash_at, args=args, metrics={"loss": 0.0})
        print(json.dumps({"written": sorted(os.listdir(root))}), flush=True)
        os._exit(0)  # dies before the async commit renames the temporary
    manager.close()
    return {"written": sorted(os.listdir(root))}


def orbax_restore(root: Path) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(root)
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    return {"step": step, "w": [float(x) for x in restored["w"]]}


def _deepspeed_engine() -> Any:
    """A DeepSpeed engine on CPU in a one-process group (a free port for its rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    config = {
        "train_batch_size": 1,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "zero_optimization": {"stage": 0},
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    return engine


def deepspeed_save(root: Path, steps: int, unfinished: bool) -> dict[str, Any]:
    """``engine.save_checkpoint`` after each step (tags global_stepN, ``latest`` written last);
    ``unfinished``: one more tag saved without updating ``latest``, as a save that died before
    it (DeepSpeed's own ``save_latest=False``)."""
    import torch

    engine = _deepspeed_engine()
    for _ in range(steps):
        loss = engine(torch.randn(1, 4)).sum()
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint(str(root), client_state={"step": engine.global_steps})
    if unfinished:
        tag = f"global_step{engine.global_steps + 1}"
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    return {"written": sorted(os.listdir(root))}


def deepspeed_load(root: Path) -> dict[str, Any]:
    engine = _deepspeed_engine()
    path, client = engine.load_checkpoint(str(root))
    return {"tag": Path(path).parent.name, "step": client["step"]}


def _s3(root: Path) -> tuple[str, dict[str, Any]]:
    """An ``s3://`` root as `main` got it (a Path: ``s3:/bucket/prefix``), and the fsspec options
    of the endpoint the environment names (the loopback S3 server of the tests)."""
    url = str(root).replace("s3:/", "s3://", 1)
    region = os.environ.get("AWS_REGION", "us-east-1")
    return url, {
        "client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "region_name": region}
    }


def dcp_save_s3(root: Path, steps: list[int], interrupted: int | None) -> dict[str, Any]:
    """`dcp_save` to an ``s3://`` root through DCP's own `FsspecWriter` (s3fs): ``.metadata``
    is written last (as ``.metadata.tmp``, then copied to its name)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    url, options = _s3(root)

    class DiesBeforeMetadata(FsspecWriter):
        def finish(self, metadata: Any, results: Any) -> None:
            raise RuntimeError("killed before .metadata")

    for step in steps:
        state = {"model": {"w": torch.full((4,), float(step))}}
        dcp.save(state, storage_writer=FsspecWriter(f"{url}/step-{step}", **options))
    if interrupted is not None:
        writer = DiesBeforeMetadata(f"{url}/step-{interrupted}", **options)
        try:
            dcp.save({"model": {"w": torch.zeros(4)}}, storage_writer=writer)
        except BaseException as exc:  # DCP wraps it in a CheckpointException (a BaseException)
            text = "".join(traceback.format_exception(exc)) + str(exc)
            if "killed before .metadata" not in text:
                raise
    return {"saved": steps}


def dcp_load_s3(root: Path, step: int) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    url, options = _s3(root)
    state = {"model": {"w": torch.zeros(4)}}
    dcp.load(state, storage_reader=FsspecReader(f"{url}/step-{step}", **options))
    return {"w": state["model"]["w"].tolist()}


def main(argv: list[str]) -> None:
    what, root, rest = argv[0], Path(argv[1]), [json.loads(a) for a in argv[2:]]
    result = globals()[what](root, *rest)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
