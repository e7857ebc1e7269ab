"""The sandbox's temporary directories: nothing a solution leaves behind ends the grading or stays behind (a
tree thousands of directories deep, unreadable directories, links to outside files), what cannot be removed
costs that solution alone its grade, and a caller killed mid-grading leaves nothing once rr grades again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import rr.tasks.sandbox_cleanup as cleanup
from rr.tasks.sandbox import run_many

DEEP_TREE = textwrap.dedent("""
    import os
    def add(a, b):
        for _ in range(1500):
            os.mkdir('d')
            os.chdir('d')
        return a + b
    """)
ADD_TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4"


def _sandbox_dirs_of(pid: int) -> set[str]:
    """The sandbox directories in the temp directory made by process `pid` (other rr jobs may be grading)."""
    found = set()
    for name in os.listdir(tempfile.gettempdir()):
        try:
            with open(os.path.join(tempfile.gettempdir(), name, cleanup.MARKER)) as f:
                if name.startswith(cleanup.PREFIX) and json.load(f)["pid"] == pid:
                    found.add(name)
        except (OSError, ValueError, KeyError):
            continue
    return found


def test_a_deep_tree_in_a_batch_of_three_costs_nothing_and_leaves_nothing():
    """1,500 nested directories made shutil.rmtree raise RecursionError (Python <= 3.12) out of the whole batch."""
    results = run_many([("def add(a, b):\n    return a + b\n", ADD_TESTS), (DEEP_TREE, ADD_TESTS),
                        ("def add(a, b):\n    return a - b\n", ADD_TESTS)], max_workers=2)
    assert [r.status for r in results] == ["passed", "passed", "failed"], results
    assert not _sandbox_dirs_of(os.getpid())  # its tree went with the run's directory


def test_remove_tree_survives_what_a_solution_can_leave(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not rr's")
    root = tmp_path / "rr-sandbox-x"
    os.makedirs(root / "wide")
    for index in range(2000):
        (root / "wide" / f"f{index}").write_bytes(b"")
    current = os.open(root, os.O_RDONLY)
    for _ in range(5000):  # far past PATH_MAX as one path
        os.mkdir("d", dir_fd=current)
        child = os.open("d", os.O_RDONLY, dir_fd=current)
        os.close(current)
        current = child
    os.close(current)
    (root / "link-to-outside").symlink_to(outside)
    (root / "locked" / "inner").mkdir(parents=True)
    (root / "locked" / "inner" / "file").write_text("x")
    os.chmod(root / "locked" / "inner", 0)
    os.chmod(root / "locked", 0)
    assert cleanup.remove_tree(str(root)) is None
    assert not os.path.lexists(root)
    assert (outside / "keep.txt").read_text() == "not rr's"  # the link was removed, never followed
    assert cleanup.remove_tree(str(root)) is None  # already gone: nothing to do


def test_what_cannot_be_removed_costs_only_that_solution_its_grade(monkeypatch):
    real_remove = cleanup.remove_tree
    stuck = []

    def remove_tree(path):
        if os.path.exists(os.path.join(path, "work", "stuck")):
            stuck.append(path)
            return "PermissionError: Operation not permitted"
        return real_remove(path)

    monkeypatch.setattr(cleanup, "remove_tree", remove_tree)
    solutions = ["def add(a, b):\n    return a + b\n",
                 "open('stuck', 'w').close()\ndef add(a, b):\n    return a + b\n",
                 "def add(a, b):\n    return a * b\n"]
    try:
        results = run_many([(code, ADD_TESTS) for code in solutions], max_workers=2)
    finally:
        for path in stuck:
            real_remove(path)
    assert [r.status for r in results] == ["passed", "error", "failed"], results
    assert "could not remove" in results[1].detail and "PermissionError" in results[1].detail


def test_a_directory_left_half_removed_keeps_its_marker(tmp_path, monkeypatch):
    """The marker goes last, so a later sweep can still tell the leftover is rr's."""
    root = tmp_path / "rr-sandbox-half"
    (root / "work" / "a").mkdir(parents=True)
    (root / cleanup.MARKER).write_text("{}")
    real_rmdir = os.rmdir

    def rmdir(path, *, dir_fd=None):
        if path == "a":
            raise PermissionError(1, "Operation not permitted")
        return real_rmdir(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "rmdir", rmdir)
    assert "PermissionError" in cleanup.remove_tree(str(root))
    assert (root / cleanup.MARKER).exists()


def test_the_sweep_removes_only_marked_directories_whose_maker_is_gone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    start_of_this = cleanup._process_start(os.getpid())

    def make(name: str, marker: dict | None) -> str:
        path = tmp_path / name
        (path / "work" / "sub").mkdir(parents=True)
        if marker is not None:
            (path / cleanup.MARKER).write_text(json.dumps(marker))
        return str(path)

    here = cleanup._where()
    gone = make("rr-sandbox-gone", {"pid": dead.pid, "start": 1, "where": here})
    reused = make("rr-sandbox-reused", {"pid": os.getppid(), "start": -1, "where": here})  # a live pid, reused
    live = make("rr-sandbox-live", {"pid": os.getppid(), "start": cleanup._process_start(os.getppid()),
                                    "where": here})
    own = make("rr-sandbox-own", {"pid": os.getpid(), "start": start_of_this, "where": here})
    elsewhere = make("rr-sandbox-elsewhere", {"pid": dead.pid, "start": 1, "where": "another-boot/1"})  # a container
    unmarked = make("rr-sandbox-unmarked", None)
    other = make("other-gone", {"pid": dead.pid, "start": 1, "where": here})  # not rr's name
    os.symlink(tmp_path / "rr-sandbox-gone-target", tmp_path / "rr-sandbox-link")
    make("rr-sandbox-gone-target", {"pid": dead.pid, "start": 1, "where": here})
    removed = cleanup.sweep_stale(str(tmp_path))
    assert sorted(removed) == sorted([gone, reused, str(tmp_path / "rr-sandbox-gone-target")])
    for path in (live, own, elsewhere, unmarked, other):
        assert os.path.isdir(path)
    assert os.path.islink(tmp_path / "rr-sandbox-link")  # a link is never taken for rr's directory


def test_a_kill_during_grading_leaves_nothing_after_the_next_start():
    grader = ("from rr.tasks.sandbox import run_in_sandbox\n"
              "run_in_sandbox('import time\\ntime.sleep(60)', 'assert True', timeout_s=60)\n")
    proc = subprocess.Popen([sys.executable, "-c", grader])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _sandbox_dirs_of(proc.pid):
        time.sleep(0.05)
    left = _sandbox_dirs_of(proc.pid)
    assert left, "the grader never made its directory"
    time.sleep(0.5)  # the runner is asleep inside
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # the supervisor and the runner die with it (parent-death signal)
    assert _sandbox_dirs_of(proc.pid) == left  # what the kill left behind
    subprocess.run([sys.executable, "-c", "from rr.tasks.sandbox import run_in_sandbox\n"
                    "assert run_in_sandbox('x = 1', 'assert x == 1').passed\n"], check=True, timeout=60)
    assert not _sandbox_dirs_of(proc.pid)  # the next start swept them
