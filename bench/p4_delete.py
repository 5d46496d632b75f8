"""P4: delete one checkpoint tree; P4b: the same through a FUSE mount with per-op latency.

P4: a tree of ``files`` empty files spread over ``dirs`` directories (one level below the top, as
a sharded checkpoint) on local disk. ``ckptkeeper.effects.remove_tree`` (several ``workers``
counts; the best is reported, and ``workers=1``) against ``rm -rf`` (a subprocess) and
``shutil.rmtree``. Each round creates one identical tree per contender (creation is not timed),
syncs, then deletes them in an order rotated per round, dropping the page/dentry/inode caches
before each deletion when permitted. The figure is the median over the rounds.

``remove_tree`` with ``count_bytes=False`` (no ``lstat`` per file) is measured too and reported
in the notes; the goal is judged on the default (bytes counted, as the daemon logs them).

P4b: the same contenders on a tree seen through ``tests.fusefs.passthrough_mount`` with
``op_latency_s`` added to every unlink and rmdir (a stand-in for NFS/Lustre metadata round trips).
Trees are created in the source directory directly; deletion goes through the mount. The server
is tests/fusefs.py's, started so that each libfuse thread keeps its Python thread state (see
``_PINNED_SERVER``): the 1 ms is slept outside the GIL, and the server's own CPU is reported.
The mount caches nothing (entry/attr timeout 0), so the Python server's CPU per request, not the
latency, bounds a parallel client; the notes add the same run on a second mount that caches
entries and attributes for ``CACHED_TIMEOUT_S``, as an NFS client does.

``python -m bench.p4_delete [--quick] [--no-fuse]`` runs it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from unittest import mock

from bench.common import Row, drop_caches, median, print_rows

__all__ = ["Shape", "contenders", "make_tree", "run", "run_fuse", "run_local"]

REPO = Path(__file__).resolve().parent.parent
RM_GOAL = 1.0  # >= this many times the speed of rm -rf (local)
SHUTIL_GOAL = 1.25  # >= this many times the speed of shutil.rmtree (local)
FUSE_GOAL = 4.0  # >= this many times faster than both (FUSE with latency)
FUSE_LATENCY_S = 0.001

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True)
class Shape:
    files: int
    dirs: int

    def __str__(self) -> str:
        return f"{self.files:,} files in {self.dirs:,} dirs"


LOCAL_FULL = Shape(100_000, 1_000)
LOCAL_QUICK = Shape(5_000, 50)
FUSE_FULL = Shape(20_000, 200)  # rm -rf needs ~30 s here (20,200 ops x ~1.5 ms)
FUSE_QUICK = Shape(500, 10)
LOCAL_WORKERS_FULL = (1, 2, 4, 8)
LOCAL_WORKERS_QUICK = (1, 2)
FUSE_WORKERS_FULL = (8, 32, 64)  # 8: the daemon's default delete_workers
FUSE_WORKERS_QUICK = (16,)
NO_BYTES = "count_bytes=False"  # suffix of the contender that skips the lstat per file
CACHED_TIMEOUT_S = 1.0  # P4b's second mount: entry/attr caching as on an NFS client


# -- trees and contenders -------------------------------------------------------------------


def make_tree(path: Path, shape: Shape) -> None:
    """``path``/shard_NNNN/fNNNNN.bin: ``shape.files`` empty files over ``shape.dirs`` dirs."""
    os.mkdir(path)
    per, extra = divmod(shape.files, shape.dirs)
    for d in range(shape.dirs):
        sub = os.path.join(path, f"shard_{d:04d}")
        os.mkdir(sub)
        fd = os.open(sub, _DIR_FLAGS)
        try:
            for i in range(per + (d < extra)):
                os.close(os.open(f"f{i:06d}.bin", _FILE_FLAGS, 0o644, dir_fd=fd))
        finally:
            os.close(fd)


def _rm_rf(path: Path) -> None:
    subprocess.run(["rm", "-rf", "--", str(path)], check=True)


def _shutil(path: Path) -> None:
    shutil.rmtree(path)


def _ours(workers: int, shape: Shape, count_bytes: bool = True) -> Callable[[Path], None]:
    def remove(path: Path) -> None:
        from ckptkeeper.removal import remove_tree

        removal = remove_tree(path, workers=workers, count_bytes=count_bytes)
        if removal.left or removal.files != shape.files or removal.dirs != shape.dirs + 1:
            raise RuntimeError(
                f"remove_tree(workers={workers}) left {removal.left[:3]} "
                f"(files {removal.files}, dirs {removal.dirs})"
            )

    return remove


def contenders(
    workers: Sequence[int], shape: Shape, no_bytes: Sequence[int] = ()
) -> dict[str, Callable[[Path], None]]:
    """Name -> deletion function: ``rm -rf``, ``shutil.rmtree``, ``remove_tree w=N`` and, for
    each N in ``no_bytes``, ``remove_tree w=N count_bytes=False``."""
    out: dict[str, Callable[[Path], None]] = {"rm -rf": _rm_rf, "shutil.rmtree": _shutil}
    for w in workers:
        out[f"remove_tree w={w}"] = _ours(w, shape)
    for w in no_bytes:
        out[f"remove_tree w={w} {NO_BYTES}"] = _ours(w, shape, count_bytes=False)
    return out


def _drop_caches() -> str | None:
    why = drop_caches()
    return None if why is None else f"{why}: trees created first, order rotated"


def _fs_of(path: Path) -> str:
    best = ("", "?", "?")
    real = os.path.realpath(path)
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            dev, point, kind = line.split()[:3]
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best[0]):
                best = (point, kind, dev)
    return f"{best[1]} ({best[2]} at {best[0] or '?'})"


def _measure(
    methods: dict[str, Callable[[Path], None]],
    tree_dir: Path,
    shape: Shape,
    rounds: int,
    *,
    drop: bool,
    view: Callable[[Path], Path] = lambda p: p,
    cpu: Callable[[], float] | None = None,
    cpu_used: dict[str, list[float]] | None = None,
) -> tuple[dict[str, list[float]], str | None]:
    """Per round: create one tree per contender under ``tree_dir``, then delete each (seen through
    ``view``) in a rotated order. Returns seconds per contender and a note about caches. With
    ``cpu`` (a CPU-seconds counter, e.g. the FUSE server's), ``cpu_used`` gets its use per run."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    note: str | None = None
    names = list(methods)
    for r in range(rounds):
        paths = {name: tree_dir / f"r{r}-{i}" for i, name in enumerate(names)}
        for path in paths.values():
            make_tree(path, shape)
        os.sync()
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if drop:
                note = _drop_caches() or note
            target = view(paths[name])
            c0 = cpu() if cpu is not None else 0.0
            t0 = time.perf_counter()
            methods[name](target)
            elapsed = time.perf_counter() - t0
            if cpu is not None and cpu_used is not None:
                cpu_used.setdefault(name, []).append(cpu() - c0)
            if os.path.lexists(paths[name]):
                raise RuntimeError(f"{name} did not remove {paths[name]}")
            times[name].append(elapsed)
    return times, note


def _best(times: dict[str, list[float]]) -> tuple[str, float]:
    """The fastest ``remove_tree`` as the daemon runs it (bytes counted)."""
    ours = {
        n: median(v)
        for n, v in times.items()
        if n.startswith("remove_tree") and not n.endswith(NO_BYTES)
    }
    name = min(ours, key=lambda n: ours[n])
    return name, ours[name]


def _workers_note(times: dict[str, list[float]]) -> str:
    from ckptkeeper.removal import Pacing  # the threads remove_tree starts with

    parts = [
        f"{n.split('=')[1]}: {median(v):.2f} s"
        for n, v in times.items()
        if n.startswith("remove_tree") and not n.endswith(NO_BYTES)
    ]
    cores = Pacing().start()
    return (
        f"remove_tree by workers (the bound; it starts with one thread per core, {cores} here, "
        "and adds threads only while each waits > 100 us per entry): " + ", ".join(parts)
    )


def _no_bytes_note(times: dict[str, list[float]], rm_t: float, sh_t: float) -> list[str]:
    parts = [
        f"{n.removeprefix('remove_tree ').removesuffix(' ' + NO_BYTES)}: {median(v):.2f} s "
        f"= {rm_t / median(v):.2f}x rm -rf, {sh_t / median(v):.2f}x shutil.rmtree"
        for n, v in times.items()
        if n.endswith(NO_BYTES)
    ]
    if not parts:
        return []
    return [
        "without the lstat per file that counts Removal.bytes (remove_tree(count_bytes=False); "
        "not what the daemon runs, it logs bytes): " + "; ".join(parts)
    ]


# -- P4: local disk -------------------------------------------------------------------------


def run_local(quick: bool, base_dir: str | None = None) -> list[Row]:
    shape = LOCAL_QUICK if quick else LOCAL_FULL
    workers = LOCAL_WORKERS_QUICK if quick else LOCAL_WORKERS_FULL
    rounds = 1 if quick else 3
    work = Path(tempfile.mkdtemp(prefix="ckptkeeper-p4-", dir=base_dir))
    try:
        fs = _fs_of(work)
        no_bytes = workers[-1:]
        times, note = _measure(contenders(workers, shape, no_bytes), work, shape, rounds, drop=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rm_t = median(times["rm -rf"])
    sh_t = median(times["shutil.rmtree"])
    best, best_t = _best(times)
    w1 = median(times["remove_tree w=1"])
    vs_rm, vs_sh = rm_t / best_t, sh_t / best_t
    cache_note = note or "caches dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before each"
    notes = [
        f"on {fs}; empty files; creation not timed; median of {rounds}; {cache_note}",
        _workers_note(times),
        *_no_bytes_note(times, rm_t, sh_t),
        "load average at the end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
    ]
    goal = f">= {RM_GOAL:g}x rm -rf and >= {SHUTIL_GOAL:g}x shutil.rmtree"
    return [
        Row(
            "P4",
            f"delete one checkpoint, {shape}, local disk: remove_tree (best: {best})",
            f"{best_t:.2f} s",
            f"rm -rf {rm_t:.2f} s; shutil.rmtree {sh_t:.2f} s",
            f"{vs_rm:.2f}x rm -rf; {vs_sh:.2f}x shutil.rmtree",
            goal,
            vs_rm >= RM_GOAL and vs_sh >= SHUTIL_GOAL,
            notes,
        ),
        Row(
            "P4-w1",
            f"delete one checkpoint, {shape}, local disk: remove_tree workers=1",
            f"{w1:.2f} s",
            f"rm -rf {rm_t:.2f} s; shutil.rmtree {sh_t:.2f} s",
            f"{rm_t / w1:.2f}x rm -rf; {sh_t / w1:.2f}x shutil.rmtree",
            "— (informational)",
            None,
            ["same trees and rounds as P4"],
        ),
    ]


# -- P4b: FUSE with latency -----------------------------------------------------------------


def _fusefs() -> ModuleType:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import tests.fusefs as fusefs

    return fusefs


def _cpu_seconds(pid: str) -> float:
    """utime + stime of process ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_cpu(mountpoint: Path) -> Callable[[], float] | None:
    """A counter of the CPU seconds used by the FUSE server serving ``mountpoint``, if found."""
    want = os.fsencode(str(mountpoint))
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if want in args and any(a.endswith(b"fusefs.py") for a in args):
            return functools.partial(_cpu_seconds, pid)
    return None


#: Runs tests/fusefs.py's server (``argv[1]`` is the script, the rest its arguments) with one
#: change: each libfuse thread keeps its Python thread state. ctypes otherwise creates and
#: destroys one around every request (``PyGILState_Ensure``/``Release`` on a foreign thread),
#: with an mmap/munmap of its frame stack and the TLB-shootdown IPIs that go with it; under a
#: parallel client that took more server CPU than the requests themselves. What is modelled is
#: unchanged: the same operations, the same ``time.sleep`` of the latency (outside the GIL).
_PINNED_SERVER = """
import ctypes, importlib.util, sys, threading
spec = importlib.util.spec_from_file_location("ckptkeeper_bench_fusefs", sys.argv[1])
fusefs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fusefs)
local = threading.local()
def pinned(op):
    def call(self, *args, **kwargs):
        if not getattr(local, "pinned", False):
            local.pinned = True
            ctypes.pythonapi.PyGILState_Ensure()  # never released: the state stays
        return op(self, *args, **kwargs)
    return call
class PinnedPassthrough(fusefs.Passthrough):
    pass
for name in fusefs.SUPPORTED_OPS:
    setattr(PinnedPassthrough, name, pinned(getattr(fusefs.Passthrough, name)))
fusefs.Passthrough = PinnedPassthrough
sys.exit(fusefs.serve(sys.argv[2:]))
"""


@contextlib.contextmanager
def _mounted(
    source: Path, mountpoint: Path, latency_s: float, cache_timeout_s: float = 0.0
) -> Iterator[Path]:
    fusefs = _fusefs()
    plain = fusefs._server_command

    def pinned(*args: object, **kwargs: object) -> list[str]:
        command: list[str] = plain(*args, **kwargs)
        if command[1:2] != ["-P"] or not command[2].endswith("fusefs.py"):
            return command  # not the shape expected: run it as it is
        return [command[0], "-P", "-c", _PINNED_SERVER, *command[2:]]

    with (
        mock.patch.object(fusefs, "_server_command", pinned),
        fusefs.passthrough_mount(
            source,
            mountpoint,
            op_latency_s=latency_s,
            latency_ops=("unlink", "rmdir"),
            cache_timeout_s=cache_timeout_s,
        ) as mounted,
    ):
        yield Path(mounted)


def _fuse_times(
    methods: dict[str, Callable[[Path], None]],
    shape: Shape,
    rounds: int,
    base_dir: str | None,
    cache_timeout_s: float,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per contender and the FUSE server's CPU seconds per run, on a fresh mount."""
    work = Path(tempfile.mkdtemp(prefix="ckptkeeper-p4b-", dir=base_dir))
    try:
        source, mountpoint = work / "source", work / "mnt"
        source.mkdir()
        mountpoint.mkdir()
        server_cpu: dict[str, list[float]] = {}
        with _mounted(source, mountpoint, FUSE_LATENCY_S, cache_timeout_s) as mounted:
            times, _ = _measure(
                methods,
                source,
                shape,
                rounds,
                drop=False,
                view=lambda p: mounted / p.relative_to(source),
                cpu=_server_cpu(mounted),
                cpu_used=server_cpu,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return times, server_cpu


def run_fuse(quick: bool, base_dir: str | None = None) -> list[Row]:
    shape = FUSE_QUICK if quick else FUSE_FULL
    workers = FUSE_WORKERS_QUICK if quick else FUSE_WORKERS_FULL
    rounds = 1 if quick else 3
    what = f"delete one checkpoint, {shape}, FUSE passthrough +{FUSE_LATENCY_S * 1e3:g} ms/op"
    goal = f">= {FUSE_GOAL:g}x faster than rm -rf and shutil.rmtree"
    try:
        reason = _fusefs().fuse_available()
    except ImportError as exc:
        reason = f"tests.fusefs not importable: {exc}"
    if reason is not None:
        return [Row("P4b", what, "skipped", "—", "—", goal, None, [f"FUSE unavailable: {reason}"])]
    times, server_cpu = _fuse_times(
        contenders(workers, shape, workers[-1:]), shape, rounds, base_dir, 0.0
    )
    # The same with the kernel caching entries and attributes for 1 s, as an NFS client does
    # (attribute cache, READDIRPLUS): permission checks and the lstat stop reaching the server.
    cached_workers = sorted({workers[0], workers[-1]})
    cached, cached_cpu = _fuse_times(
        contenders(cached_workers, shape), shape, rounds, base_dir, CACHED_TIMEOUT_S
    )
    rm_t = median(times["rm -rf"])
    sh_t = median(times["shutil.rmtree"])
    best, best_t = _best(times)
    ops = shape.files + shape.dirs + 1
    vs_rm, vs_sh = rm_t / best_t, sh_t / best_t
    return [
        Row(
            "P4b",
            f"{what}: remove_tree (best: {best})",
            f"{best_t:.2f} s ({best_t / ops * 1e3:.3f} ms/op)",
            f"rm -rf {rm_t:.2f} s ({rm_t / ops * 1e3:.2f} ms/op); shutil.rmtree {sh_t:.2f} s",
            f"{vs_rm:.1f}x rm -rf; {vs_sh:.1f}x shutil.rmtree",
            goal,
            min(vs_rm, vs_sh) >= FUSE_GOAL,
            [
                f"latency on unlink and rmdir only; median of {rounds}; trees made in the "
                "source directory, deleted through the mount (entry/attr cache timeout 0: every "
                "name looked up and every permission check reaches the server; counted, per "
                "file: rm -rf 3 LOOKUP/GETATTR + 1 UNLINK, remove_tree 6 + 1, of which 3 for the "
                "lstat that counts bytes); server: tests/fusefs.py, 64 libfuse threads, each "
                "keeping its Python thread state (bench/p4_delete.py, _PINNED_SERVER)",
                _workers_note(times),
                *_no_bytes_note(times, rm_t, sh_t),
                *_cpu_note(server_cpu, times, best),
                _cached_note(cached, cached_cpu),
                "load average at the end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
            ],
        )
    ]


def _cached_note(times: dict[str, list[float]], server_cpu: dict[str, list[float]]) -> str:
    rm_t, sh_t = median(times["rm -rf"]), median(times["shutil.rmtree"])
    best_t = _best(times)[1]
    parts = [
        f"{n.removeprefix('remove_tree ')} {median(v):.2f} s" + _cpu_of(server_cpu, n)
        for n, v in times.items()
        if n.startswith("remove_tree")
    ]
    return (
        f"with entry/attr cache timeout {CACHED_TIMEOUT_S:g} s (an NFS client's attribute "
        f"cache; same latency, same server; median of {len(times['rm -rf'])}): rm -rf "
        f"{rm_t:.2f} s{_cpu_of(server_cpu, 'rm -rf')}, shutil.rmtree {sh_t:.2f} s; "
        f"remove_tree {', '.join(parts)}: best {best_t:.2f} s = {rm_t / best_t:.1f}x rm -rf, "
        f"{sh_t / best_t:.1f}x shutil.rmtree"
    )


def _cpu_of(server_cpu: dict[str, list[float]], name: str) -> str:
    return f" ({median(server_cpu[name]):.1f} server CPU-s)" if name in server_cpu else ""


def _cpu_note(
    server_cpu: dict[str, list[float]], times: dict[str, list[float]], best: str
) -> list[str]:
    """How busy the (Python, GIL-bound) FUSE server was: near 1 CPU-second per wall second means
    the server, not the client's parallelism, sets the pace."""
    if best not in server_cpu:
        return []
    parts = [
        f"{name}: {median(server_cpu[name]):.1f} s CPU in {median(times[name]):.1f} s"
        for name in (best, "rm -rf")
        if name in server_cpu
    ]
    return ["FUSE server CPU time: " + "; ".join(parts)]


def run(quick: bool = False, base_dir: str | None = None, fuse: bool = True) -> list[Row]:
    rows = run_local(quick, base_dir)
    if fuse:
        rows += run_fuse(quick, base_dir)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-fuse", action="store_true")
    args = parser.parse_args(argv)
    print_rows(run(quick=args.quick, fuse=not args.no_fuse))
    return 0


if __name__ == "__main__":
    sys.exit(main())
