"""The sandbox's temporary directories: made with a marker naming the process that made them, removed by a
walk that nothing a solution leaves behind can defeat, and swept when the process that made them is gone.

A solution may leave a tree 10,000 directories deep, directories it made unreadable (chmod 000), symlinks to
files outside, or a million empty files. `remove_tree` never recurses (a stack of names, one open directory
at a time), works relative to open directory descriptors (no path grows past PATH_MAX) and never follows a
link (O_NOFOLLOW, lstat). It returns the reason it could not finish instead of raising, so one solution's
leftovers cost that solution its grade and nothing else.

A caller killed while grading leaves its directories behind; `sweep_stale` removes those whose marker names
a process that no longer runs (the pid and its start time, so a reused pid is not mistaken for the maker).
It judges only markers written under the same kernel boot and pid namespace (a temp directory shared by
containers or hosts holds directories whose makers this process cannot see), and touches only directories
named `rr-sandbox-*`, owned by this user, holding a marker rr wrote: never anything rr did not create.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile

PREFIX = "rr-sandbox-"
MARKER = ".rr-sandbox.json"
_MARKER_BYTES = 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PROC_FDS = hasattr(os, "O_PATH") and os.path.isdir("/proc/self/fd")
_swept = False


def make_sandbox_dir() -> str:
    """A fresh private directory for one run, with the marker that lets a later sweep remove it. The first
    call in a process sweeps what killed processes left."""
    global _swept
    if not _swept:
        _swept = True
        sweep_stale()
    base = tempfile.mkdtemp(prefix=PREFIX)
    fd = os.open(os.path.join(base, MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps({"pid": os.getpid(), "start": _process_start(os.getpid()),
                                 "where": _where()}).encode())
    finally:
        os.close(fd)
    return base


def sweep_stale(directory: str | None = None) -> list[str]:
    """Remove every `rr-sandbox-*` directory in `directory` (the system temp directory) that this user owns,
    whose marker rr wrote and whose maker no longer runs. Returns the paths removed."""
    directory = directory or tempfile.gettempdir()
    removed = []
    try:
        names = [name for name in os.listdir(directory) if name.startswith(PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        if _is_stale(path) and remove_tree(path) is None:
            removed.append(path)
    return removed


def _is_stale(path: str) -> bool:
    try:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return False
        fd = os.open(os.path.join(path, MARKER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            marker = json.loads(os.read(fd, _MARKER_BYTES))
        finally:
            os.close(fd)
        pid, start, where = int(marker["pid"]), marker["start"], marker["where"]
    except (OSError, ValueError, TypeError, KeyError):
        return False  # no marker rr wrote (or not readable): not ours to remove
    if pid == os.getpid() or start is None or where is None or where != _where():
        return False  # this process's own, or a maker this process cannot see
    return _process_start(pid) != start


def _where() -> str | None:
    """The kernel boot and pid namespace this process runs in; None without /proc."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None without /proc
    or when no such process runs."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rfind(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def remove_tree(path: str) -> str | None:
    """Remove `path` and everything beneath it; None when done, else the reason it could not finish.

    Directories are opened with O_NOFOLLOW and their entries examined with lstat semantics, so a symlink is
    removed, never followed. A directory the solution made unreadable or unwritable is given back its owner's
    permissions first. The walk keeps one directory open and goes back up through its `..` (the solution's
    processes are dead: nothing moves the tree meanwhile)."""
    parent_path, root = os.path.split(os.path.abspath(path))
    try:
        parent = os.open(parent_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {parent_path}: {exc.strerror}"
    current = None
    try:
        current = _open_dir(parent, root)
        names: list[str] = []  # from the root down to `current`
        pending = [_clear_files(current, keep=MARKER)]  # per open level: subdirectories still to remove
        while pending:
            if pending[-1]:
                name = pending[-1].pop()
                child = _open_dir(current, name)
                os.close(current)
                current = child
                names.append(name)
                pending.append(_clear_files(current))
                continue
            pending.pop()
            if not names:
                break
            up = os.open("..", _DIR_FLAGS & ~os.O_NOFOLLOW, dir_fd=current)
            os.close(current)
            current = up
            os.rmdir(names.pop(), dir_fd=current)
        try:  # last: a tree that could not be removed keeps the marker that lets a sweep try again
            os.unlink(MARKER, dir_fd=current)
        except FileNotFoundError:
            pass
        os.close(current)
        current = None
        os.rmdir(root, dir_fd=parent)
        return None
    except FileNotFoundError:
        if current is None and not os.path.lexists(path):
            return None  # already gone
        return f"an entry vanished while {path} was removed"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    finally:
        if current is not None:
            os.close(current)
        os.close(parent)


def _open_dir(parent: int, name: str) -> int:
    """Open the directory `name` in `parent` without following a link, first giving it back rwx for its owner
    when the solution took that away."""
    if not _PROC_FDS:  # no O_PATH (not Linux): lstat, then chmod, then open without following a link
        if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            raise NotADirectoryError(20, f"{name} is not a directory")
        os.chmod(name, stat.S_IRWXU, dir_fd=parent)
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    handle = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:  # the very directory, held: a link swapped in meanwhile is refused above, never followed below
        if os.fstat(handle).st_mode & stat.S_IRWXU != stat.S_IRWXU:
            os.chmod(f"/proc/self/fd/{handle}", stat.S_IRWXU)
        return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    finally:
        os.close(handle)


def _clear_files(fd: int, keep: str | None = None) -> list[str]:
    """Unlink every entry of the open directory that is not a directory (except `keep`); return the
    subdirectories' names."""
    subdirectories = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirectories.append(entry.name)
            elif entry.name != keep:
                os.unlink(entry.name, dir_fd=fd)
    return subdirectories
