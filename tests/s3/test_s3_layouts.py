"""The layouts of DESIGN section 9 on ``s3://`` roots (moto on 127.0.0.1, real HTTP): their
hooks (commit signal inside the checkpoint, metrics, trackers, ``auto``) answered from the one
listing of a pass, small files read only when their ETag changed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.s3.helpers import keys_under
from tests.s3server import S3Endpoint

from ckptkeeper import Action, Policy
from ckptkeeper.names import Kind, ParsedName
from ckptkeeper.passes import locked_pass
from ckptkeeper.s3 import S3Storage
from ckptkeeper.stores import root_path


def _store(endpoint: S3Endpoint) -> S3Storage:
    return S3Storage(endpoint.client())


def _put(s3: Any, bucket: str, key: str, body: Any = b"x") -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    s3.put_object(Bucket=bucket, Key=key, Body=data)


def _dcp(s3: Any, bucket: str, root: str, step: int, *, committed: bool = True) -> None:
    """A DCP save as its FsspecWriter leaves it: the ranks' data files, ``.metadata`` last."""
    _put(s3, bucket, f"{root}/step-{step}/__0_0.distcp", b"tensor" * 10)
    if committed:
        _put(s3, bucket, f"{root}/step-{step}/.metadata", b"\x80\x04pickle")


def _names(s3: Any, bucket: str, root: str) -> set[str]:
    """The first names below ``root`` (ckptkeeper's own ``.ckptkeeper/`` left out)."""
    return {k.split("/")[1] for k in keys_under(s3, bucket, f"{root}/")} - {".ckptkeeper"}


def _actions(result: Any) -> list[tuple[Action, int | None]]:
    return sorted(
        ((o.decision.action, o.decision.step) for o in result.outcomes), key=lambda a: a[1] or 0
    )


def test_torchtitan_recency_retention_and_an_interrupted_save_kept_until_stale(
    endpoint: S3Endpoint, bucket: str, s3: Any
) -> None:
    """``.metadata`` is the commit signal (not the policy's ``.complete``): committed steps are
    ranked by recency, an interrupted save is collected only once stale, never a committed one."""
    for step in (10, 20, 30, 40):
        _dcp(s3, bucket, "r", step)
    _dcp(s3, bucket, "r", 50, committed=False)
    store, root = _store(endpoint), root_path(f"s3://{bucket}/r")
    fresh = Policy.from_mapping({"layout": "torchtitan", "keep_latest_n": 2})
    result = locked_pass(root, fresh, storage=store)
    assert _actions(result) == [(Action.DELETE, 10), (Action.DELETE, 20)]
    assert result.scan is not None and [c.step for c in result.scan.steps] == [10, 20, 30, 40]
    assert keys_under(s3, bucket, "r/step-50/"), "a fresh interrupted save is left alone"
    stale = Policy.from_mapping({"layout": "torchtitan", "keep_latest_n": 2, "stale_after": 0})
    result = locked_pass(root, stale, storage=store)
    assert _actions(result) == [(Action.COLLECT, 50)]
    assert not keys_under(s3, bucket, "r/step-10/") and not keys_under(s3, bucket, "r/step-50/")
    for step in (30, 40):
        assert f"r/step-{step}/.metadata" in keys_under(s3, bucket, f"r/step-{step}/")


@pytest.mark.parametrize(
    ("layout", "data", "commit"),
    [
        ("torchtitan", "__0_0.distcp", (".metadata",)),
        ("orbax", "default/array.zarr", ("commit_success.txt", "_CHECKPOINT_METADATA")),
    ],
)
def test_a_delete_removes_the_layouts_commit_files_first(
    endpoint: S3Endpoint, bucket: str, s3: Any, layout: str, data: str, commit: tuple[str, ...]
) -> None:
    """Tombstoned, the checkpoint stops being one at once: its commit files (DCP's ``.metadata``,
    both of orbax's) go before any data object, so no resume loads a half-deleted one."""
    name = "step-1" if layout == "torchtitan" else "1"
    for rel in (data, *commit):
        _put(s3, bucket, f"r/{name}/{rel}")
    store, root = _store(endpoint), root_path(f"s3://{bucket}/r")
    policy = Policy.from_mapping({"layout": layout})
    store.scan(root, layout=policy.scan_layout(), marker=policy.complete_marker)  # as a pass
    lock = store.lock(root, timeout=5)
    assert lock.acquire()
    try:
        assert store.trash(root, root / name) is not None
    finally:
        lock.release()
    assert keys_under(s3, bucket, f"r/{name}/") == {f"r/{name}/{data}"}  # commit files gone


def _orbax(s3: Any, bucket: str, step: int, *, commit: str | None, loss: float) -> None:
    _put(s3, bucket, f"o/{step}/default/array.zarr", b"z" * 8)
    _put(s3, bucket, f"o/{step}/metrics/metrics", {"loss": loss})
    if commit == "commit":
        _put(s3, bucket, f"o/{step}/commit_success.txt", b"Checkpoint commit was successful")
    elif commit == "metadata":
        _put(s3, bucket, f"o/{step}/_CHECKPOINT_METADATA", {"metrics": {"loss": loss}})


