"""Run untrusted Python (model-written code) in a separate, locked-down process and have it answer calls.

Invariant 4 of ARCHITECTURE.md lives here; Invariant 7 in rr/tasks/grading.py, which parses the tests,
keeps the expected values, decodes the answers and decides the verdict in the caller. One run is
three processes:

    caller ──► supervisor (`python -I -S sandbox.py supervise`, trusted, a child subreaper)
                  └─ fork: new session, empty cwd, rlimits, net namespace, parent-death signal
                     └─ exec runner (`python -I [-S] sandbox.py run`): Landlock, capabilities dropped,
                        seccomp, socket patch; then exec(code) and the tests' steps in their written
                        order in a fresh module namespace, one tagged answer per requested call on fd 3
                        (read by the supervisor, bounded)

Layers, each best effort and reported in `SandboxResult.layers`:
- isolated interpreter (-I: no PYTHON* env vars, no user site; -S: no site-packages), environment
  cleared to PATH and LANG (no AWS_*, HF_TOKEN, MLFLOW_*), an empty temporary cwd removed afterwards;
- rlimits: CPU, address space (MemoryError → status "memory"), file size, no core files, open
  files, and processes (RLIMIT_NPROC does not bind root, hence seccomp below);
- the wall-clock timeout kills the runner's process group; the supervisor is a child subreaper, so
  anything that escaped the group is re-parented to it, killed and reaped;
- no network: a fresh network namespace when permitted, Landlock TCP rules (ABI ≥ 4), seccomp
  denies socket(), and the `socket` module's connect/bind raise;
- Landlock (Linux ≥ 5.13): writes only beneath the temporary cwd; reads only the Python stdlib,
  shared libraries and the cwd (so files holding secrets cannot be read); signals only inside;
- no capabilities (a runner started as root cannot read another process's memory through /proc);
- seccomp (x86_64, aarch64): no fork/exec (a fork bomb costs one PermissionError), no kill outside
  the process, no setrlimit, mount, ptrace, reboot, module loading, io_uring and similar, and nothing
  that reaches other processes or the kernel: setpriority, sched_set*, ioprio_set, syslog, mknod(at),
  migrate_pages, move_pages, SysV IPC and message queues, inotify watches; nor the file-metadata calls
  Landlock leaves open (chmod, chown, utime, setxattr/removexattr of files outside).

This file imports only the standard library at top level: the supervisor and runner execute it
as a script under `python -I -S`, where the `rr` package is not importable.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from typing import Sequence

STATUSES = ("passed", "failed", "timeout", "error", "memory")
_DETAIL_CHARS = 1500
_OUTPUT_TAIL_CHARS = 1500
_FILE_SIZE_LIMIT = 16 * 1024 * 1024
_OPEN_FILES_LIMIT = 64
_PROCESS_LIMIT = 16
_SUPERVISOR_GRACE_S = 30.0
_ANSWER_BYTES_LIMIT = 8 * 1024 * 1024  # = rr.tasks.grading.MAX_ANSWER_BYTES (this file imports no rr)
_REPORT_BYTES = 4 * _ANSWER_BYTES_LIMIT  # base64 of the answers plus the supervisor's own fields


@dataclass(frozen=True)
class SandboxResult:
    """The verdict on one (code, tests) run. `status` is one of STATUSES; `layers` lists the
    isolation layers that were actually in force (they depend on the OS and privileges)."""

    passed: bool
    status: str
    detail: str
    layers: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Caller side
# ---------------------------------------------------------------------------------------------

def run_in_sandbox(code: str, test_code: str, timeout_s: float = 5.0, memory_mb: int = 512,
                   *, allow_site_packages: bool = False) -> SandboxResult:
    """Run `code` in the sandbox and grade it, here, against the checks parsed from `test_code`.

    `test_code` is split by rr.tasks.grading.plan_tests into setup (run in the sandbox after the code)
    and checks; only each check's call goes into the sandbox, its expected value stays in this process.
    passed only when every check's answer, decoded here, holds. A test shape the grader cannot check is
    an "error" verdict naming it. `allow_site_packages` lets setup code import installed packages.
    """
    if not isinstance(code, str) or not isinstance(test_code, str):
        raise _rr_error("run_in_sandbox: code and test_code must be strings")
    from rr.tasks.grading import UnsupportedTest, plan_tests

    try:
        plan = plan_tests(test_code)
    except UnsupportedTest as exc:
        return SandboxResult(False, "error", str(exc)[:_DETAIL_CHARS])
    return run_plan(code, plan, timeout_s, memory_mb, allow_site_packages=allow_site_packages)


def run_plan(code: str, plan, timeout_s: float = 5.0, memory_mb: int = 512,
             *, allow_site_packages: bool = False) -> SandboxResult:
    """Run `code`, then the plan's steps in their written order (setup code, and each check's call asked by
    an id chosen here), in the sandbox, and decide the verdict from the decoded answers
    (rr.tasks.grading.TestPlan). The run's directory is removed afterwards; what the solution left there that
    cannot be removed makes its grade "error", never the batch's."""
    if not timeout_s > 0:
        raise _rr_error(f"run_in_sandbox: timeout_s must be > 0 seconds, got {timeout_s!r}")
    if int(memory_mb) < 64:
        raise _rr_error(f"run_in_sandbox: memory_mb must be ≥ 64 (the interpreter needs ~30 MB), got {memory_mb!r}")
    if os.name != "posix":
        raise _rr_error("run_in_sandbox: the code sandbox needs a POSIX system (Linux for full isolation)")

    from rr.tasks.sandbox_cleanup import make_sandbox_dir, remove_tree

    base = make_sandbox_dir()
    try:
        result = _supervised_run(code, plan, base, timeout_s, memory_mb, allow_site_packages)
    finally:
        leftover = remove_tree(base)
    if leftover is not None:  # this solution's own grade; the batch's other grades stand
        return SandboxResult(False, "error", f"the solution left files the grader could not remove "
                                             f"({leftover})"[:_DETAIL_CHARS], result.layers)
    return result


