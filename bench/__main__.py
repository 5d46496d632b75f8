"""``python -m bench [--quick] [--only P1,P2,...] [--write] [--workdir DIR] [--json FILE]``.

Runs each benchmark module's ``run(quick) -> list[Row]``, prints one table (id / what / ours /
baseline / ratio / goal / met) and the notes of every row. ``--write`` rewrites BENCHMARKS.md:
machine line, date, exact command, the table and the notes. A ``--write`` of a subset (``--only``)
keeps the other modules' figures from the file (they are stored in a data comment at its end) and
says which command produced which rows; the hand-written analysis section (between
``<!-- analysis:begin -->`` and ``<!-- analysis:end -->``) is kept as it is.

A missed goal is a report, not a failure: the exit code is 0 unless a benchmark module crashed or
failed to import (1), or the usage is wrong (2). A module that does not exist yet is skipped with
a note. ``--quick`` runs every module with small sizes (CI keeps the benchmarks working with it;
nothing is asserted about the figures) and cannot be combined with ``--write``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # `tests.helpers` (the daemon wrapper) lives in the repository
    sys.path.insert(0, str(_REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import Row, machine_line  # noqa: E402

#: (id, module, what it measures) in run order. P3 and P4 are written separately; a module that
#: does not exist yet is skipped with a note.
MODULES: tuple[tuple[str, str, str], ...] = (
    ("P1", "bench.p1_stall", "trainer stall in finalize_checkpoint()"),
    ("P2", "bench.p2_latency", "finalize latency with the real daemon"),
    ("P3", "bench.p3_pass", "pass time and peak RSS over many checkpoints"),
    ("P4", "bench.p4_delete", "deleting a checkpoint"),
    ("P5", "bench.p5_idle", "idle daemon cost"),
    ("P6", "bench.p6_page", "status page rendering and disk-pressure sizing"),
    ("P7", "bench.p7_layouts", "pass cost per checkpoint for each layout"),
    ("P8", "bench.p8_s3", "S3 roots: deleting a checkpoint, an idle pass over many roots"),
    ("P2S", "bench.p2s_scale", "finalize latency as the root grows (P2-scale)"),
    ("P9", "bench.p9_cost", "system calls and cold sweep per checkpoint"),
    ("P9K", "bench.p9_keeper", "one keeper at scale: 1,000 x 100 and 10,000 x 100 checkpoints"),
)
BENCHMARKS_MD = _REPO / "BENCHMARKS.md"
_DATA_RE = re.compile(r"<!-- bench-data\n(.*?)\n-->", re.S)
_ANALYSIS_RE = re.compile(r"<!-- analysis:begin -->\n.*?<!-- analysis:end -->", re.S)
_ANALYSIS_STUB = (
    "<!-- analysis:begin -->\n"
    "## Analysis\n\n"
    "(Hand-written: profiles and prototypes behind the notes above. `--write` keeps this "
    "section as it is.)\n"
    "<!-- analysis:end -->"
)
_COLUMNS = ("id", "what", "ours", "baseline", "ratio", "goal", "met")


@dataclasses.dataclass
class ModuleResult:
    """What one module gave in one invocation (also what BENCHMARKS.md stores per module)."""

    id: str
    status: str  # ok | skipped | error
    rows: list[Row]
    detail: str = ""  # why skipped / the error
    seconds: float = 0.0
    command: str = ""
    date: str = ""
    machine: str = ""
    load: str = ""

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rows"] = [dataclasses.asdict(r) for r in self.rows]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModuleResult:
        rows = [Row(**r) for r in data.get("rows", [])]
        fields = {f.name for f in dataclasses.fields(cls)} - {"rows"}
        return cls(rows=rows, **{k: v for k, v in data.items() if k in fields})


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="ckptkeeper benchmarks (see BENCHMARKS.md)."
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (CI); < 60 s in all")
    parser.add_argument(
        "--only", default="", help="comma-separated benchmark ids to run, e.g. P1,P2,P5"
    )
    parser.add_argument(
        "--write", action="store_true", help=f"rewrite {BENCHMARKS_MD.name} with the figures"
    )
    parser.add_argument(
        "--workdir", type=Path, help="where the benchmarks create their files (default: TMPDIR)"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    return parser.parse_args(list(argv))


def _selected(only: str) -> list[tuple[str, str, str]]:
    if not only.strip():
        return list(MODULES)
    wanted = {w.strip().upper().split("-")[0] for w in only.split(",") if w.strip()}
    unknown = wanted - {m[0] for m in MODULES}
    if unknown:
        print(
            f"python -m bench: unknown benchmark id(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(m[0] for m in MODULES)}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return [m for m in MODULES if m[0] in wanted]


def _load(module_name: str) -> Callable[[bool], list[Row]] | str:
    """The module's ``run``, or why it cannot be had ("missing: ..." or "error: ...")."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return f"missing: {module_name} does not exist yet"
        return f"error: importing {module_name}: {exc!r}"
    except Exception as exc:
        return f"error: importing {module_name}: {exc!r}\n{traceback.format_exc()}"
    fn = getattr(module, "run", None)
    if not callable(fn):
        return f"error: {module_name} has no run(quick) function"
    return fn  # type: ignore[no-any-return]


