"""``sweep --metrics-file``: the metrics in the text format, for node_exporter's textfile collector.

The file is replaced atomically (a temporary file in the same directory, fsync, rename), so the
collector never reads half a file; its name must end in ``.prom`` for the collector to read it.
Each sweep is a new process, so counters and histograms would start from zero every time, and
two sweeps that each deleted 5 checkpoints would read as no increase at all. The totals of the
previous file are read back first and carried on (a file that cannot be read or parsed starts
from zero: a counter reset, which Prometheus' ``rate`` and ``increase`` handle).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ckptkeeper.stores import Root

from .config import DaemonConfig
from .metrics import PREFIX, Histogram, KeeperMetrics, deletions_paused
from .reconcile import Report
from .resolver import resolve_settings
from .roots import expand

__all__ = [
    "carry_totals",
    "sweep_metrics",
    "write_atomically",
    "write_sweep_metrics",
    "write_textfile",
]

MAX_PREVIOUS_BYTES = 16 * 1024 * 1024


def write_textfile(metrics: KeeperMetrics, path: Path) -> None:
    """Write ``metrics`` to ``path`` atomically (mode 0644: the collector may be another user)."""
    write_atomically(path, metrics.render())


def write_atomically(path: Path, body: bytes) -> None:
    """``body`` to ``path``: a temporary file beside it, fsync, mode 0644 (readers may be other
    users), rename; then the directory synced (best effort). Readers see the old or the new."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename durable too (best effort)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def carry_totals(metrics: KeeperMetrics, path: Path) -> bool:
    """Seed ``metrics``' counters and histograms with the totals in the file at ``path``.

    False (and nothing seeded) when there is no usable previous file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_PREVIOUS_BYTES + 1)
        if len(raw) > MAX_PREVIOUS_BYTES:
            return False
        families = list(text_string_to_metric_families(raw.decode("utf-8")))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    totals: dict[str | None, dict[str, dict[str, float]]] = {}
    histograms: dict[str, tuple[dict[float, float], float]] = {}
    for family in families:
        for sample in family.samples:
            if not math.isfinite(sample.value) or sample.value < 0:
                continue
            name, labels = sample.name, sample.labels
            counter = name.removeprefix(PREFIX).removesuffix("_total")
            if name.endswith("_total") and counter in ("actions", "action_failures"):
                if (action := labels.get("action")) is not None:
                    kinds = totals.setdefault(labels.get("root"), {})
                    per = kinds.setdefault(counter, {})
                    per[action] = per.get(action, 0.0) + sample.value
            elif name == PREFIX + "freed_bytes_total":
                kinds = totals.setdefault(labels.get("root"), {})
                kinds.setdefault("freed", {})[""] = sample.value
            elif name.endswith("_bucket") and "le" in labels:
                buckets, _ = histograms.setdefault(name.removesuffix("_bucket"), ({}, 0.0))
                buckets[float(labels["le"])] = sample.value
            elif name.endswith("_sum"):
                base = name.removesuffix("_sum")
                buckets, _ = histograms.setdefault(base, ({}, 0.0))
                histograms[base] = (buckets, sample.value)
    for root, kinds in totals.items():
        metrics.seed_counters(
            None if root is None else Path(root),
            kinds.get("actions", {}),
            kinds.get("action_failures", {}),
            kinds.get("freed", {}).get("", 0.0),
        )
    _seed(metrics.pass_duration, histograms.get(PREFIX + "pass_duration_seconds"))
    _seed(metrics.finalize_latency, histograms.get(PREFIX + "finalize_latency_seconds"))
    return True


def _seed(histogram: Histogram, found: tuple[Mapping[float, float], float] | None) -> None:
    if found is not None:
        histogram.seed(found[0], found[1])


def sweep_metrics(config: DaemonConfig, path: Path | None) -> KeeperMetrics | None:
    """The metrics a ``sweep --metrics-file PATH`` fills: None without PATH; else carrying on
    the totals of the file already at PATH."""
    if path is None:
        return None
    metrics = KeeperMetrics(root_labels=config.daemon.root_labels)
    carry_totals(metrics, path)
    return metrics


def write_sweep_metrics(
    config: DaemonConfig, metrics: KeeperMetrics, reports: list[Report], path: Path
) -> None:
    """Observe the sweep's passes (a root whose ``ckptkeeper.toml`` is invalid shows as paused)
    and write the file; roots this sweep did not visit leave the file (their totals stay in the
    sums without the ``root`` label)."""
    entries = {where.path: overrides for where, overrides in expand(config)}
    for report in reports:
        where = Root(report.root, report.storage)  # the storage the pass used
        resolved = resolve_settings(config, where, entries.get(report.root, {}))
        metrics.observe_pass(report, paused=deletions_paused(resolved.problems))
    metrics.retain(r.root for r in reports)
    write_textfile(metrics, path)