def _supervised_run(code: str, plan, base: str, timeout_s: float, memory_mb: int,
                    allow_site_packages: bool) -> SandboxResult:
    """One run in the directory `base`: the supervisor started, the plan's steps sent (the checks' calls by ids
    chosen here), the report read and the verdict decided."""
    import base64
    import subprocess

    from rr.tasks.grading import decide

    ids = [secrets.token_hex(8) for _ in plan.checks]
    work = os.path.join(base, "work")
    os.mkdir(work, 0o700)
    request = {
        "code": code,
        "steps": [["exec", step] if isinstance(step, str) else ["call", ids[step], plan.checks[step].expression]
                  for step in plan.steps],
        "work": work,
        "base": base,
        "timeout_s": float(timeout_s),
        "memory_mb": int(memory_mb),
        "site_packages": bool(allow_site_packages),
        "python": sys.executable,
    }
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", os.path.abspath(__file__), "supervise"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=base, env=_clean_env(False), start_new_session=True, close_fds=True,
    )
    try:
        out, err = proc.communicate(json.dumps(request).encode(), timeout=timeout_s + _SUPERVISOR_GRACE_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.communicate()
        return SandboxResult(False, "error", "the sandbox supervisor did not finish; it was killed")
    try:
        # The supervisor's report is one JSON object; even if the sandboxed code managed to write
        # here, all it could add is answers, and those are validated as strictly as any.
        report = json.loads(out[:_REPORT_BYTES].decode("utf-8", "replace").strip().splitlines()[-1])
        raw = base64.b64decode(report.pop("answers"), validate=True)
        if not isinstance(report, dict):
            raise ValueError("not an object")
    except (IndexError, ValueError, KeyError, AttributeError, TypeError):
        tail = err.decode("utf-8", "replace")[-_OUTPUT_TAIL_CHARS:]
        return SandboxResult(False, "error", f"the sandbox supervisor failed (exit {proc.returncode}): {tail}")
    try:
        status, detail, layers = decide(plan, ids, raw, report)
    except Exception as exc:  # noqa: BLE001 - whatever the answers hold, it costs this solution only
        return SandboxResult(False, "error", f"the sandbox's answers could not be judged: {type(exc).__name__}")
    return SandboxResult(status == "passed", status, detail[:_DETAIL_CHARS], layers)


def run_many(items: Sequence[tuple[str, str]], max_workers: int = 2, timeout_s: float = 5.0,
             memory_mb: int = 512, *, allow_site_packages: bool = False) -> list[SandboxResult]:
    """run_in_sandbox over (code, test_code) pairs, `max_workers` at a time; results in input order."""
    from concurrent.futures import ThreadPoolExecutor

    if max_workers < 1:
        raise _rr_error(f"run_many: max_workers must be ≥ 1, got {max_workers!r}")
    items = list(items)
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        futures = [pool.submit(run_in_sandbox, code, tests, timeout_s, memory_mb,
                               allow_site_packages=allow_site_packages) for code, tests in items]
        return [f.result() for f in futures]


def _rr_error(message: str) -> Exception:
    from rr.errors import RRError
    return RRError(message)


def _clean_env(site_packages: bool) -> dict[str, str]:
    """Nothing from the parent's environment: secrets (AWS_*, HF_TOKEN, MLFLOW_*) must not leak."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    if site_packages:
        # numpy's BLAS would otherwise reserve a thread (and address space) per core.
        env.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return env


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------
# Supervisor: trusted; forks the runner with its limits, enforces the wall clock, cleans up.
# ---------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000


def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _prctl(libc, option: int, arg2: int = 0) -> bool:
    import ctypes
    return libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) == 0


def _supervise() -> None:
    import base64

    request = json.loads(sys.stdin.buffer.read())
    try:
        libc = _libc()
    except OSError:
        libc = None
    if libc is not None:
        _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)  # the caller died: so do we (and the runner)
        _prctl(libc, _PR_SET_CHILD_SUBREAPER, 1)  # orphans of the runner come back to us

    base, work = request["base"], request["work"]
    out_fd = os.open(os.path.join(base, "stdout.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err_fd = os.open(os.path.join(base, "stderr.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    payload_r, payload_w = os.pipe()
    result_r, result_w = os.pipe()
    site_packages = bool(request["site_packages"])
    timeout_s = float(request["timeout_s"])

    pid = os.fork()
    if pid == 0:  # the runner-to-be: set limits, then exec; never return into the supervisor
        try:
            layers = _prepare_child(libc, work, payload_r, out_fd, err_fd, result_w,
                                    timeout_s, int(request["memory_mb"]))
            argv = [request["python"], "-I"] + ([] if site_packages else ["-S"])
            argv += [os.path.abspath(__file__), "run", ",".join(layers)]
            os.execve(request["python"], argv, _clean_env(site_packages))
        except BaseException as exc:  # noqa: BLE001 - report anything, then die without cleanup
            try:
                os.write(2, f"sandbox: could not start the runner: {exc!r}\n".encode())
            finally:
                os._exit(127)

    os.close(payload_r)
    os.close(result_w)
    os.close(out_fd)
    os.close(err_fd)
    started = time.monotonic()
    try:
        # Only the code and the steps (setup code, calls): expected values never leave the caller.
        os.write(payload_w, json.dumps({"code": request["code"], "steps": request["steps"]}).encode())
    except BrokenPipeError:
        pass
    finally:
        os.close(payload_w)

    answers = bytearray()
    outcome = _wait_reading(pid, started + timeout_s, result_r, answers)
    elapsed = time.monotonic() - started
    _kill_group(pid)  # the runner is still an unreaped zombie, so its group id cannot have been reused
    _, wait_status = os.waitpid(pid, 0)
    _reap_all_children()
    if outcome != "oversized":
        _drain(result_r, answers)  # what was still in the pipe when the runner exited or was killed
        if len(answers) > _ANSWER_BYTES_LIMIT:
            outcome = "oversized"
    os.close(result_r)
    report = {"outcome": outcome, "elapsed_s": round(elapsed, 3), "timeout_s": timeout_s,
              "exit_code": os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else None,
              "signal": _signal_name(os.WTERMSIG(wait_status)) if os.WIFSIGNALED(wait_status) else None,
              "stderr_tail": _tail(os.path.join(base, "stderr.txt")),
              "answers": base64.b64encode(bytes(answers[:_ANSWER_BYTES_LIMIT + 1])).decode()}
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


def _signal_name(sig: int) -> str:
    return signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)


def _prepare_child(libc, work, payload_r, out_fd, err_fd, result_w, timeout_s, memory_mb) -> list[str]:
    """In the forked child, before exec: session, cwd, fds, rlimits, network namespace."""
    import math
    import resource

    layers = []
    os.setsid()
    layers.append("session")
    os.chdir(work)
    for source, target in ((payload_r, 0), (out_fd, 1), (err_fd, 2), (result_w, 3)):
        os.dup2(source, target)
    os.closerange(4, 1 << 16)
    if libc is not None and _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL):
        layers.append("parent-death-signal")

    cpu = math.ceil(timeout_s) + 1
    memory = memory_mb * 1024 * 1024
    limits = [(resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
              (resource.RLIMIT_FSIZE, _FILE_SIZE_LIMIT, _FILE_SIZE_LIMIT), (resource.RLIMIT_CORE, 0, 0),
              (resource.RLIMIT_NOFILE, _OPEN_FILES_LIMIT, _OPEN_FILES_LIMIT)]
    if hasattr(resource, "RLIMIT_NPROC"):
        limits.append((resource.RLIMIT_NPROC, _PROCESS_LIMIT, _PROCESS_LIMIT))
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))
    layers.append("rlimits")

    if libc is not None and hasattr(libc, "unshare"):
        import ctypes
        if libc.unshare(ctypes.c_int(_CLONE_NEWNET)) == 0:
            layers.append("netns")
        elif libc.unshare(ctypes.c_int(_CLONE_NEWUSER | _CLONE_NEWNET)) == 0:  # unprivileged users
            layers.append("netns")
    return layers


def _wait_reading(pid: int, deadline: float, result_r: int, answers: bytearray) -> str:
    """Collect the runner's answers while waiting for it to exit, without reaping it. Returns
    "exited", "timeout" (the deadline came first) or "oversized" (more answers than the grader
    reads); in the last two cases the runner's whole process group has been killed."""
    import select

    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = None
    os.set_blocking(result_r, False)
    reading = True
    try:
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_group(pid)
                return "timeout"
            watched = ([result_r] if reading else []) + ([pidfd] if pidfd is not None else [])
            ready, _, _ = select.select(watched, [], [], remaining if pidfd is not None else min(remaining, 0.005))
            if reading and result_r in ready:
                reading = _read_some(result_r, answers)
                if len(answers) > _ANSWER_BYTES_LIMIT:
                    _kill_group(pid)
                    return "oversized"
        return "exited"
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _read_some(fd: int, into: bytearray) -> bool:
    """One non-blocking read; False once the pipe reached end of file."""
    try:
        chunk = os.read(fd, 1 << 16)
    except BlockingIOError:
        return True
    into.extend(chunk)
    return bool(chunk)


def _drain(fd: int, into: bytearray) -> None:
    while len(into) <= _ANSWER_BYTES_LIMIT:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            return
        into.extend(chunk)


def _reap_all_children(budget_s: float = 3.0) -> None:
    """Kill and reap every remaining child (the subreaper inherits the runner's orphans)."""
    give_up = time.monotonic() + budget_s
    while time.monotonic() < give_up:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            continue
        for child in _children_of(os.getpid()):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.002)


