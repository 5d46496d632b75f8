"""`ckptkeeper status` as a real process: what comes from disk or config is shown literally."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import CKPTKEEPER, write_checkpoint


def test_status_command_shows_every_root_with_markup_like_names(tmp_path: Path) -> None:
    """A root whose metric reads as a closing tag, then another root: both are shown."""
    roots = [tmp_path / "a[/b]", tmp_path / "b[red]"]
    for root in roots:
        root.mkdir(parents=True)
        for step in (1, 2, 3):
            write_checkpoint(root, step, {"acc[/b]": float(step)}, final=True)
    (roots[1] / "ckptkeeper.toml").write_text('metric_name = "acc[red]"\n')
    proc = subprocess.run(
        [CKPTKEEPER, "status", *map(str, roots), "--keep-top-k", "1", "--metric", "acc[/b]"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "300", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = "".join(proc.stdout.split())
    assert f"{roots[0]}[keep_top_k=1byacc[/b](lowerisbetter)]" in out
    assert "outsidetop-1byacc[/b]=2" in out  # lower is better: step 1 wins
    assert f"{roots[1]}[keep_top_k=1byacc[red](lowerisbetter)]" in out  # the later root is shown
    assert "Traceback" not in proc.stderr