def test_orbax_commit_file_metrics_and_temporaries(
    endpoint: S3Endpoint, bucket: str, s3: Any
) -> None:
    """Orbax's commit file (or _CHECKPOINT_METADATA) makes a step complete, its metrics rank it;
    a step with neither is kept (never collected, even stale), a temporary is garbage once stale."""
    _orbax(s3, bucket, 1, commit="commit", loss=0.5)
    _orbax(s3, bucket, 2, commit="metadata", loss=0.9)
    _orbax(s3, bucket, 3, commit="commit", loss=0.1)
    _orbax(s3, bucket, 4, commit="commit", loss=0.7)
    _orbax(s3, bucket, 5, commit=None, loss=0.0)  # not committed: kept and reported
    _put(s3, bucket, "o/6.orbax-checkpoint-tmp-1700000000/default/array.zarr")
    store, root = _store(endpoint), root_path(f"s3://{bucket}/o")
    policy = Policy.from_mapping(
        {"layout": "orbax", "keep_top_k": 1, "metric_name": "loss", "stale_after": 0}
    )
    result = locked_pass(root, policy, storage=store)
    assert result.scan is not None
    assert {c.step: dict(c.info or {}) for c in result.scan.steps} == {
        1: {"loss": 0.5}, 2: {"loss": 0.9}, 3: {"loss": 0.1}, 4: {"loss": 0.7},
    }  # fmt: skip
    assert _actions(result) == [
        (Action.DELETE, 1),
        (Action.DELETE, 2),
        (Action.COLLECT, 6),
    ]  # fmt: skip  (3 is the best, 4 the latest)
    assert _names(s3, bucket, "o") == {"3", "4", "5"}


def _hf(s3: Any, bucket: str, step: int, loss: float, best: int | None) -> None:
    _put(s3, bucket, f"h/checkpoint-{step}/model.safetensors", b"w" * 16)
    state = {
        "global_step": step,
        "best_model_checkpoint": f"/out/checkpoint-{best}" if best else None,
        "log_history": [{"step": step, "eval_loss": loss}],
    }
    _put(s3, bucket, f"h/checkpoint-{step}/trainer_state.json", state)


def test_hf_trainer_metrics_and_best_pointer(endpoint: S3Endpoint, bucket: str, s3: Any) -> None:
    """trainer_state.json's log_history gives the metric; the newest checkpoint's
    best_model_checkpoint is never deleted; a checkpoint without trainer_state.json is kept."""
    _hf(s3, bucket, 100, 0.2, None)
    _hf(s3, bucket, 200, 0.5, 100)
    _hf(s3, bucket, 300, 0.3, 100)
    _hf(s3, bucket, 400, 0.4, 100)
    _put(s3, bucket, "h/checkpoint-500/model.safetensors")  # being written: no state yet
    store, root = _store(endpoint), root_path(f"s3://{bucket}/h")
    policy = Policy.from_mapping(
        {"layout": "hf-trainer", "keep_top_k": 1, "metric_name": "eval_loss",
         "settle_after": 0, "stale_after": 0}
    )  # fmt: skip
    result = locked_pass(root, policy, storage=store)
    assert result.scan is not None and result.scan.pointers.get(100)
    assert _actions(result) == [(Action.DELETE, 200), (Action.DELETE, 300)]
    assert _names(s3, bucket, "h") == {"checkpoint-100", "checkpoint-400", "checkpoint-500"}


def test_megatron_tracker_and_auto_on_s3(endpoint: S3Endpoint, bucket: str, s3: Any) -> None:
    """A root-level tracker is read through the listing; ``auto`` resolves from the names."""
    for it in (10, 20, 30):
        _put(s3, bucket, f"m/iter_{it:07d}/mp_rank_00/model_optim_rng.pt")
    _put(s3, bucket, "m/latest_checkpointed_iteration.txt", b"20")
    store, root = _store(endpoint), root_path(f"s3://{bucket}/m")
    policy = Policy.from_mapping({"layout": "auto", "keep_latest_n": 1, "stale_after": 0})
    result = locked_pass(root, policy, storage=store)
    assert result.scan is not None and result.scan.layout.name == "megatron"
    assert "iter_0000010" in result.scan.layout_reason or "megatron" in result.scan.layout_reason
    assert _actions(result) == [(Action.DELETE, 10), (Action.COLLECT, 30)]
    assert _names(s3, bucket, "m") == {"iter_0000020", "latest_checkpointed_iteration.txt"}


