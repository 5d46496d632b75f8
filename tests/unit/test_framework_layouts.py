"""The built-in framework layouts on roots built from each framework's documented names: the
commit signal, the metric source, the pointers that never go and the garbage, through real
locked passes (scan -> plan -> apply)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

from ckptkeeper import Action, Policy, PolicyError
from ckptkeeper.info import InfoCache
from ckptkeeper.layouts import available_layouts, get_layout
from ckptkeeper.passes import PassResult, locked_pass
from ckptkeeper.scan import scan_root

HOUR = 3600.0


def run(root: Path, ahead: float = 0.0, **policy: object) -> PassResult:
    """One real pass; ``ahead`` moves the keeper's clock forward (staleness, settling): the
    pass's clock and the scan's (its cache's, which judges settling)."""
    cache = InfoCache(clock_ns=lambda: int((time.time() + ahead) * 1e9))
    return locked_pass(
        root,
        Policy(**policy),  # type: ignore[arg-type]
        clock=lambda: time.time() + ahead,
        cache=cache,
    )


def actions(result: PassResult) -> dict[str, Action]:
    assert result.plan is not None
    return {d.path.name: d.action for d in result.plan.decisions}


def reasons(result: PassResult, name: str) -> str:
    assert result.plan is not None
    return "; ".join(next(d.reasons for d in result.plan.decisions if d.path.name == name))


def listing(root: Path) -> set[str]:
    return {n for n in os.listdir(root) if n != ".ckptkeeper"}


def test_every_layout_of_the_design_table_is_built_in() -> None:
    for name in ("nemo-rl", "hf-trainer", "torchtitan", "megatron", "deepspeed", "orbax"):
        assert name in available_layouts()
    assert {"lightning", "auto"} <= set(available_layouts())


# -- torchtitan (DCP) ------------------------------------------------------------------------


def dcp(root: Path, step: int, *, done: bool = True) -> Path:
    path = root / f"step-{step}"
    path.mkdir()
    (path / "__0_0.distcp").write_bytes(b"x" * 64)
    if done:
        (path / ".metadata").write_bytes(b"meta")
    return path


def test_torchtitan_keeps_the_newest_by_recency_and_collects_a_stale_save(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        dcp(tmp_path, step)
    dcp(tmp_path, 50, done=False)
    (tmp_path / "step-x").mkdir()  # outside the grammar
    fresh = run(tmp_path, layout="torchtitan", keep_top_k=2)
    assert actions(fresh)["step-50"] is Action.WAIT  # being written: no .metadata yet
    assert "no .metadata" in reasons(fresh, "step-50")
    assert listing(tmp_path) == {"step-30", "step-40", "step-50", "step-x"}
    later = run(tmp_path, ahead=7 * HOUR, layout="torchtitan", keep_top_k=2)
    assert actions(later)["step-50"] is Action.COLLECT
    assert listing(tmp_path) == {"step-30", "step-40", "step-x"}


def test_torchtitan_metrics_file_ranks_by_the_metric(tmp_path: Path) -> None:
    for step, loss in ((10, 0.1), (20, 0.5), (30, 0.3)):
        (dcp(tmp_path, step) / "metrics.json").write_text(json.dumps({"loss": loss}))
    result = run(
        tmp_path, layout="torchtitan", keep_top_k=1, metric_name="loss", metrics_file="metrics.json"
    )
    assert listing(tmp_path) == {"step-10", "step-30"}  # best, and the latest
    assert "top-1 by loss=0.1" in reasons(result, "step-10")


def test_a_save_completed_between_plan_and_collect_is_not_collected(tmp_path: Path) -> None:
    """The executor looks again through the layout: a .metadata that appeared is respected."""
    from ckptkeeper.execute import apply_plan
    from ckptkeeper.plan import plan
    from ckptkeeper.scan import scan_root

    path = dcp(tmp_path, 5, done=False)
    policy = Policy(layout="torchtitan", stale_after=60.0)
    now = time.time() + HOUR
    decided = plan(
        scan_root(tmp_path, layout=policy.scan_layout(), stale_before=now - 60), policy, now
    )
    assert decided.by_action(Action.COLLECT)
    (path / ".metadata").write_bytes(b"meta")
    [outcome] = apply_plan(decided)
    assert outcome.status == "skipped" and "no longer garbage" in outcome.detail
    assert path.is_dir()


# -- megatron / deepspeed (tracker files) ----------------------------------------------------


def megatron(root: Path, iters: list[int], tracker: str | None) -> None:
    for it in iters:
        (root / f"iter_{it:07d}" / "mp_rank_00").mkdir(parents=True)
        (root / f"iter_{it:07d}" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"w")
    (root / "release").mkdir()
    if tracker is not None:
        (root / "latest_checkpointed_iteration.txt").write_text(tracker)


def test_megatron_keeps_the_tracked_iteration_and_collects_a_stale_one_above(
    tmp_path: Path,
) -> None:
    megatron(tmp_path, [100, 200, 300, 400], "300")
    fresh = run(tmp_path, layout="megatron", keep_latest_n=1, keep_latest=False)
    assert actions(fresh)["iter_0000300"] is Action.KEEP
    assert "named by latest_checkpointed_iteration.txt" in reasons(fresh, "iter_0000300")
    assert actions(fresh)["iter_0000400"] is Action.WAIT
    assert listing(tmp_path) == {
        "iter_0000300",
        "iter_0000400",
        "release",
        "latest_checkpointed_iteration.txt",
    }
    run(tmp_path, ahead=7 * HOUR, layout="megatron", keep_latest_n=1)
    assert listing(tmp_path) == {"iter_0000300", "release", "latest_checkpointed_iteration.txt"}


@pytest.mark.parametrize("tracker", [None, "garbage\n", "release"])
def test_megatron_without_a_usable_tracker_deletes_nothing(
    tmp_path: Path, tracker: str | None
) -> None:
    megatron(tmp_path, [100, 200, 300], tracker)
    before = listing(tmp_path)
    result = run(tmp_path, ahead=30 * HOUR, layout="megatron", keep_latest_n=1)
    assert listing(tmp_path) == before
    assert {actions(result)[f"iter_{i:07d}"] for i in (100, 200, 300)} == {Action.WAIT}
    if tracker == "garbage\n":
        assert "'garbage'" in reasons(result, "latest_checkpointed_iteration.txt")


def test_megatron_tracker_naming_a_missing_iteration_is_reported(tmp_path: Path) -> None:
    megatron(tmp_path, [100, 200], "500")
    result = run(tmp_path, layout="megatron", keep_latest_n=1)
    assert "names iter_0000500, which is not in the root" in reasons(
        result, "latest_checkpointed_iteration.txt"
    )
    assert listing(tmp_path) >= {"iter_0000200"}


def test_deepspeed_keeps_the_latest_tag_and_collects_a_stale_newer_one(tmp_path: Path) -> None:
    for n in (10, 20, 30):
        (tmp_path / f"global_step{n}").mkdir()
        (tmp_path / f"global_step{n}" / "mp_rank_00_model_states.pt").write_bytes(b"w")
    (tmp_path / "latest").write_text("global_step20")
    (tmp_path / "zero_to_fp32.py").write_text("# helper")
    result = run(tmp_path, layout="deepspeed", keep_latest_n=1)
    assert "named by latest" in reasons(result, "global_step20")
    assert listing(tmp_path) == {"global_step20", "global_step30", "latest", "zero_to_fp32.py"}
    run(tmp_path, ahead=7 * HOUR, layout="deepspeed", keep_latest_n=1)
    assert listing(tmp_path) == {"global_step20", "latest", "zero_to_fp32.py"}


def test_deepspeed_latest_naming_a_foreign_tag_deletes_nothing(tmp_path: Path) -> None:
    for n in (10, 20):
        (tmp_path / f"global_step{n}").mkdir()
    (tmp_path / "latest").write_text("my-tag")
    result = run(tmp_path, ahead=30 * HOUR, layout="deepspeed", keep_latest_n=1)
    assert listing(tmp_path) == {"global_step10", "global_step20", "latest"}
    assert "not a deepspeed checkpoint" in reasons(result, "latest")


# -- hf-trainer ------------------------------------------------------------------------------


def hf(root: Path, step: int, history: list[dict[str, object]], best: int | None = None) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"w" * 32)
    state = {
        "global_step": step,
        "log_history": history,
        "best_model_checkpoint": None if best is None else f"out/checkpoint-{best}",
    }
    (path / "trainer_state.json").write_text(json.dumps(state))
    return path


def hf_run(root: Path, losses: dict[int, float], best: int) -> None:
    history: list[dict[str, object]] = []
    for step, loss in sorted(losses.items()):
        history += [{"step": step, "loss": 1.0}, {"step": step, "eval_loss": loss}]
        hf(root, step, list(history), best)


def test_hf_trainer_keeps_top_k_by_eval_loss_the_newest_and_the_best_model(tmp_path: Path) -> None:
    hf_run(tmp_path, {10: 0.9, 20: 0.2, 30: 0.5, 40: 0.4, 50: 0.8}, best=30)
    result = run(
        tmp_path, layout="hf-trainer", keep_top_k=1, metric_name="eval_loss", settle_after=0.0
    )
    assert listing(tmp_path) == {"checkpoint-20", "checkpoint-30", "checkpoint-50"}
    assert "top-1 by eval_loss=0.2" in reasons(result, "checkpoint-20")
    assert "best_model_checkpoint in checkpoint-50/trainer_state.json" in reasons(
        result, "checkpoint-30"
    )


def test_hf_trainer_never_deletes_a_checkpoint_before_it_settles(tmp_path: Path) -> None:
    hf_run(tmp_path, {10: 0.1, 20: 0.9, 30: 0.8}, best=10)
    result = run(tmp_path, layout="hf-trainer", keep_top_k=1, metric_name="eval_loss")
    assert {actions(result)[f"checkpoint-{s}"] for s in (10, 20, 30)} == {Action.WAIT}
    assert "settling" in reasons(result, "checkpoint-20")
    assert len(listing(tmp_path)) == 3
    later = run(tmp_path, ahead=3 * 60, layout="hf-trainer", keep_top_k=1, metric_name="eval_loss")
    assert actions(later)["checkpoint-20"] is Action.DELETE


@pytest.mark.parametrize("content", ["{not json", '{"log_history": [', ""])
def test_hf_trainer_state_corrupt_or_half_written_is_kept(tmp_path: Path, content: str) -> None:
    hf_run(tmp_path, {10: 0.1, 20: 0.9, 30: 0.8}, best=10)
    (tmp_path / "checkpoint-20" / "trainer_state.json").write_text(content)
    result = run(tmp_path, ahead=HOUR, layout="hf-trainer", keep_top_k=1, metric_name="eval_loss")
    assert actions(result)["checkpoint-20"] is Action.KEEP
    assert "not valid JSON" in reasons(result, "checkpoint-20")
    assert "checkpoint-20" in listing(tmp_path)


def test_hf_trainer_without_trainer_state_is_never_collected(tmp_path: Path) -> None:
    hf_run(tmp_path, {10: 0.1}, best=10)
    (tmp_path / "checkpoint-20").mkdir()  # a save that died before trainer_state.json
    result = run(tmp_path, ahead=30 * HOUR, layout="hf-trainer", keep_top_k=1)
    assert actions(result)["checkpoint-20"] is Action.WAIT
    assert "checkpoint-20" in listing(tmp_path)


def test_hf_trainer_missing_or_nan_metric_ranks_last(tmp_path: Path) -> None:
    hf(tmp_path, 10, [{"step": 10, "eval_loss": 0.5}])
    hf(tmp_path, 20, [{"step": 20, "eval_loss": float("nan")}])
    hf(tmp_path, 30, [{"step": 30, "loss": 0.1}])
    hf(tmp_path, 40, [{"step": 40, "eval_loss": 0.7}])
    result = run(tmp_path, ahead=HOUR, layout="hf-trainer", keep_top_k=1, metric_name="eval_loss")
    assert listing(tmp_path) == {"checkpoint-10", "checkpoint-40"}
    assert "metric not finite" in reasons(result, "checkpoint-20")


# -- orbax -----------------------------------------------------------------------------------


def orbax(root: Path, step: int, loss: float | None, *, committed: bool = True) -> Path:
    path = root / str(step)
    (path / "default").mkdir(parents=True)
    if loss is not None:
        (path / "metrics").mkdir()
        (path / "metrics" / "metrics").write_text(json.dumps({"loss": loss}))
    if committed:
        (path / "_CHECKPOINT_METADATA").write_text(json.dumps({"init_timestamp_nsecs": 1}))
    return path


def test_orbax_keeps_top_k_by_the_metrics_item_and_collects_stale_temporaries(
    tmp_path: Path,
) -> None:
    orbax(tmp_path, 100, 0.3)
    orbax(tmp_path, 200, 0.1)
    orbax(tmp_path, 300, 0.5)
    orbax(tmp_path, 350, 0.0, committed=False)
    (tmp_path / "400.orbax-checkpoint-tmp-1733000000").mkdir()
    run(tmp_path, layout="orbax", keep_top_k=1, metric_name="loss")
    assert listing(tmp_path) == {"200", "300", "350", "400.orbax-checkpoint-tmp-1733000000"}
    later = run(tmp_path, ahead=7 * HOUR, layout="orbax", keep_top_k=1, metric_name="loss")
    assert listing(tmp_path) == {"200", "300", "350"}
    assert "not committed" in reasons(later, "350")


def test_orbax_metrics_from_checkpoint_metadata(tmp_path: Path) -> None:
    for step, loss in ((1, 0.2), (2, 0.9), (3, 0.8)):
        path = orbax(tmp_path, step, None)
        meta = {"init_timestamp_nsecs": 1, "metrics": {"loss": loss}}
        (path / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
    run(tmp_path, layout="orbax", keep_top_k=1, metric_name="loss")
    assert listing(tmp_path) == {"1", "3"}


# -- lightning -------------------------------------------------------------------------------


def ckpt(root: Path, step: int, loss: str) -> Path:
    path = root / f"epoch=0-step={step}-val_loss={loss}.ckpt"
    path.write_bytes(b"w" * 16)
    return path


def test_lightning_keeps_top_k_by_val_loss_and_the_target_of_last(tmp_path: Path) -> None:
    names = {
        s: ckpt(tmp_path, s, loss).name
        for s, loss in ((10, "0.5000"), (20, "0.1000"), (30, "0.9000"), (40, "nan"), (50, "0.7000"))
    }
    (tmp_path / "last.ckpt").symlink_to(names[30])
    pin = tmp_path / (names[10] + ".KEEP")
    pin.touch()
    result = run(
        tmp_path, layout="lightning", keep_top_k=1, metric_name="val_loss", settle_after=0.0
    )
    kept = {names[10], names[20], names[30], names[50], "last.ckpt", pin.name}
    assert listing(tmp_path) == kept
    assert "target of last.ckpt" in reasons(result, names[30])
    assert "pinned" in reasons(result, names[10])
    assert os.readlink(tmp_path / "last.ckpt") == names[30]
    trash = tmp_path / ".ckptkeeper" / "trash"
    assert not trash.exists() or not os.listdir(trash)  # the deleted files were removed


def test_lightning_last_ckpt_pointing_outside_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    victim = ckpt(outside, 5, "0.1000")
    root = tmp_path / "root"
    root.mkdir()
    for s, loss in ((10, "0.5000"), (20, "0.1000"), (30, "0.9000")):
        ckpt(root, s, loss)
    (root / "last.ckpt").symlink_to(victim)
    result = run(root, layout="lightning", keep_top_k=1, metric_name="val_loss", settle_after=0.0)
    assert victim.exists()
    assert "outside the root: not followed" in reasons(result, "last.ckpt")
    assert (root / "last.ckpt").is_symlink()


def test_lightning_checkpoint_named_like_one_but_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = ckpt(tmp_path, 10, "0.5000")
    (tmp_path / "epoch=0-step=99-val_loss=0.0001.ckpt").symlink_to(target)
    ckpt(tmp_path, 20, "0.1000")
    result = run(
        tmp_path, layout="lightning", keep_top_k=1, metric_name="val_loss", settle_after=0.0
    )
    assert actions(result)["epoch=0-step=99-val_loss=0.0001.ckpt"] is Action.IGNORE
    assert (tmp_path / "epoch=0-step=99-val_loss=0.0001.ckpt").is_symlink()


def test_nemo_rl_step_that_is_a_file_is_still_an_anomaly(tmp_path: Path) -> None:
    (tmp_path / "step_3").write_text("not a checkpoint")
    result = run(tmp_path, keep_top_k=0, keep_latest=False)
    assert actions(result)["step_3"] is Action.IGNORE
    assert (tmp_path / "step_3").is_file()


# -- auto ------------------------------------------------------------------------------------


def test_auto_picks_the_one_layout_present_and_says_why(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        dcp(tmp_path, step)
    result = run(tmp_path, layout="auto", keep_top_k=1)
    assert result.scan is not None and result.scan.layout.name == "torchtitan"
    assert "is a torchtitan name" in result.scan.layout_reason
    assert listing(tmp_path) == {"step-3"}


def test_auto_refuses_a_root_with_two_layouts_names(tmp_path: Path) -> None:
    dcp(tmp_path, 1)
    dcp(tmp_path, 2)
    (tmp_path / "step_1").mkdir()
    (tmp_path / "step_1" / "training_info.json").write_text("{}")
    (tmp_path / "step_2").mkdir()
    (tmp_path / "step_2" / "training_info.json").write_text("{}")
    before = listing(tmp_path)
    result = run(tmp_path, ahead=30 * HOUR, layout="auto", keep_top_k=0, keep_latest=False)
    assert listing(tmp_path) == before
    assert result.plan is not None
    why = "; ".join(r for d in result.plan.decisions for r in d.reasons)
    assert "several layouts" in why and "nemo-rl" in why and "torchtitan" in why


def test_auto_on_an_empty_root_is_nemo_rl(tmp_path: Path) -> None:
    result = run(tmp_path, layout="auto")
    assert result.scan is not None and result.scan.layout.name == "nemo-rl"


# -- policy keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"metrics_file": "../x.json"}, "metrics_file"),
        ({"metrics_file": "/abs.json"}, "metrics_file"),
        ({"metrics_file": 3}, "metrics_file"),
        ({"settle_after": "soon"}, "settle_after"),
        ({"settle_after": -1}, "settle_after"),
        ({"layout": "caffe"}, "layout"),
    ],
)
def test_new_policy_keys_are_validated_and_errors_name_the_key(
    values: dict[str, object], key: str
) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_mapping(values, source="ckptkeeper.toml")
    assert info.value.key == key


def test_new_policy_keys_parse() -> None:
    policy = Policy.from_mapping(
        {"layout": "auto", "metrics_file": "eval/metrics.json", "settle_after": "5m"}
    )
    assert (policy.layout, policy.metrics_file, policy.settle_after) == (
        "auto",
        "eval/metrics.json",
        300.0,
    )
    assert Policy().layout == "nemo-rl" and Policy().settle_after == 120.0
    assert not math.isnan(Policy().settle_after)


def test_hf_best_model_checkpoint_naming_a_gone_checkpoint_changes_nothing(tmp_path: Path) -> None:
    hf_run(tmp_path, {10: 0.9, 20: 0.2, 30: 0.5}, best=5)  # checkpoint-5 is long gone
    result = run(tmp_path, ahead=HOUR, layout="hf-trainer", keep_top_k=1, metric_name="eval_loss")
    assert listing(tmp_path) == {"checkpoint-20", "checkpoint-30"}
    assert result.scan is not None and 5 in result.scan.pointers


def test_a_memoized_look_reuses_unchanged_checkpoints_and_sees_a_rewritten_state(
    tmp_path: Path,
) -> None:
    """The daemon's unlocked look skips unchanged checkpoints of a layout that looks inside, as
    for nemo-rl; trainer_state.json rewritten in place is seen."""
    from ckptkeeper.scan import scan_root

    hf_run(tmp_path, {10: 0.9, 20: 0.2}, best=20)
    layout = Policy(layout="hf-trainer", settle_after=0.0).scan_layout()
    cache = InfoCache(clock_ns=lambda: time.time_ns() + 10**10)  # memo trusted at once
    scan_root(tmp_path, layout=layout, cache=cache, memo=True)
    again = scan_root(tmp_path, layout=layout, cache=cache, memo=True)
    assert cache.memo_hits == 2
    assert {c.step: c.info["eval_loss"] for c in again.steps if c.info} == {10: 0.9, 20: 0.2}
    state = tmp_path / "checkpoint-10" / "trainer_state.json"
    state.write_text(json.dumps({"log_history": [{"step": 10, "eval_loss": 0.1}]}) + " " * 9)
    third = scan_root(tmp_path, layout=layout, cache=cache, memo=True)
    assert {c.step: c.info["eval_loss"] for c in third.steps if c.info} == {10: 0.1, 20: 0.2}


def test_lightning_checkpoint_still_being_copied_in_is_not_deleted(tmp_path: Path) -> None:
    for s, loss in ((10, "0.1000"), (20, "0.5000")):
        ckpt(tmp_path, s, loss)
    young = ckpt(tmp_path, 15, "0.9000")  # being copied in from another filesystem
    policy = {"layout": "lightning", "keep_top_k": 1, "metric_name": "val_loss"}
    result = run(tmp_path, **policy, keep_latest=False)
    assert actions(result)[young.name] is Action.WAIT and young.exists()
    assert "settling" in reasons(result, young.name)
    later = run(tmp_path, ahead=3 * 60, **policy, keep_latest=False)
    assert actions(later)[young.name] is Action.DELETE and not young.exists()


def test_hf_trainer_metrics_survive_a_cache_that_memoized_the_steps(tmp_path: Path) -> None:
    """A keeper's cache holds a memo of each step (its metrics as the layout derived them from
    trainer_state.json). A later scan that reads trainer_state.json through the same cache
    (the locked pass, a step not trusted yet) must get the file, not the derived metrics: it
    once got ``{"step": N}`` and ranked the best checkpoint last, then deleted it."""
    hf_run(tmp_path, {10: 0.1, 20: 0.9, 30: 0.8}, best=10)
    cache = InfoCache(clock_ns=lambda: int((time.time() + HOUR) * 1e9))
    policy = Policy(layout="hf-trainer", keep_top_k=1, metric_name="eval_loss", settle_after=0.0)
    for memo in (False, True, False):  # full, memoized look, and the locked pass's full scan
        scan = scan_root(tmp_path, cache=cache, memo=memo, layout=get_layout("hf-trainer"))
        losses = {c.path.name: (c.info or {}).get("eval_loss") for c in scan.steps}
        assert losses == {"checkpoint-10": 0.1, "checkpoint-20": 0.9, "checkpoint-30": 0.8}
    result = locked_pass(tmp_path, policy, clock=lambda: time.time() + HOUR, cache=cache)
    assert listing(tmp_path) == {"checkpoint-10", "checkpoint-30"}
    assert "top-1 by eval_loss=0.1" in reasons(result, "checkpoint-10")