def _children_of(parent: int) -> list[int]:
    children = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # the command name may contain spaces
        if len(fields) > 1 and int(fields[1]) == parent:
            children.append(int(entry))
    return children


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * _OUTPUT_TAIL_CHARS))
            return f.read().decode("utf-8", "replace")[-_OUTPUT_TAIL_CHARS:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Runner: the process that executes untrusted code. Locks itself down first.
# ---------------------------------------------------------------------------------------------

def _run(pre_exec_layers: str) -> None:
    """Lock down, report the layers, run the code and the setup, then answer each call on fd 3.

    Everything after exec(code) is in the solution's hands: it may rewrite this function's helpers,
    builtins or fd 3. Nothing here decides a verdict; the caller validates whatever arrives."""
    import builtins

    payload = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)  # input() in the solution gets EOF, not the payload pipe
    os.dup2(null, 0)
    os.close(null)

    layers = [layer for layer in pre_exec_layers.split(",") if layer]
    for name, apply in (("landlock", _apply_landlock), ("no-capabilities", _drop_capabilities),
                        ("seccomp", _apply_seccomp), ("socket-patch", _patch_socket)):
        try:
            apply()
            layers.append(name)
        except Exception:  # noqa: BLE001 - a missing layer is reported in `layers`, not fatal
            pass
    emit = _emitter(json.dumps, os.write)
    emit(["layers", layers])  # written before any untrusted code has run

    # __name__ is not "__main__": demo blocks (`if __name__ == "__main__": ...`) do not run. The namespace is
    # a registered module's, as a script's is: @dataclass and typing look their class's module up there.
    module = type(sys)("__solution__")
    module.__builtins__ = builtins
    sys.modules["__solution__"] = module
    namespace = module.__dict__
    try:
        exec(compile(payload["code"], "<solution>", "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt are failures too
        emit(["error", "solution", type(exc).__name__, _message(exc)])
        _finish()
    # The tests' statements in their written order, as the test program would run them. An exception stops
    # the sequence as it would stop the program; a check whose value is wrong cannot be seen here (its
    # expected value never enters the sandbox), so the caller ignores whatever came after it.
    for step in payload["steps"]:
        if step[0] == "exec":
            try:
                exec(compile(step[1], "<setup>", "exec"), namespace)
            except BaseException as exc:  # noqa: BLE001
                emit(["error", "setup", type(exc).__name__, _message(exc)])
                _finish()
            continue
        answer_id, expression = step[1], step[2]
        try:
            value = eval(compile(expression, "<check>", "eval"), namespace)
        except BaseException as exc:  # noqa: BLE001
            emit(["raised", answer_id, type(exc).__name__, _message(exc)])
            _finish()
        try:
            encoded = encode_value(value)
        except UnsupportedResultType as exc:
            emit(["raised", answer_id, "UnsupportedResultType", _message(exc)])
            _finish()
        except (TypeError, ValueError, RecursionError, MemoryError) as exc:
            emit(["raised", answer_id, "UnencodableValue", _message(exc)])
            _finish()
        emit(["value", answer_id, encoded])
    _finish()


def _emitter(dumps, write):
    """One record per line on fd 3 (the helpers are bound now, before the solution can patch them)."""
    def emit(record) -> None:
        try:
            data = (dumps(record, ensure_ascii=True, allow_nan=False) + "\n").encode()
        except (TypeError, ValueError, RecursionError, MemoryError) as exc:
            data = (dumps(["error", "answer", type(exc).__name__, str(exc)[:200]]) + "\n").encode()
        view = memoryview(data)
        try:
            while view:
                view = view[write(3, view):]
        except OSError:
            pass
    return emit


def _message(exc: BaseException) -> str:
    try:
        return str(exc)[:_DETAIL_CHARS]
    except BaseException:  # noqa: BLE001 - a hostile __str__
        return "?"


def _finish() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - output is best effort
            pass
    os._exit(0)


_ENCODE_DEPTH = 100  # = rr.tasks.grading.MAX_DEPTH
_TAGS = ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F"))
_type_mro = type.__dict__["__mro__"].__get__  # the real MRO and class dicts, whatever a metaclass defines
_type_dict = type.__dict__["__dict__"].__get__


class UnsupportedResultType(TypeError):
    """A checked call returned a value the grader does not rebuild: an instance of a class the solution
    defined (a dataclass, a plain enum, a subclass of a built-in that changes its equality)."""


def encode_value(value, depth: int = 0):
    """A value as the tagged form rr.tasks.grading.decode_value reads, without calling any method the
    solution defines (only the built-in types' own functions, by exact type).

    Exact built-ins (None, bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict) are sent
    as themselves, and so are the standard library's values that a test compares with literals:
    `collections.Counter`, `OrderedDict` and `defaultdict` as a dict, a namedtuple (collections or typing)
    as a tuple, an `IntEnum`/`IntFlag` member as its int, `Decimal` and `Fraction` as themselves, and a
    `deque` as a deque (compared as a list where the expected value is one). A standard-library class is
    recognised by identity with its module's class (`sys.modules`: a value of one exists only once its
    module was imported); a namedtuple or int enum counts only if no class of the solution's in its MRO
    redefines equality. Anything else raises UnsupportedResultType naming the type."""
    if depth > _ENCODE_DEPTH:
        raise ValueError(f"the value is nested deeper than {_ENCODE_DEPTH} levels")
    kind = type(value)
    if value is None:
        return ["N"]
    if kind is bool:
        return ["B", 1 if value is True else 0]
    if kind is int:
        return ["i", int.__format__(value, "x")]
    if kind is float:
        return ["f", float.hex(value)]
    if kind is complex:
        return ["c", [float.hex(complex.real.__get__(value)), float.hex(complex.imag.__get__(value))]]
    if kind is str:
        return ["s", value]
    if kind is bytes:
        return ["y", bytes.hex(value)]
    for sequence, tag in _TAGS:
        if kind is sequence:
            return [tag, [encode_value(item, depth + 1) for item in sequence.__iter__(value)]]
    collections = sys.modules.get("collections")
    if kind is dict or (collections is not None and (kind is collections.Counter or kind is collections.OrderedDict
                                                     or kind is collections.defaultdict)):
        return ["d", [[encode_value(k, depth + 1), encode_value(v, depth + 1)] for k, v in dict.items(value)]]
    if collections is not None and kind is collections.deque:
        return ["q", [encode_value(item, depth + 1) for item in collections.deque.__iter__(value)]]
    decimal = sys.modules.get("decimal")
    if decimal is not None and kind is decimal.Decimal:
        return ["D", decimal.Decimal.__str__(value)]
    fractions = sys.modules.get("fractions")
    if fractions is not None and kind is fractions.Fraction:
        return ["Q", [int.__format__(value.numerator, "x"), int.__format__(value.denominator, "x")]]
    mro = _type_mro(kind)
    enum = sys.modules.get("enum")
    below_int, below_tuple = _classes_before(mro, int), _classes_before(mro, tuple)
    if below_int is not None and enum is not None and _keeps_equality(below_int) \
            and any(cls is enum.IntEnum or cls is enum.IntFlag for cls in mro):
        return ["i", int.__format__(value, "x")]
    if below_tuple is not None and _keeps_equality(below_tuple) \
            and any("_fields" in _type_dict(cls) for cls in below_tuple):
        return ["t", [encode_value(item, depth + 1) for item in tuple.__iter__(value)]]
    raise UnsupportedResultType(f"unsupported result type {_type_name(kind)} (the grader rebuilds built-in "
                                "values and the standard library's that tests compare with literals)")


def _classes_before(mro, base):
    """The classes before `base` in the MRO (compared by identity: a metaclass may redefine ==), or None."""
    for index, cls in enumerate(mro):
        if cls is base:
            return mro[:index]
    return None


def _keeps_equality(classes) -> bool:
    """None of these classes defines __eq__ or __ne__: instances compare as the built-in base does."""
    return not any("__eq__" in _type_dict(cls) or "__ne__" in _type_dict(cls) for cls in classes)


def _type_name(kind) -> str:
    try:
        return f"{type.__dict__['__module__'].__get__(kind)}.{type.__dict__['__qualname__'].__get__(kind)}"[:80]
    except Exception:  # noqa: BLE001 - a name is only for the message
        return "?"


def _patch_socket() -> None:
    import socket

    def denied(*_args, **_kwargs):
        raise OSError("network access is disabled in the rr sandbox")

    for method in ("connect", "connect_ex", "bind", "listen", "sendto", "sendmsg"):
        setattr(socket.socket, method, denied)
    for function in ("create_connection", "create_server", "getaddrinfo", "gethostbyname",
                     "gethostbyname_ex", "gethostbyaddr"):
        setattr(socket, function, denied)


# Landlock (include/uapi/linux/landlock.h)
_LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 444, 445, 446
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_MAKE_CHAR, _LL_MAKE_BLOCK = 1 << 6, 1 << 11
_LL_REFER, _LL_TRUNCATE, _LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_LL_NET_ALL = 0b11  # BIND_TCP | CONNECT_TCP
_LL_SCOPE_ALL = 0b11  # ABSTRACT_UNIX_SOCKET | SIGNAL


def _apply_landlock() -> None:
    """Writes only beneath the cwd; reads only the interpreter's libraries; no TCP; signals stay inside."""
    import ctypes

    libc = _libc()
    abi = libc.syscall(_LL_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint(1))
    if abi < 1:
        raise OSError(ctypes.get_errno(), "Landlock is not available")
    fs = (1 << 13) - 1
    fs |= (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0) | (_LL_IOCTL_DEV if abi >= 5 else 0)

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(fs, _LL_NET_ALL if abi >= 4 else 0, _LL_SCOPE_ALL if abi >= 6 else 0)
    ruleset = libc.syscall(_LL_CREATE, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")

    def allow(path: str, rights: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        try:
            rule = PathBeneath(rights & fs, fd)
            if libc.syscall(_LL_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint(0)):
                raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
        finally:
            os.close(fd)

    try:
        # No device nodes even in the cwd: a character device there could be /dev/mem (seccomp
        # denies mknod too).
        allow(os.getcwd(), fs & ~(_LL_MAKE_CHAR | _LL_MAKE_BLOCK))
        readable = set(filter(os.path.isdir, sys.path)) | {os.path.dirname(os.__file__)}  # stdlib, site
        readable |= {os.path.join(prefix, "lib") for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}}
        readable |= {"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/share/zoneinfo"}
        # rr itself (its data holds the shipped problems' expected values) stays unreadable even when
        # it is installed beneath one of these (pip install . puts it in <venv>/lib/.../site-packages).
        rr_package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for path, is_dir in landlock_read_grants(readable, rr_package):
            allow(path, _LL_EXECUTE | _LL_READ_FILE | (_LL_READ_DIR if is_dir else 0))
        allow(os.devnull, _LL_READ_FILE | _LL_WRITE_FILE | _LL_TRUNCATE)
        for device in ("/dev/urandom", "/dev/random", "/etc/localtime"):
            allow(device, _LL_READ_FILE)
        if not _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1):
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
        if libc.syscall(_LL_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint(0)):
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)


def landlock_read_grants(readable, hidden: str) -> list[tuple[str, bool]]:
    """(path, is_directory) to grant read access to: each readable directory, except that one holding
    `hidden` beneath it is granted entry by entry down to `hidden`, which is left out (Landlock only
    adds access, so a subtree cannot be taken back from a granted directory)."""
    hidden = os.path.realpath(hidden)

    def inside(path: str) -> bool:
        real = os.path.realpath(path)
        return real == hidden or real.startswith(hidden + os.sep)

    grants = []
    for directory in sorted(readable):
        real = os.path.realpath(directory)
        if inside(real):
            continue
        if not hidden.startswith(real + os.sep):
            grants.append((directory, True))
            continue
        current = real
        for part in os.path.relpath(hidden, real).split(os.sep):
            try:
                entries = sorted(os.listdir(current))
            except OSError:
                break
            for entry in entries:
                path = os.path.join(current, entry)
                if entry != part and not inside(path):
                    grants.append((path, os.path.isdir(path)))
            current = os.path.join(current, part)
    return grants


_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAPABILITY_VERSION_3 = 0x20080522


def _drop_capabilities() -> None:
    """No capabilities (bounding, ambient, effective, permitted, inheritable): a runner started as
    root then cannot read another process's memory through /proc (ptrace_may_access needs the
    target's capabilities), bypass file permissions or use raw devices."""
    import ctypes

    libc = _libc()
    for cap in range(64):
        if libc.prctl(ctypes.c_int(_PR_CAPBSET_DROP), ctypes.c_ulong(cap), ctypes.c_ulong(0),
                      ctypes.c_ulong(0), ctypes.c_ulong(0)) and ctypes.get_errno() == errno.EINVAL:
            break  # past the kernel's last capability
    libc.prctl(ctypes.c_int(_PR_CAP_AMBIENT), ctypes.c_ulong(_PR_CAP_AMBIENT_CLEAR_ALL), ctypes.c_ulong(0),
               ctypes.c_ulong(0), ctypes.c_ulong(0))

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header, data = Header(_CAPABILITY_VERSION_3, 0), (Data * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


# seccomp-bpf. Syscall numbers checked against asm/unistd_64.h and asm-generic/unistd.h.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = {
    "x86_64": dict(
        clone=56, clone3=435, kill=62, tgkill=234, prlimit64=302,
        denied=[57, 58, 59, 322,  # fork vfork execve execveat
                41, 53,  # socket socketpair
                200, 129, 297, 424, 434, 438,  # tkill rt_(tg)sigqueueinfo pidfd_send_signal/open/getfd
                101, 310, 311,  # ptrace process_vm_readv/writev
                160,  # setrlimit
                155, 161, 165, 166, 272, 308, 428, 429, 430, 431, 432, 433, 442,  # mounts, namespaces, chroot
                163, 164, 167, 168, 169, 170, 171, 172, 173, 175, 176, 179, 313, 246, 320,  # admin, modules
                159, 227, 305,  # adjtimex clock_settime clock_adjtime
                248, 249, 250, 298, 303, 304, 321, 323, 425, 426, 427,  # keys perf handles bpf uffd io_uring
                141, 142, 144, 203, 314, 251,  # setpriority sched_setparam/setscheduler/setaffinity/setattr ioprio_set
                103, 133, 259, 256, 279,  # syslog mknod mknodat migrate_pages move_pages
                # File metadata, which Landlock does not cover: chmod/chown/utime/xattr of files outside
                90, 91, 92, 93, 94, 260, 268, 452, 132, 235, 261, 280, 188, 189, 190, 197, 198, 199, 463, 466,
                # SysV IPC and POSIX message queues (the host's IPC namespace; shm segments outlive us)
                29, 30, 31, 64, 65, 66, 67, 68, 69, 70, 71, 220, 240, 241, 242, 243, 244, 245,
                254]),  # inotify_add_watch (watching files outside)
    "aarch64": dict(
        clone=220, clone3=435, kill=129, tgkill=131, prlimit64=261,
        denied=[221, 281, 198, 199, 130, 138, 240, 424, 434, 438, 117, 270, 271, 164,
                41, 51, 40, 39, 97, 268, 428, 429, 430, 431, 432, 433, 442,
                89, 170, 224, 225, 142, 161, 162, 105, 106, 60, 273, 104, 294,
                171, 112, 266, 217, 218, 219, 241, 264, 265, 280, 282, 425, 426, 427,
                140, 118, 119, 122, 274, 30,  # setpriority sched_setparam/setscheduler/setaffinity/setattr ioprio_set
                116, 33, 238, 239,  # syslog mknodat migrate_pages move_pages
                52, 53, 54, 55, 452, 88, 5, 6, 7, 14, 15, 16, 463, 466,  # chmod chown utime xattr
                180, 181, 182, 183, 184, 185, 186, 187, 188, 189, 190, 191, 192, 193, 194, 195, 196, 197,  # IPC
                27]),  # inotify_add_watch
}
_BPF_LD_ABS, _BPF_JEQ, _BPF_JGE, _BPF_JSET, _BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_KILL_PROCESS, _RET_ERRNO, _RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_EPERM, _ENOSYS = 1, 38
_CLONE_THREAD = 0x00010000


def seccomp_program(arch: str, pid: int) -> list[tuple[int, int, int, int]]:
    """The BPF filter as (code, jt, jf, k) rows: deny process creation, exec, sockets, signals to
    other processes, limit changes and administrative syscalls; allow everything else."""
    table = _SYSCALLS[arch]
    deny = (_BPF_RET, 0, 0, _RET_ERRNO | _EPERM)
    prog = [(_BPF_LD_ABS, 0, 0, 4), (_BPF_JEQ, 1, 0, _AUDIT_ARCH[arch]), (_BPF_RET, 0, 0, _RET_KILL_PROCESS),
            (_BPF_LD_ABS, 0, 0, 0)]
    if arch == "x86_64":  # the x32 ABI aliases every syscall at nr | 0x40000000
        prog += [(_BPF_JGE, 0, 1, 0x40000000), deny]
    # clone is allowed for threads only; clone3 answers ENOSYS so glibc falls back to clone.
    prog += [(_BPF_JEQ, 0, 4, table["clone"]), (_BPF_LD_ABS, 0, 0, 16), (_BPF_JSET, 0, 1, _CLONE_THREAD),
             (_BPF_RET, 0, 0, _RET_ALLOW), deny]
    prog += [(_BPF_JEQ, 0, 1, table["clone3"]), (_BPF_RET, 0, 0, _RET_ERRNO | _ENOSYS)]

    def allow_if_arg_equals(nr: int, index: int, value: int) -> list[tuple[int, int, int, int]]:
        low = 16 + 8 * index
        return [(_BPF_JEQ, 0, 6, nr), (_BPF_LD_ABS, 0, 0, low), (_BPF_JEQ, 0, 3, value & 0xFFFFFFFF),
                (_BPF_LD_ABS, 0, 0, low + 4), (_BPF_JEQ, 0, 1, value >> 32), (_BPF_RET, 0, 0, _RET_ALLOW), deny]

    prog += allow_if_arg_equals(table["kill"], 0, pid)  # signals to itself only
    prog += allow_if_arg_equals(table["tgkill"], 0, pid)
    prog += allow_if_arg_equals(table["prlimit64"], 2, 0)  # reading limits (new_limit NULL) only
    for nr in table["denied"]:
        prog += [(_BPF_JEQ, 0, 1, nr), deny]
    prog.append((_BPF_RET, 0, 0, _RET_ALLOW))
    return prog


def _apply_seccomp() -> None:
    import ctypes

    arch = os.uname().machine
    if arch not in _SYSCALLS:
        raise OSError(f"no seccomp syscall table for {arch}")
    program = seccomp_program(arch, os.getpid())

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(program))(*(SockFilter(*row) for row in program))
    fprog = SockFprog(len(program), filters)
    libc = _libc()
    if not _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1):
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    if libc.prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)):
        raise OSError(ctypes.get_errno(), "seccomp filter rejected")


if __name__ == "__main__":
    # Under Python 3.10 -I does not imply -P: drop this file's directory (rr/tasks) from sys.path so
    # that `import code` in a solution finds the standard library, not rr/tasks/code.py.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    if sys.argv[1:2] == ["supervise"]:
        _supervise()
    elif sys.argv[1:2] == ["run"]:
        _run(sys.argv[2] if len(sys.argv) > 2 else "")
    else:
        sys.exit("usage: sandbox.py supervise|run (internal entry points of rr.tasks.sandbox)")
