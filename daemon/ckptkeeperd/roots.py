"""Which directories are roots: the configured ones, then those ``[[discover]]`` globs find.

Each is a `stores.Root` (its storage decided once, from its spelling); the settings of each root
are `ckptkeeperd.resolver`'s.
"""

from __future__ import annotations

import glob as globlib
import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ckptkeeper.errors import strerror
from ckptkeeper.layouts import (
    AUTO,
    DEFAULT_LAYOUT,
    NEMO_RL,
    LayoutError,
    available_layouts,
    get_layout,
)
from ckptkeeper.scan import CKPTKEEPER_DIR
from ckptkeeper.storage import POSIX
from ckptkeeper.stores import Root, is_url, parse_root

from .config import DaemonConfig, DiscoverEntry

__all__ = ["expand", "expand_roots"]

_MAGIC = re.compile(r"[*?[]")


def expand_roots(
    config: DaemonConfig, problems: list[str] | None = None
) -> list[tuple[Path, Mapping[str, Any]]]:
    """The paths of `expand` (for callers that need no storage)."""
    return [(root.path, overrides) for root, overrides in expand(config, problems)]


def expand(
    config: DaemonConfig, problems: list[str] | None = None
) -> list[tuple[Root, Mapping[str, Any]]]:
    """Explicit roots, then the directories each ``[[discover]]`` glob finds, deduplicated by
    identity (st_dev, st_ino; realpath for a root that does not exist). The first entry's
    overrides win (``[[root]]`` beats ``[[discover]]``), but the spelling kept is one that is
    not a symlink: a root reached through a symlink is refused by the pass, and the directory
    must not go unmanaged because it was listed through one. Never raises; unreadable candidates
    are skipped and described in ``problems`` when given."""
    out: list[tuple[Root, Mapping[str, Any]]] = []
    seen: dict[object, int] = {}

    def add(root: Root, overrides: Mapping[str, Any]) -> None:
        key, is_link = _identity(root)
        if (at := seen.get(key)) is None:
            seen[key] = len(out)
            out.append((root, overrides))
        elif not is_link and _identity(out[at][0])[1]:
            out[at] = (root, out[at][1])  # same directory: keep the first entry's settings

    for entry in config.roots:
        add(entry.root, entry.overrides)
    for disc in config.discovers:
        layout = disc.overrides.get("layout", config.default_overrides.get("layout"))
        names = _checkpoint_names(layout if isinstance(layout, str) else DEFAULT_LAYOUT)
        for found in _discover(disc, problems if problems is not None else [], names):
            add(found, disc.overrides)
    shard = config.daemon.shard  # several keepers: only this keeper's roots (ckptkeeperd.shard)
    return out if shard is None else [(root, o) for root, o in out if shard.owns(root.path)]


def _identity(root: Root) -> tuple[object, bool]:
    """What makes two spellings one root, and whether this spelling is a symlink."""
    path = root.local_dir
    if path is None:  # an object store: its URL
        return root.url, False
    try:
        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return os.path.realpath(path), False
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return os.path.realpath(path), is_link
    return (st.st_dev, st.st_ino), is_link


def _checkpoint_names(layout: str) -> Callable[[str], bool]:
    """Is a name a checkpoint's in ``layout`` (``auto``: in any built-in layout)? A run's own
    ``ckptkeeper.toml`` is read only once its directory is a root, so it cannot choose here."""
    try:
        layouts = (
            [get_layout(n) for n in available_layouts() if n != AUTO]
            if layout == AUTO
            else [get_layout(layout)]
        )
    except LayoutError:
        layouts = [NEMO_RL]  # the config check reports the name; discover as the default does
    return lambda name: any(lay.parse(name) is not None for lay in layouts)


def _discover(
    entry: DiscoverEntry, problems: list[str], is_checkpoint: Callable[[str], bool]
) -> list[Root]:
    """Directories matching the glob that directly hold a checkpoint-named entry.

    Never a directory that is, or lies inside, a checkpoint or ``.ckptkeeper``, nor one reached
    through a symlink below the glob's literal prefix.
    """
    if is_url(entry.glob):  # s3:// as written: prefixes, listed (ckptkeeper.s3discover)
        from ckptkeeper.s3discover import discover_s3

        return [parse_root(url) for url in discover_s3(entry.glob, problems)]
    parts = Path(entry.glob).parts
    literal = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
    base = entry.base_dir
    try:
        # Path.glob takes no absolute pattern and no root_dir: glob.glob it is.
        matches = sorted(globlib.glob(entry.glob, root_dir=base))
    except (OSError, ValueError) as exc:
        problems.append(f"discover {entry.glob!r}: {exc}")
        return []
    found: list[Root] = []
    for match in matches:
        rel = Path(os.path.normpath(match))
        start = min(literal, len(rel.parts) - 1)  # a candidate's own name is always checked
        top = Path() if base is None else base
        below = [top.joinpath(*rel.parts[: i + 1]) for i in range(start, len(rel.parts))]
        full = top / rel
        if any(_not_root_part(p, is_checkpoint) for p in below) or not _holds_checkpoints(
            full, problems, is_checkpoint
        ):
            continue
        found.append(Root(full, POSIX))
    return found


def _not_root_part(path: Path, is_checkpoint: Callable[[str], bool]) -> bool:
    if is_checkpoint(path.name) or path.name == CKPTKEEPER_DIR:
        return True
    try:
        return not stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return True


def _holds_checkpoints(
    directory: Path, problems: list[str], is_checkpoint: Callable[[str], bool]
) -> bool:
    try:
        with os.scandir(directory) as it:
            return any(is_checkpoint(entry.name) for entry in it)
    except OSError as exc:
        problems.append(f"{directory}: not examined: {strerror(exc)}")
        return False
