"""KeeperMetrics fed by real passes over real roots: what the families say after each pass, the
label-less sums for fleets, finalize latency, the text file and its carried totals."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tests.helpers import CKPTKEEPER, write_checkpoint

from ckptkeeper import Policy
from ckptkeeper.storage import POSIX
from ckptkeeper.stores import Root
from ckptkeeperd.config import ConfigError, config_from_flags, load_config
from ckptkeeperd.metrics import ACTIONS, STATES, KeeperMetrics, deletions_paused
from ckptkeeperd.reconcile import preview, reconcile
from ckptkeeperd.resolver import resolve_settings
from ckptkeeperd.textfile import carry_totals, write_textfile

POLICY = Policy(keep_top_k=1, metric_name="r", higher_is_better=True)


def samples(metrics: KeeperMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: KeeperMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def one_pass(metrics: KeeperMetrics, root: Path, policy: Policy = POLICY) -> Any:
    report = reconcile(root, policy, on_outcome=metrics.finalize_hook(root, policy.complete_marker))
    metrics.observe_pass(report)
    return report


def test_a_pass_counts_actions_bytes_and_states(tmp_path: Path) -> None:
    root = tmp_path / "run"
    metrics = KeeperMetrics()
    for step, r in ((1, 0.5), (2, 0.9), (3, 0.1)):
        write_checkpoint(root, step, {"r": r})
    write_checkpoint(root, 4, {"r": 0.3}, complete=False)  # in flight
    before = time.time()
    one_pass(metrics, root)
    r = str(root)
    assert value(metrics, "ckptkeeper_actions_total", root=r, action="finalize") == 3
    assert value(metrics, "ckptkeeper_actions_total", root=r, action="delete") == 1  # step 1
    assert value(metrics, "ckptkeeper_action_failures_total", root=r, action="delete") == 0
    assert value(metrics, "ckptkeeper_freed_bytes_total", root=r) > 0
    assert value(metrics, "ckptkeeper_checkpoints", root=r, state="kept") == 2  # best + latest
    assert value(metrics, "ckptkeeper_checkpoints", root=r, state="in_flight") == 1
    assert value(metrics, "ckptkeeper_checkpoints", root=r, state="delete_pending") == 0
    last = value(metrics, "ckptkeeper_last_pass_timestamp_seconds", root=r)
    assert last is not None and before <= last <= time.time()
    age = value(metrics, "ckptkeeper_oldest_in_flight_age_seconds", root=r)
    assert age is not None and 0 <= age < 60
    free = value(metrics, "ckptkeeper_filesystem_free_bytes", root=r)
    st = os.statvfs(root)
    assert free is not None and abs(free - st.f_bavail * st.f_frsize) < 64 << 20
    assert value(metrics, "ckptkeeper_pass_duration_seconds_count") == 1
    assert value(metrics, "ckptkeeper_build_info", version="0.1.0") == 1
    # Every state and action has a series from the first pass on (alerts need no absent()).
    for state in STATES:
        assert value(metrics, "ckptkeeper_checkpoints", root=r, state=state) is not None
    for action in ACTIONS:
        assert value(metrics, "ckptkeeper_actions_total", root=r, action=action) is not None

    # The save completes: the next pass finalizes it; counters add up, states follow.
    (root / "tmp_step_4" / ".complete").write_text("{}")
    one_pass(metrics, root)
    assert value(metrics, "ckptkeeper_actions_total", root=r, action="finalize") == 4
    assert value(metrics, "ckptkeeper_checkpoints", root=r, state="in_flight") == 0
    assert value(metrics, "ckptkeeper_oldest_in_flight_age_seconds", root=r) == 0
    assert value(metrics, "ckptkeeper_pass_duration_seconds_count") == 2


def test_trash_within_grace_and_a_preview_are_states_not_actions(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step, r in ((1, 0.5), (2, 0.9), (3, 0.1)):
        write_checkpoint(root, step, {"r": r}, final=True)
    metrics = KeeperMetrics()
    # A dry run (preview) acts on nothing: the step it would delete is pending.
    metrics.observe_pass(preview(root, POLICY))
    r = str(root)
    assert value(metrics, "ckptkeeper_checkpoints", root=r, state="delete_pending") == 1
    assert value(metrics, "ckptkeeper_actions_total", root=r, action="delete") == 0
    graceful = Policy(keep_top_k=1, metric_name="r", higher_is_better=True, trash_grace=3600)
    one_pass(metrics, root, graceful)
    assert value(metrics, "ckptkeeper_checkpoints", root=r, state="trash") == 1
    assert value(metrics, "ckptkeeper_checkpoints", root=r, state="delete_pending") == 0
    assert value(metrics, "ckptkeeper_freed_bytes_total", root=r) == 0  # not removed yet


def test_finalize_latency_is_marker_mtime_to_step_visible(tmp_path: Path) -> None:
    root = tmp_path / "run"
    tmp = write_checkpoint(root, 7, {"r": 1.0})
    written = time.time() - 42.0
    os.utime(tmp / ".complete", (written, written))
    metrics = KeeperMetrics()
    one_pass(metrics, root)
    assert value(metrics, "ckptkeeper_finalize_latency_seconds_count") == 1
    latency = value(metrics, "ckptkeeper_finalize_latency_seconds_sum")
    assert latency is not None and 42.0 <= latency < 60.0
    assert value(metrics, "ckptkeeper_finalize_latency_seconds_bucket", le="30.0") == 0
    assert value(metrics, "ckptkeeper_finalize_latency_seconds_bucket", le="60.0") == 1


def test_without_root_labels_sums_survive_a_root_going_away(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        for step, r in ((1, 0.5), (2, 0.9), (3, 0.1)):
            write_checkpoint(root, step, {"r": r})
    metrics = KeeperMetrics(root_labels=False)
    one_pass(metrics, a)
    one_pass(metrics, b)
    assert value(metrics, "ckptkeeper_actions_total", action="finalize") == 6
    assert value(metrics, "ckptkeeper_checkpoints", state="kept") == 4
    assert all("root" not in dict(labels) for _, labels in samples(metrics))
    metrics.forget_root(b)
    assert value(metrics, "ckptkeeper_actions_total", action="finalize") == 6  # never goes down
    assert value(metrics, "ckptkeeper_checkpoints", state="kept") == 2  # gauges: b is gone
    metrics.root_labels = True  # (a reload may switch it) b's series are gone, a's stay
    assert value(metrics, "ckptkeeper_actions_total", root=str(a), action="finalize") == 3
    assert value(metrics, "ckptkeeper_actions_total", root=str(b), action="finalize") is None


def test_deletions_paused_follows_an_invalid_run_file(tmp_path: Path) -> None:
    root = tmp_path / "run"
    write_checkpoint(root, 1, {"r": 1.0}, final=True)
    config = config_from_flags([str(root)], {"keep_top_k": 1})
    assert not deletions_paused(resolve_settings(config, Root(root, POSIX), {}).problems)
    (root / "ckptkeeper.toml").write_text("keep_top_k = -1\n")
    problems = resolve_settings(config, Root(root, POSIX), {}).problems
    assert deletions_paused(problems), problems
    metrics = KeeperMetrics()
    metrics.observe_pass(preview(root, POLICY), paused=True)
    assert value(metrics, "ckptkeeper_deletions_paused", root=str(root)) == 1


def test_an_unusable_root_moves_no_gauge_but_the_pass_is_timed(tmp_path: Path) -> None:
    metrics = KeeperMetrics()
    metrics.observe_pass(reconcile(tmp_path / "missing", POLICY))
    r = str(tmp_path / "missing")
    assert value(metrics, "ckptkeeper_last_pass_timestamp_seconds", root=r) is None
    assert value(metrics, "ckptkeeper_filesystem_free_bytes", root=r) is None
    assert value(metrics, "ckptkeeper_pass_duration_seconds_count") == 1


def test_textfile_is_replaced_whole_and_readable_by_others(tmp_path: Path) -> None:
    root = tmp_path / "run"
    write_checkpoint(root, 1, {"r": 1.0})
    metrics = KeeperMetrics()
    one_pass(metrics, root)
    out = tmp_path / "prom" / "ckptkeeper.prom"
    out.parent.mkdir()
    out.write_text("old content\n")
    inode = out.stat().st_ino
    write_textfile(metrics, out)
    assert out.stat().st_ino != inode  # a new file renamed over the old one, not rewritten
    assert out.stat().st_mode & 0o777 == 0o644
    assert os.listdir(out.parent) == ["ckptkeeper.prom"]  # no temporary left behind
    assert "ckptkeeper_actions_total" in out.read_text()


def test_textfile_totals_carry_over_from_the_previous_file(tmp_path: Path) -> None:
    root = tmp_path / "run"
    out = tmp_path / "ckptkeeper.prom"
    write_checkpoint(root, 1, {"r": 0.1})
    write_checkpoint(root, 2, {"r": 0.2})
    first = KeeperMetrics()
    assert not carry_totals(first, out)  # no file yet
    one_pass(first, root)
    write_textfile(first, out)
    write_checkpoint(root, 3, {"r": 0.3})
    second = KeeperMetrics()
    assert carry_totals(second, out)
    one_pass(second, root)
    r = str(root)
    assert value(second, "ckptkeeper_actions_total", root=r, action="finalize") == 3
    assert value(second, "ckptkeeper_actions_total", root=r, action="delete") == 2
    assert value(second, "ckptkeeper_pass_duration_seconds_count") == 2
    assert value(second, "ckptkeeper_finalize_latency_seconds_count") == 3
    # A file that is not ours (or garbage) is not carried: the counters restart.
    out.write_text("garbage {{{\n")
    assert not carry_totals(KeeperMetrics(), out)


def test_sweep_metrics_file_from_the_command_line(tmp_path: Path) -> None:
    root = tmp_path / "run"
    out = tmp_path / "ckptkeeper.prom"
    for step in (1, 2, 3):
        write_checkpoint(root, step, {"r": float(step)})
    args = [CKPTKEEPER, "sweep", str(root), "--keep-top-k", "1", "--metric", "r"]
    proc = subprocess.run([*args, "--metrics-file", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    found = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert (
        found[
            (
                "ckptkeeper_actions_total",
                frozenset({"root": str(root), "action": "finalize"}.items()),
            )
        ]
        == 3
    )
    assert (
        found[("ckptkeeper_checkpoints", frozenset({"root": str(root), "state": "kept"}.items()))]
        == 2
    )
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus) is not installed: format not linted")
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.parametrize(
    ("value_text", "reason"),
    [
        ('"9464"', 'expected "host:port"'),
        ('"::1:9464"', "IPv6 host goes in brackets"),
        ('":9464"', "0.0.0.0:PORT"),
        ('"127.0.0.1:99999"', "port must be a number from 0 to 65535"),
        ("9464", "string"),
    ],
)
def test_bad_metrics_address_names_file_key_and_reason(
    tmp_path: Path, value_text: str, reason: str
) -> None:
    path = tmp_path / "k.toml"
    path.write_text(f"[daemon]\nmetrics_address = {value_text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "daemon.metrics_address" in str(info.value)
    assert reason in str(info.value)


def test_metrics_settings_defaults_and_values(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text("")
    options = load_config(path).daemon
    assert (options.metrics_address, options.root_labels) == ("127.0.0.1:9464", True)
    path.write_text('[daemon]\nmetrics_address = ""\nroot_labels = false\n')
    options = load_config(path).daemon
    assert (options.metrics_address, options.root_labels) == ("", False)
    path.write_text('[daemon]\nroot_labels = "no"\n')
    with pytest.raises(ConfigError, match=r"daemon\.root_labels"):
        load_config(path)


def test_run_rejects_a_bad_metrics_address_flag(tmp_path: Path) -> None:
    proc = subprocess.run(
        [CKPTKEEPER, "run", str(tmp_path), "--metrics-address", "nowhere"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "--metrics-address" in proc.stderr and "host:port" in proc.stderr


@pytest.mark.parametrize("root_labels", [True, False])
def test_fast_render_is_the_same_text_as_prometheus_client(
    tmp_path: Path, root_labels: bool
) -> None:
    metrics = KeeperMetrics(root_labels=root_labels)
    odd = tmp_path / 'a "quoted"\\back\nslash run'  # label values that need escaping
    for root in (tmp_path / "plain", odd):
        write_checkpoint(root, 1, {"r": 1.0})
        write_checkpoint(root, 2, {"r": 2.0})
        one_pass(metrics, root)
    ours = metrics.render().decode()
    reference = generate_latest(metrics.registry).decode()

    def parsed(text: str) -> list[tuple[str, str, frozenset[tuple[str, str]], float]]:
        return sorted(
            (f.type, s.name, frozenset(s.labels.items()), s.value)
            for f in text_string_to_metric_families(text)
            for s in f.samples
        )

    assert parsed(ours) == parsed(reference)
    assert len(parsed(ours)) > 40
    if root_labels:
        assert (
            "ckptkeeper_freed_bytes_total",
            frozenset({("root", str(odd))}),
        ) in samples(metrics)


def test_sweep_metrics_file_in_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    """The README's cron line on a node without node_exporter's directory: a clear message and
    exit 2 before the pass (was a FileNotFoundError traceback after it); a file that cannot be
    written after the pass is named with the reason, exit 1."""
    root = tmp_path / "run"
    for step in (1, 2, 3):
        write_checkpoint(root, step, {"r": float(step)})
    args = [CKPTKEEPER, "sweep", str(root), "--keep-top-k", "1", "--metric", "r"]
    out = tmp_path / "textfile" / "ckptkeeper.prom"
    proc = subprocess.run([*args, "--metrics-file", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"'--metrics-file': {out.parent}: not a directory" in proc.stderr, proc.stderr
    assert sorted(p.name for p in root.iterdir()) == [f"tmp_step_{n}" for n in (1, 2, 3)]  # no pass
    if os.geteuid() != 0:
        return  # the rest mounts a read-only filesystem
    out.parent.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(out.parent)]
    subprocess.run(mount, check=True)
    try:
        proc = subprocess.run([*args, "--metrics-file", str(out)], capture_output=True, text=True)
    finally:
        subprocess.run(["umount", str(out.parent)], check=True)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"ckptkeeper: cannot write {out}: EROFS (" in proc.stderr, proc.stderr
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [
        "step_1",
        "step_3",
    ]
