"""Run untrusted Python (model-written code) against its tests in a separate, locked-down process.

Invariant 4 of ARCHITECTURE.md lives here. One run is three processes:

    caller ──► supervisor (`python -I -S sandbox.py supervise`, trusted, a child subreaper)
                  └─ fork: new session, empty cwd, rlimits, net namespace, parent-death signal
                     └─ exec runner (`python -I [-S] sandbox.py run`): Landlock, seccomp, socket patch,
                        then exec(code) and exec(tests) in a fresh namespace

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
- seccomp (x86_64, aarch64): no fork/exec (a fork bomb costs one PermissionError), no kill outside
  the process, no setrlimit, mount, ptrace, reboot, module loading, io_uring and similar.

This file imports only the standard library at top level: the supervisor and runner execute it
as a script under `python -I -S`, where the `rr` package is not importable.
"""

from __future__ import annotations

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
    """Execute `code`, then `test_code` in the same namespace, in a sandboxed subprocess.

    passed only when every statement of `test_code` ran without raising. `allow_site_packages`
    lets the tests import installed packages (MBPP+ test scripts import numpy); code under test
    gets no more rights than that.
    """
    if not isinstance(code, str) or not isinstance(test_code, str):
        raise _rr_error("run_in_sandbox: code and test_code must be strings")
    if not timeout_s > 0:
        raise _rr_error(f"run_in_sandbox: timeout_s must be > 0 seconds, got {timeout_s!r}")
    if int(memory_mb) < 64:
        raise _rr_error(f"run_in_sandbox: memory_mb must be ≥ 64 (the interpreter needs ~30 MB), got {memory_mb!r}")
    if os.name != "posix":
        raise _rr_error("run_in_sandbox: the code sandbox needs a POSIX system (Linux for full isolation)")

    import subprocess
    import tempfile

    base = tempfile.mkdtemp(prefix="rr-sandbox-")
    try:
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        request = {
            "code": code,
            "tests": test_code,
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
            verdict = json.loads(out.decode("utf-8", "replace").strip().splitlines()[-1])
        except (IndexError, ValueError):
            tail = err.decode("utf-8", "replace")[-_OUTPUT_TAIL_CHARS:]
            return SandboxResult(False, "error", f"the sandbox supervisor failed (exit {proc.returncode}): {tail}")
        status = verdict.get("status", "error")
        if status not in STATUSES:
            status = "error"
        return SandboxResult(status == "passed", status, str(verdict.get("detail", ""))[:_DETAIL_CHARS],
                             tuple(verdict.get("layers", ())))
    finally:
        _remove_tree(base)


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


def _remove_tree(path: str) -> None:
    """rmtree that also removes what the sandboxed code made unreadable (chmod 000 dirs)."""
    import shutil
    import stat

    def make_writable_and_retry(func, failed_path, _exc):
        try:
            os.chmod(os.path.dirname(failed_path), stat.S_IRWXU)
            if os.path.isdir(failed_path) and not os.path.islink(failed_path):
                os.chmod(failed_path, stat.S_IRWXU)
            func(failed_path)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)


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
    nonce = secrets.token_hex(16)
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
        os.write(payload_w, json.dumps({"code": request["code"], "tests": request["tests"],
                                        "nonce": nonce}).encode())
    except BrokenPipeError:
        pass
    finally:
        os.close(payload_w)

    timed_out = _wait_with_deadline(pid, started + timeout_s)
    elapsed = time.monotonic() - started
    _kill_group(pid)  # the runner is still an unreaped zombie, so its group id cannot have been reused
    _, wait_status = os.waitpid(pid, 0)
    _reap_all_children()

    os.set_blocking(result_r, False)
    try:
        raw = os.read(result_r, 1 << 16)
    except BlockingIOError:
        raw = b""
    os.close(result_r)
    verdict = _verdict(raw, nonce, wait_status, timed_out, timeout_s, elapsed,
                       _tail(os.path.join(base, "stderr.txt")))
    sys.stdout.write(json.dumps(verdict) + "\n")
    sys.stdout.flush()


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


def _wait_with_deadline(pid: int, deadline: float) -> bool:
    """Wait for the runner to exit without reaping it; True when the deadline came first, in which
    case the runner's whole process group has been killed."""
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = None
    try:
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_group(pid)
                return True
            if pidfd is not None:
                import select
                select.select([pidfd], [], [], remaining)
            else:
                time.sleep(min(remaining, 0.005))
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


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