def _met(met: bool | None) -> str:
    return "—" if met is None else ("yes" if met else "NO")


def _run_modules(
    selected: list[tuple[str, str, str]], quick: bool, command: str, console: Console
) -> list[ModuleResult]:
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_line()
    results: list[ModuleResult] = []
    for mid, module_name, what in selected:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        result = functools.partial(
            ModuleResult, mid, command=command, date=date, machine=machine, load=load
        )
        fn = _load(module_name)
        if isinstance(fn, str):
            status = "skipped" if fn.startswith("missing:") else "error"
            console.print(f"[yellow]{mid}[/]: {status}: {fn.split(': ', 1)[1].splitlines()[0]}")
            if status == "error":
                console.print(fn, markup=False, highlight=False)
            results.append(result(status, [], fn))
            continue
        console.print(f"[bold]{mid}[/]: {what} ({'quick' if quick else 'full'}) ...")
        started = time.perf_counter()
        try:
            rows = list(fn(quick))
        except Exception as exc:
            elapsed = time.perf_counter() - started
            detail = f"error: {exc!r}\n{traceback.format_exc()}"
            console.print(f"[red]{mid} failed after {elapsed:.1f} s[/]")
            console.print(detail, markup=False, highlight=False)
            results.append(result("error", [], detail, elapsed))
            continue
        elapsed = time.perf_counter() - started
        console.print(f"{mid}: done in {elapsed:.1f} s")
        results.append(result("ok", rows, "", elapsed))
    return results


def _table(results: list[ModuleResult]) -> Table:
    table = Table(title="ckptkeeper benchmarks", show_lines=True)
    for name in _COLUMNS:
        table.add_column(name, overflow="fold", no_wrap=name in ("id", "met"))
    for res in results:
        for r in res.rows:
            style = "red" if r.met is False else None
            cells = (r.id, r.what, r.ours, r.baseline, r.ratio, r.goal, _met(r.met))
            table.add_row(*cells, style=style)
        if res.status != "ok":
            table.add_row(res.id, res.detail.splitlines()[0], "—", "—", "—", "—", "—")
    return table


def _print_notes(results: list[ModuleResult], console: Console) -> None:
    for res in results:
        for r in res.rows:
            if r.notes:
                console.print(f"\n[bold]{r.id}[/] notes:")
                for note in r.notes:
                    console.print(f"  - {note}", markup=False, highlight=False)


# -- BENCHMARKS.md ------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _stored(path: Path) -> dict[str, ModuleResult]:
    """Module results kept in ``path``'s data comment (empty when absent or unreadable)."""
    try:
        match = _DATA_RE.search(path.read_text())
    except OSError:
        return {}
    if match is None:
        return {}
    try:
        data = json.loads(match.group(1))
        return {d["id"]: ModuleResult.from_json(d) for d in data.get("modules", [])}
    except (ValueError, KeyError, TypeError):
        return {}


