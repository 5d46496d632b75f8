"""A FUSE passthrough filesystem that stands in for a network filesystem in tests and benches.

``passthrough_mount(source, mountpoint)`` mirrors ``source`` at ``mountpoint`` through a FUSE
server running in a separate process (``python tests/fusefs.py SOURCE MOUNTPOINT ...``), built on
the ``mfusepy`` ctypes binding over libfuse3 (or libfuse2). The server runs libfuse's
multithreaded loop, so operations from parallel callers overlap. ``op_latency_s`` adds a
``time.sleep`` to the operations named in ``latency_ops`` only, to model the metadata round trip of
NFS or Lustre. The mount's type in mountinfo is ``fuse.ckptpassthrough``.

What the passthrough does (paths never follow a final symlink): getattr (lstat, or fstat on an
open handle), readdir, mkdir, rmdir, unlink, rename (``RENAME_NOREPLACE``/``RENAME_EXCHANGE`` kept,
see ``_Fuse3``), link, symlink, readlink, mknod, create/open/read/write/flush/release, fsync,
fsyncdir, truncate, utimens, chmod, chown, statfs and flock. ``flock`` is passed to the source file,
so a lock taken through the mount excludes one taken on the source directly, as on a real network
filesystem. Not implemented (the caller gets ``ENOSYS``/``EOPNOTSUPP``): POSIX ``fcntl`` byte-range
locks (the kernel then keeps them local to this host), xattrs and ``fallocate``. Unlinking a file
that is still open renames it to ``.fuse_hiddenNNN`` until the last close (libfuse's version of
NFS's ``.nfsNNN`` silly rename) unless ``hard_remove=True``.

Importing this module needs only the standard library; ``fuse_available()`` says why FUSE cannot
be used here (for ``pytest.skip``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import fcntl
import functools
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["FS_SUBTYPE", "SUPPORTED_OPS", "fuse_available", "passthrough_mount"]

FS_SUBTYPE = "ckptpassthrough"
MOUNT_TIMEOUT_S = 20.0
UNMOUNT_TIMEOUT_S = 20.0
_UTIME_NOW = (1 << 30) - 1  # tv_nsec markers from utimensat(2), seen as tv_sec=0 nanoseconds
_UTIME_OMIT = (1 << 30) - 2
_AT_FDCWD = -100


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class Passthrough:
    """The mfusepy ``Operations`` protocol (duck-typed, so importing needs no mfusepy)."""

    use_ns = True  # utimens gets and getattr returns integer nanoseconds

    def __init__(self, root: str, latency_s: float = 0.0, latency_ops: Iterable[str] = ()) -> None:
        self.root = os.path.realpath(root)
        self._latency_s = latency_s
        self._latency_ops = frozenset(latency_ops) if latency_s > 0 else frozenset()

    def _delay(self, op: str) -> None:
        if op in self._latency_ops:
            time.sleep(self._latency_s)  # the simulated server round trip

    def _path(self, path: str, op: str) -> str:
        self._delay(op)
        return self.root + path if path != "/" else self.root

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        if fh is not None:
            self._delay("getattr")
            st = os.fstat(fh)
        else:
            st = os.lstat(self._path(path or "/", "getattr"))
        keys = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev")
        attrs = {key: getattr(st, key) for key in keys}
        attrs.update(st_blocks=st.st_blocks, st_blksize=st.st_blksize)
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        entries = [(".", {"st_mode": stat.S_IFDIR}, 0), ("..", {"st_mode": stat.S_IFDIR}, 0)]
        with os.scandir(self._path(path, "readdir")) as it:
            for entry in it:
                try:
                    if entry.is_symlink():
                        kind = stat.S_IFLNK
                    elif entry.is_dir(follow_symlinks=False):
                        kind = stat.S_IFDIR
                    elif entry.is_file(follow_symlinks=False):
                        kind = stat.S_IFREG
                    else:
                        kind = stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)
                    entries.append((entry.name, {"st_mode": kind, "st_ino": entry.inode()}, 0))
                except FileNotFoundError:
                    continue  # removed while listing
        return entries

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._path(path, "mkdir"), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._path(path, "rmdir"))

    def unlink(self, path: str) -> None:
        os.unlink(self._path(path, "unlink"))

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        src, dst = self._path(old, "rename"), self.root + new
        if not flags:
            os.rename(src, dst)
            return
        if _libc().renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), src, None, dst)

    def link(self, target: str, source: str) -> None:
        os.link(self._path(source, "link"), self.root + target, follow_symlinks=False)

    def symlink(self, target: str, source: str) -> None:
        os.symlink(source, self._path(target, "symlink"))  # the link text is stored verbatim

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path, "readlink"))

    def mknod(self, path: str, mode: int, dev: int) -> None:
        os.mknod(self._path(path, "mknod"), mode, dev)

    def create(self, path: str, mode: int, flags: int) -> int:
        return os.open(self._path(path, "create"), flags | os.O_CREAT | os.O_NOFOLLOW, mode)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._path(path, "open"), flags | os.O_NOFOLLOW)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        self._delay("read")
        return os.pread(fh, size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        self._delay("write")
        return os.pwrite(fh, data, offset)

    def flush(self, path: str | None, fh: int) -> None:
        self._delay("flush")
        os.close(os.dup(fh))  # what close(2) of the caller's descriptor would do to the file

    def release(self, path: str | None, fh: int) -> None:
        self._delay("release")
        os.close(fh)

    def fsync(self, path: str | None, datasync: int, fh: int) -> None:
        self._delay("fsync")
        (os.fdatasync if datasync else os.fsync)(fh)

    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        fd = os.open(self._path(path, "fsyncdir"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        finally:
            os.close(fd)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if fh is not None:
            self._delay("truncate")
            os.ftruncate(fh, length)
        else:
            os.truncate(self._path(path, "truncate"), length)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        real = self._path(path, "utimens")
        if times is None:
            os.utime(real, follow_symlinks=False)
            return
        now, st = time.time_ns(), os.lstat(real)
        old = (st.st_atime_ns, st.st_mtime_ns)
        ns = tuple(
            o if t == _UTIME_OMIT else now if t == _UTIME_NOW else t
            for t, o in zip(times, old, strict=True)
        )
        os.utime(real, ns=(ns[0], ns[1]), follow_symlinks=False)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._path(path, "chmod"), mode)  # the kernel never sends chmod for a symlink

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._path(path, "chown"), uid, gid, follow_symlinks=False)

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._path(path, "statfs"))
        keys = "f_bsize f_frsize f_blocks f_bfree f_bavail f_files f_ffree f_favail f_namemax"
        return {key: getattr(sv, key) for key in keys.split()}

    def flock(self, path: str | None, fh: int, op: int) -> None:
        self._delay("flock")
        fcntl.flock(fh, op)  # a blocking LOCK_EX parks one server thread until granted


SUPPORTED_OPS: frozenset[str] = frozenset(
    name for name, value in vars(Passthrough).items() if callable(value) and name[0] != "_"
)


def fuse_available() -> str | None:
    """None if FUSE mounts can be made here, else the reason (for ``pytest.skip``)."""
    if not sys.platform.startswith("linux"):
        return f"FUSE passthrough needs Linux, not {sys.platform}"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"/dev/fuse is not usable: {exc}"
    if _fusermount() is None:
        return "neither fusermount3 nor fusermount is on PATH (Debian: apt-get install fuse3)"
    if not (ctypes.util.find_library("fuse3") or ctypes.util.find_library("fuse")):
        return "libfuse is not installed (Debian: apt-get install libfuse3-3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError, AttributeError) as exc:
        return f"mfusepy is not usable: {exc!r} (pip install mfusepy)"
    return None


def _fusermount() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount")


def _mount_ids(mountpoint: str) -> set[int]:
    """IDs of the FUSE mounts at ``mountpoint`` (a realpath) in this process's mountinfo."""
    ids: set[int] = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            try:
                sep = fields.index("-", 6)
            except ValueError:
                continue
            point = fields[4]
            for escaped, char in (
                ("\\040", " "),
                ("\\011", "\t"),
                ("\\012", "\n"),
                ("\\134", "\\"),
            ):
                point = point.replace(escaped, char)
            if point == mountpoint and fields[sep + 1].startswith("fuse"):
                ids.add(int(fields[0]))
    return ids