def _verdict(raw: bytes, nonce: str, wait_status: int, timed_out: bool, timeout_s: float, elapsed: float,
             stderr_tail: str) -> dict:
    if timed_out:
        return {"status": "timeout", "detail": f"wall-clock limit of {timeout_s:g} s exceeded"}
    try:
        reported = json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        reported = None
    if isinstance(reported, dict) and reported.get("nonce") == nonce:
        return {k: reported.get(k) for k in ("status", "detail", "layers")}
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig == signal.SIGXCPU:
            return {"status": "timeout", "detail": f"CPU-time limit exceeded after {elapsed:.1f} s"}
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        hint = " (a file or the output exceeded the size limit)" if sig == signal.SIGXFSZ else ""
        return {"status": "error", "detail": f"killed by {name}{hint}: {stderr_tail}"}
    return {"status": "error",
            "detail": f"exited (code {os.WEXITSTATUS(wait_status)}) before the tests finished: {stderr_tail}"}


# ---------------------------------------------------------------------------------------------
# Runner: the process that executes untrusted code. Locks itself down first.
# ---------------------------------------------------------------------------------------------

def _run(pre_exec_layers: str) -> None:
    import builtins
    import traceback

    payload = json.loads(sys.stdin.buffer.read())
    nonce = payload.pop("nonce")
    null = os.open(os.devnull, os.O_RDONLY)  # input() in the solution gets EOF, not the payload pipe
    os.dup2(null, 0)
    os.close(null)

    layers = [layer for layer in pre_exec_layers.split(",") if layer]
    for name, apply in (("landlock", _apply_landlock), ("seccomp", _apply_seccomp),
                        ("socket-patch", _patch_socket)):
        try:
            apply()
            layers.append(name)
        except Exception:  # noqa: BLE001 - a missing layer is reported in `layers`, not fatal
            pass

    status, detail = _execute(payload["code"], payload["tests"], builtins, traceback)
    result = json.dumps({"nonce": nonce, "status": status, "detail": detail[:_DETAIL_CHARS], "layers": layers})
    try:
        os.write(3, result.encode())
    except OSError:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - output is best effort; the verdict is already written
            pass
    os._exit(0)


def _execute(code: str, tests: str, builtins, traceback) -> tuple[str, str]:
    # __name__ is not "__main__": demo blocks (`if __name__ == "__main__": ...`) do not run.
    namespace = {"__name__": "__solution__", "__builtins__": builtins}
    for label, source in (("solution", code), ("tests", tests)):
        try:
            exec(compile(source, f"<{label}>", "exec"), namespace)
        except MemoryError:
            return "memory", f"MemoryError in the {label} (address-space limit)"
        except AssertionError as exc:
            if label == "tests":
                line = _failing_line(exc, "<tests>", tests, traceback)
                return "failed", f"assertion failed: {line}" + (f" ({exc})" if str(exc) else "")
            return "error", f"AssertionError while defining the solution: {exc}"
        except SyntaxError as exc:
            return "error", f"SyntaxError in the {label}: {exc.msg} (line {exc.lineno})"
        except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt are failures too
            line = _failing_line(exc, f"<{label}>", source, traceback)
            return "error", f"{type(exc).__name__} in the {label}: {exc} [at: {line}]"
    return "passed", "all tests passed"


def _failing_line(exc: BaseException, filename: str, source: str, traceback) -> str:
    lines = source.splitlines()
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename == filename and frame.lineno and 0 < frame.lineno <= len(lines):
            return lines[frame.lineno - 1].strip()
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
        allow(os.getcwd(), fs)
        readable = set(filter(os.path.isdir, sys.path)) | {os.path.dirname(os.__file__)}  # stdlib, site
        readable |= {os.path.join(prefix, "lib") for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}}
        readable |= {"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/share/zoneinfo"}
        for directory in sorted(readable):
            allow(directory, _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR)
        allow(os.devnull, _LL_READ_FILE | _LL_WRITE_FILE | _LL_TRUNCATE)
        for device in ("/dev/urandom", "/dev/random", "/etc/localtime"):
            allow(device, _LL_READ_FILE)
        if not _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1):
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
        if libc.syscall(_LL_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint(0)):
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)


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
                248, 249, 250, 298, 303, 304, 321, 323, 425, 426, 427]),  # keys perf handles bpf uffd io_uring
    "aarch64": dict(
        clone=220, clone3=435, kill=129, tgkill=131, prlimit64=261,
        denied=[221, 281, 198, 199, 130, 138, 240, 424, 434, 438, 117, 270, 271, 164,
                41, 51, 40, 39, 97, 268, 428, 429, 430, 431, 432, 433, 442,
                89, 170, 224, 225, 142, 161, 162, 105, 106, 60, 273, 104, 294,
                171, 112, 266, 217, 218, 219, 241, 264, 265, 280, 282, 425, 426, 427]),
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