def render_markdown(results: list[ModuleResult], analysis: str = _ANALYSIS_STUB) -> str:
    """BENCHMARKS.md for ``results`` (in MODULES order), with the hand-written ``analysis``."""
    order = {m[0]: i for i, m in enumerate(MODULES)}
    results = sorted(results, key=lambda r: order.get(r.id, len(order)))
    runs: dict[tuple[str, str, str], list[ModuleResult]] = {}
    for res in results:
        runs.setdefault((res.command, res.date, res.machine), []).append(res)
    out = [
        "# Benchmarks",
        "",
        "Every figure below comes from `python -m bench --write` on the machine named with it; "
        "run the same command to refresh them (`--only P1,P2` refreshes some and keeps the "
        "rest). `python -m bench --quick` runs the same code with small sizes; the test suite "
        "runs it to keep the benchmarks working and asserts no figure. The goals are the "
        "issue's; a missed goal is reported with what bounds it, not hidden.",
        "",
    ]
    for (command, date, machine), group in runs.items():
        loads = "; ".join(f"{r.id} {r.load}" for r in group)
        out += [
            f"**{', '.join(r.id for r in group)}**",
            "",
            f"- Machine: {machine}",
            f"- Date: {date}",
            f"- Command: `{command}`",
            f"- Load average (1, 5, 15 min) as each benchmark started: {loads}",
            "",
        ]
    out += [
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    for res in results:
        for r in res.rows:
            cells = [r.id, r.what, r.ours, r.baseline, r.ratio, r.goal, _met(r.met)]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        if res.status != "ok":
            why = res.detail.splitlines()[0] if res.detail else res.status
            out.append(f"| {res.id} | {_cell(why)} | — | — | — | — | {res.status} |")
    out += ["", "## Notes", ""]
    for res in results:
        for r in res.rows:
            out += [f"### {r.id}", ""]
            out += [f"- {note}" for note in r.notes] or ["- (none)"]
            out.append("")
        if res.status != "ok":
            out += [f"### {res.id}", "", f"- {res.status}: {res.detail.splitlines()[0]}", ""]
    data = json.dumps({"modules": [r.to_json() for r in results]}, indent=1, ensure_ascii=False)
    data = data.replace("--", "-\\u002d")  # only inside JSON strings; keeps the comment closed
    out += [analysis, ""]
    out += [
        "<!-- bench-data",
        data,
        "-->",
        "",
    ]
    return "\n".join(out)


def write_markdown(results: list[ModuleResult], path: Path = BENCHMARKS_MD) -> None:
    """Rewrite ``path``: these results, other modules' stored results, the analysis section."""
    merged = _stored(path)
    try:
        found = _ANALYSIS_RE.search(path.read_text())
    except OSError:
        found = None
    analysis = found.group(0) if found is not None else _ANALYSIS_STUB
    for res in results:
        if res.status == "skipped" and res.id in merged:
            continue  # a module missing now keeps the figures it had
        merged[res.id] = res
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render_markdown(list(merged.values()), analysis))
    tmp.replace(path)


def _command(raw: list[str]) -> str:
    """The command line as BENCHMARKS.md shows it: without --workdir/--json (local paths)."""
    shown: list[str] = []
    skip = False
    for arg in raw:
        if skip:
            skip = False
        elif arg in ("--workdir", "--json"):
            skip = True
        elif not arg.startswith(("--workdir=", "--json=")):
            shown.append(arg)
    return " ".join(["python -m bench", *shown])


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(raw)
    console = Console(width=None if sys.stdout.isatty() else 200)
    if args.write and args.quick:
        console.print("python -m bench: --write needs a full run (drop --quick)")
        return 2
    selected = _selected(args.only)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = str(args.workdir.resolve())
        os.environ["TMPDIR"] = workdir
        tempfile.tempdir = workdir
    command = _command(raw)
    started = time.perf_counter()
    results = _run_modules(selected, args.quick, command, console)
    console.print(_table(results))
    _print_notes(results, console)
    console.print(f"\nall benchmarks: {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({"modules": [r.to_json() for r in results]}, indent=1))
    if args.write:
        write_markdown(results)
        console.print(f"wrote {BENCHMARKS_MD}")
    return 1 if any(r.status == "error" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
