"""Metric families as plain data, and their Prometheus text format (version 0.0.4).

`KeeperMetrics` builds `Family` lists at each scrape. `render` writes them directly: a keeper of
100 roots exports some 2,700 samples, and rendering them here costs a fraction of building
prometheus_client's objects and running its generic exposition (both are kept: `to_metric`
feeds a prometheus_client registry, and a test checks the two texts parse to the same samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from prometheus_client.metrics_core import Metric

__all__ = ["CONTENT_TYPE", "Family", "Labels", "render", "to_metric"]

#: The classic text format: every name we export is valid in it, and every scraper reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class Family:
    """``name`` without a counter's ``_total``; samples are (suffix, labels, value), the suffix
    being ``_total`` for counters and ``_bucket``/``_sum``/``_count`` for histograms."""

    name: str
    kind: str  # gauge | counter | histogram
    doc: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, labels: Labels, value: float, suffix: str | None = None) -> None:
        if suffix is None:
            suffix = "_total" if self.kind == "counter" else ""
        self.samples.append((suffix, labels, value))


@lru_cache(maxsize=65536)
def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render(families: list[Family]) -> bytes:
    out: list[str] = []
    for f in families:
        head = f.name + ("_total" if f.kind == "counter" else "")
        doc = f.doc.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {head} {doc}\n# TYPE {head} {f.kind}\n")
        # float's repr ("1.0", "1e+20", "inf", "nan") is what Prometheus' parsers read.
        for suffix, labels, value in f.samples:
            if labels:
                text = ",".join([f'{k}="{_escape(v)}"' for k, v in labels])
                out.append(f"{f.name}{suffix}{{{text}}} {float(value)!r}\n")
            else:
                out.append(f"{f.name}{suffix} {float(value)!r}\n")
    return "".join(out).encode()


def to_metric(family: Family) -> Metric:
    metric = Metric(family.name, family.doc, family.kind)
    for suffix, labels, value in family.samples:
        metric.add_sample(family.name + suffix, dict(labels), value)
    return metric