def _server_command(
    source: Path, mountpoint: Path, latency_s: float, ops: Iterable[str], options: dict[str, Any]
) -> list[str]:
    script = str(Path(__file__).resolve())  # -P: tests/ must not shadow stdlib modules
    command = [sys.executable, "-P", script, str(source), str(mountpoint)]
    command += ["--latency", repr(latency_s), "--latency-ops", ",".join(ops)]
    command += ["--cache-timeout", repr(options["cache_timeout_s"])]
    if options["hard_remove"]:
        command.append("--hard-remove")
    return command


def _unmount(mountpoint: str, *, lazy: bool = False) -> bool:
    tool = _fusermount()
    command = [tool, "-u"] if tool else ["umount"]
    if lazy:
        command.append("-z" if tool else "-l")
    result = subprocess.run([*command, mountpoint], capture_output=True, check=False)
    return result.returncode == 0


def _stop_server(proc: subprocess.Popen[bytes], mountpoint: str, ids_before: set[int]) -> None:
    def mounted() -> bool:
        return bool(_mount_ids(mountpoint) - ids_before)

    try:
        if mounted() and not _unmount(mountpoint):
            # Busy (a cwd or an open file inside): detach it. The server would keep serving the
            # remaining users, so ask it to stop; those files then fail with ENOTCONN.
            _unmount(mountpoint, lazy=True)
            if proc.stdin is not None:
                proc.stdin.close()  # the server's watcher turns EOF into SIGTERM
        try:
            proc.wait(timeout=UNMOUNT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    finally:
        if mounted():
            _unmount(mountpoint, lazy=True)  # the server died: clear "transport not connected"
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()


def _server_output(stderr: IO[bytes]) -> str:
    stderr.seek(0)
    return stderr.read().decode(errors="replace")[-4000:]


@contextlib.contextmanager
def passthrough_mount(
    source_dir: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    *,
    op_latency_s: float = 0.0,
    latency_ops: Iterable[str] = ("unlink", "rmdir"),
    cache_timeout_s: float = 0.0,
    hard_remove: bool = False,
    mount_timeout_s: float = MOUNT_TIMEOUT_S,
) -> Iterator[Path]:
    """Mount a passthrough of ``source_dir`` at ``mountpoint``; yield the mountpoint.

    ``cache_timeout_s`` is the kernel's entry/attribute cache time (libfuse defaults to 1 s; 0
    means every stat reaches the server, so changes made in ``source_dir`` directly show at once).
    On exit the mount is unmounted (lazily if busy) and the server process reaped.
    """
    ops = tuple(latency_ops)
    unknown = sorted(set(ops) - SUPPORTED_OPS)
    if unknown:
        raise ValueError(f"unknown latency ops {unknown}; choose from {sorted(SUPPORTED_OPS)}")
    reason = fuse_available()
    if reason is not None:
        raise RuntimeError(f"FUSE is not available: {reason}")
    source = Path(source_dir).resolve(strict=True)
    target = Path(mountpoint).resolve(strict=True)
    options = {"cache_timeout_s": cache_timeout_s, "hard_remove": hard_remove}
    ids_before = _mount_ids(str(target))
    env = dict(os.environ)
    if "FUSE_LIBRARY_PATH" not in env and ctypes.util.find_library("fuse3"):
        env.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy would prefer libfuse2 if present
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            _server_command(source, target, op_latency_s, ops, options),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
        try:
            deadline = time.monotonic() + mount_timeout_s
            while not _mount_ids(str(target)) - ids_before:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no FUSE mount at {target} after {mount_timeout_s} s")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = proc.wait(timeout=0.01)  # the poll interval, and notices a crash
                    raise RuntimeError(f"FUSE server exited with {code}: {_server_output(stderr)}")
            os.stat(target)  # returns once the server has answered FUSE_INIT
        except BaseException:
            _stop_server(proc, str(target), ids_before)
            raise
        try:
            yield target
        finally:
            _stop_server(proc, str(target), ids_before)


def _exit_on_stdin_eof() -> None:
    """Unmount when the parent closes our stdin or dies (libfuse handles SIGTERM)."""
    with contextlib.suppress(OSError):  # raw fd: a buffered reader's lock aborts at exit
        while os.read(0, 4096):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


def serve(argv: list[str] | None = None) -> int:
    """Run the FUSE server in the foreground until unmounted."""
    parser = argparse.ArgumentParser(description="ckptkeeper test passthrough filesystem")
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per listed op")
    parser.add_argument("--latency-ops", default="unlink,rmdir", help="comma-separated op names")
    parser.add_argument("--cache-timeout", type=float, default=0.0)
    parser.add_argument("--hard-remove", action="store_true")
    args = parser.parse_args(argv)
    import mfusepy

    class _Fuse3(mfusepy.FUSE):  # type: ignore[misc]
        """mfusepy drops rename's flags; pass them on so RENAME_NOREPLACE is honoured."""

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            decoded = (p.decode(self.encoding, self.errors) for p in (old, new))
            return self.operations.rename(*decoded, flags) or 0

    ops = [op for op in args.latency_ops.split(",") if op]
    operations = Passthrough(args.source, args.latency, ops)
    options: dict[str, Any] = {
        "foreground": True,
        "nothreads": False,  # libfuse's multithreaded loop: calls overlap (GIL freed in I/O)
        "fsname": "ckptpassthrough",
        "subtype": FS_SUBTYPE,
        "use_ino": True,
        "hard_remove": args.hard_remove,
        "default_permissions": True,
    }
    for key in ("entry_timeout", "attr_timeout", "negative_timeout"):
        options[key] = args.cache_timeout
    if mfusepy.fuse_version_major == 3:
        options["max_threads"] = 64  # blocking flocks each hold a thread; default is 10
    os.umask(0)  # the kernel has applied the caller's umask to create/mkdir modes already
    threading.Thread(target=_exit_on_stdin_eof, name="stdin-eof", daemon=True).start()
    fuse_class = _Fuse3 if mfusepy.fuse_version_major == 3 else mfusepy.FUSE
    fuse_class(operations, args.mountpoint, **options)
    return 0


if __name__ == "__main__":
    sys.exit(serve())
