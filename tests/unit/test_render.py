"""`status` tables: everything from disk or config is shown literally, never read as rich markup."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from tests.helpers import write_checkpoint

from ckptkeeper import Policy
from ckptkeeperd.reconcile import Report, preview
from ckptkeeperd.render import print_reports

MARKUP = [
    "acc[/b]",
    "acc[red]",
    "[link=https://example.invalid]acc",
    "acc[bold]x[/bold]",
    "a:smile:",
]


def _console() -> Console:
    return Console(file=io.StringIO(), width=400, record=True, color_system="truecolor")


def _text(console: Console) -> str:
    """What was printed, without whitespace (long titles wrap at the table's width)."""
    return "".join(console.export_text(clear=False).split())


def _has(console: Console, *parts: str) -> bool:
    text = _text(console)
    return all("".join(part.split()) in text for part in parts)


def _root(base: Path, name: str, metric: str) -> tuple[Report, Policy]:
    root = base / name
    root.mkdir(parents=True)  # a "/" in a name makes nested directories: still brackets
    for step in (1, 2, 3):
        write_checkpoint(root, step, {metric: float(step)}, final=True)
    policy = Policy(keep_top_k=1, metric_name=metric, higher_is_better=True)
    return preview(root, policy), policy


@pytest.mark.parametrize("metric", MARKUP)
def test_metric_names_and_reasons_are_shown_literally(tmp_path: Path, metric: str) -> None:
    console = _console()
    print_reports([_root(tmp_path, "run", metric)], console)
    assert _has(console, f"by {metric} (higher is better)")  # the title
    assert _has(console, f"outside top-1 by {metric}=1", f"top-1 by {metric}=3")  # reasons
    html = console.export_html(clear=False)
    assert "<a " not in html and "href" not in html  # no link was made from a name
    assert "😄" not in _text(console)


@pytest.mark.parametrize("name", ["run[red]", "run[/b]", "run[link=https://example.invalid]x"])
def test_root_path_with_brackets_is_shown_literally(tmp_path: Path, name: str) -> None:
    console = _console()
    print_reports([_root(tmp_path, name, "acc")], console)
    assert _has(console, f"{tmp_path / name}  [keep_top_k=1 by acc")


def test_problems_of_an_unusable_root_are_shown_literally(tmp_path: Path) -> None:
    missing = tmp_path / "gone[/b][red]"
    console = _console()
    print_reports([(preview(missing, Policy(keep_latest_n=1)), Policy(keep_latest_n=1))], console)
    assert _has(console, f"{missing}: error")


def test_one_root_that_cannot_be_rendered_never_hides_the_others(tmp_path: Path) -> None:
    first = _root(tmp_path, "a[/b]", "acc[/b]")
    broken = Report(tmp_path / "broken", status="error", problems=[None])  # type: ignore[list-item]
    last = _root(tmp_path, "c", "acc[red]")
    console = _console()
    failed = print_reports([first, (broken, Policy()), last], console)
    assert _has(console, str(tmp_path / "a[/b]"), f"{tmp_path / 'c'}  [keep_top_k")
    assert _has(console, "top-1 by acc[red]=3", "top-1 by acc[/b]=3")
    assert _has(console, f"{tmp_path / 'broken'}: could not show this root")
    assert failed == 1