@pytest.mark.parametrize("layout", ["torchtitan", "orbax", "hf-trainer", "megatron"])
def test_unchanged_root_of_any_layout_costs_one_listing_and_no_reads(
    endpoint: S3Endpoint, bucket: str, s3: Any, layout: str
) -> None:
    for step in (1, 2, 3):
        _dcp(s3, bucket, "r", step)
        _orbax(s3, bucket, step, commit="commit", loss=1.0 / step)
        _hf(s3, bucket, step, 1.0 / step, 1)
        _put(s3, bucket, f"m/iter_{step:07d}/x.pt")
    _put(s3, bucket, "m/latest_checkpointed_iteration.txt", b"3")
    where = {"torchtitan": "r", "orbax": "o", "hf-trainer": "h", "megatron": "m"}[layout]
    store, root = _store(endpoint), root_path(f"s3://{bucket}/{where}")
    policy = Policy.from_mapping({"layout": layout, "settle_after": 0})
    lay = policy.scan_layout()
    first = store.scan(root, layout=lay)
    assert [c.step for c in first.steps] == [1, 2, 3], first
    endpoint.proxy.counts.clear()
    again = store.scan(root, layout=lay)
    assert again.steps == first.steps and again.pointers == first.pointers
    assert dict(endpoint.proxy.counts) == {"ListObjects": 1}  # 1 listing, 0 reads


def test_lightning_file_checkpoints_are_not_supported_on_s3_and_untouched(
    endpoint: S3Endpoint, bucket: str, s3: Any
) -> None:
    for step in (1, 2, 3):
        _put(s3, bucket, f"l/epoch=0-step={step}.ckpt")
    _put(s3, bucket, "l/last.ckpt")
    store, root = _store(endpoint), root_path(f"s3://{bucket}/l")
    policy = Policy.from_mapping({"layout": "lightning", "keep_latest_n": 1, "stale_after": 0})
    result = locked_pass(root, policy, storage=store)
    assert result.scan is not None and not result.outcomes
    assert any("not supported on S3" in a.reason for a in result.scan.anomalies)
    assert len(_names(s3, bucket, "l")) == 4


class _PosixOnlySurveyor:
    """A third-party layout whose survey reads its root's files itself (no ``read_text``)."""

    name = "posix-only"
    default_marker = ".complete"
    info_file = "info.json"
    pin_file = "KEEP"
    writer_lock = ".writer.lock"
    config_file = ""

    def parse(self, name: str) -> ParsedName | None:
        digits = name.removeprefix("ckpt")
        if digits == name or not digits.isdigit():
            return None
        return ParsedName(Kind.STEP, int(digits), name, True)

    def format(self, kind: Kind, step: int) -> str:
        return f"ckpt{step}"

    def pointers(self, root: Any) -> dict[int, str]:
        return {}

    def survey(self, root: Any, names: Any, read: Any = None) -> Any:
        raise AssertionError("must not be called on S3: it would read a POSIX path")

    def classify(self, parsed: Any, probe: Any) -> Any:
        raise AssertionError("nothing is classified under a refused layout")


def test_a_surveyor_that_reads_posix_paths_itself_is_refused_on_s3(
    endpoint: S3Endpoint, bucket: str, s3: Any
) -> None:
    """Its pointers cannot be known on S3: the root is reported and nothing in it touched."""
    for step in (1, 2, 3):
        _put(s3, bucket, f"p/ckpt{step}/w.bin")
    store, root = _store(endpoint), root_path(f"s3://{bucket}/p")
    scan = store.scan(root, layout=_PosixOnlySurveyor(), stale_before=0.0)
    assert not scan.steps and not scan.in_flight
    assert [a.reason for a in scan.anomalies] == [
        "layout 'posix-only' reads its root's files on POSIX only: not used on S3"
    ]


def test_a_save_committed_after_the_plan_is_not_collected(
    endpoint: S3Endpoint, bucket: str, s3: Any
) -> None:
    """The executor asks the layout again (through the storage) before it collects: DCP's
    ``.metadata`` landing between the plan and the delete makes step-20 a checkpoint, kept."""
    _dcp(s3, bucket, "r", 10)
    _dcp(s3, bucket, "r", 20, committed=False)
    store, root = _store(endpoint), root_path(f"s3://{bucket}/r")
    policy = Policy.from_mapping({"layout": "torchtitan", "stale_after": 0})

    def writer_finishes(scan: Any) -> Any:  # after the locked scan, before the plan is applied
        _put(s3, bucket, "r/step-20/.metadata", b"\x80\x04pickle")
        return scan

    result = locked_pass(root, policy, storage=store, select=writer_finishes)
    [outcome] = result.outcomes
    assert (outcome.decision.action, outcome.decision.step) == (Action.COLLECT, 20)
    assert outcome.status == "skipped" and "no longer garbage" in (outcome.detail or ""), outcome
    assert ".metadata" in _names_in(s3, bucket, "r/step-20/")


def _names_in(s3: Any, bucket: str, prefix: str) -> set[str]:
    return {k[len(prefix) :] for k in keys_under(s3, bucket, prefix)}
