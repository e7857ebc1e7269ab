"""Hostile solutions against the sandbox and the trusted grader: none is graded passed, none changes
anything outside the sandbox (the test process's priority, CPUs, scheduler, I/O priority, signals,
files, sockets, processes), and genuine solutions are still graded right."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import tempfile
import textwrap

import pytest

import rr.tasks
from rr.tasks.sandbox import run_many

ADD_TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(-1, 1) == 0"
WRONG_ADD = "def add(a, b):\n    return a - b\n"
ESCAPED = "assert escape() == 'escaped'"  # passes only if the escape worked
PID = os.getpid()
_SIGNALS: list[int] = []


def _libc_syscall(nr: int, *args: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(nr, *(ctypes.c_long(a) for a in args))


def _ioprio() -> int:
    return _libc_syscall(252, 1, 0)  # ioprio_get(IOPRIO_WHO_PROCESS, self)


def _escape(body: str) -> str:
    """A solution whose escape() returns 'escaped' only when `body` ran without an error."""
    return ("import os, ctypes, signal, socket, subprocess\n"
            "libc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
            "def escape():\n" + textwrap.indent(textwrap.dedent(body).strip(), "    ")
            + "\n    return 'escaped'\n")


def _syscall_escape(expression: str) -> str:
    return _escape(f"if {expression} < 0:\n    raise OSError(ctypes.get_errno(), 'denied')")


FORGING = {
    "replaced builtins.exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\n" + WRONG_ADD,
    "replaced builtins.eval answers a constant": "import builtins\nbuiltins.eval = lambda *a, **k: 3\n",
    "wrapped builtins.compile compiles pass": (
        "import builtins\n_c = builtins.compile\n"
        "builtins.compile = lambda s, f, m, *a, **k: _c('pass' if m == 'exec' else 'None', f, m)\n" + WRONG_ADD),
    "patched json.dumps writes passed": (
        "import json\njson.dumps = lambda *a, **k: '{\"status\": \"passed\", \"detail\": \"ok\"}'\n" + WRONG_ADD),
    "stack walk writes an old-style verdict and exits": WRONG_ADD + textwrap.dedent("""
        import os, json
        os.write(3, json.dumps({'nonce': 'x', 'status': 'passed', 'detail': 'forged', 'layers': []}).encode())
        os._exit(0)
        """),
    "stack walk forges answers for the asked ids and exits": WRONG_ADD + textwrap.dedent("""
        import sys, os, json
        frame, calls = sys._getframe(), None
        while frame is not None:
            payload = frame.f_locals.get('payload')
            if isinstance(payload, dict) and 'calls' in payload:
                calls = payload['calls']
            frame = frame.f_back
        os.write(3, ''.join(json.dumps(['value', i, ['B', 1]]) + '\\n' for i, _ in calls).encode())
        os._exit(0)
        """),
    "patched encoder answers True": (
        "import sys\nsys.modules['__main__'].encode_value = lambda v, d=0: ['B', 1]\n" + WRONG_ADD),
    "replaced builtins.type hides a class": (
        "import builtins\nclass Yes:\n    def __eq__(self, other):\n        return True\n"
        "builtins.type = lambda value: int\ndef add(a, b):\n    return Yes()\n"),
    "__eq__ always true": "class Yes:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Yes()\n",
    "int subclass equal to everything": (
        "class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Int(0)\n"),
    "str subclass": "class S(str):\n    pass\ndef add(a, b):\n    return S('3')\n",
    "float subclass": "class F(float):\n    pass\ndef add(a, b):\n    return F(a + b)\n",
    "dict subclass in a list": "class D(dict):\n    pass\ndef add(a, b):\n    return [D()]\n",
    "self-referential list": "def add(a, b):\n    x = []\n    x.append(x)\n    return x\n",
    "huge answer": "def add(a, b):\n    return 'x' * (20 * 1024 * 1024)\n",
    "fake lines for unrequested ids": (
        "import os\nos.write(3, b'[\"value\", \"0123456789abcdef\", [\"i\", \"3\"]]\\n')\n" + WRONG_ADD),
    "a second layers record": "import os\nos.write(3, b'[\"layers\", [\"all\"]]\\n')\n" + WRONG_ADD,
    "old verdict on stdout": (
        "print('{\"status\": \"passed\", \"detail\": \"all tests passed\", \"layers\": []}')\n"
        "import os\nos._exit(0)\n"),
    "closed result fd": "import os\nos.close(3)\ndef add(a, b):\n    return a + b\n",
    "result fd pointed at stdout": "import os\nos.dup2(1, 3)\ndef add(a, b):\n    return a + b\n",
    "truncated record then exit": "import os\nos.write(3, b'[\"value\", \"')\nos._exit(0)\n",
    "deeply nested record": "import os\nos.write(3, b'[' * 200000 + b'\\n')\n" + WRONG_ADD,
    "giant integer answer": "import sys\nsys.set_int_max_str_digits(0)\ndef add(a, b):\n    return 1 << 5_000_000\n",
    "sys.exit(0) in the call": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "os._exit(0) before the calls": "import os\nos._exit(0)\n",
    "hostile exception message": (
        "class E(Exception):\n    def __str__(self):\n        raise RuntimeError('no')\n"
        "def add(a, b):\n    raise E()\n"),
}

_M61 = (1 << 61) - 1  # ints k * _M61 all hash to 0: a set of them is quadratic to build
_YES = "class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"



def _forge_answers(encoded: str) -> str:
    """A solution that finds the asked ids, writes `encoded` (tagged JSON) as each answer and exits."""
    return WRONG_ADD + textwrap.dedent(f"""
        import sys, os
        frame, calls = sys._getframe(), None
        while frame is not None:
            payload = frame.f_locals.get('payload')
            if isinstance(payload, dict) and 'steps' in payload:
                calls = [step[1] for step in payload['steps'] if step[0] == 'call']
            frame = frame.f_back
        for i in calls:
            os.write(3, ('["value", "%s", ' % i + {encoded!r} + ']\\n').encode())
        os._exit(0)
        """)


_COLLIDING = ", ".join(f'["i", "{k * _M61:x}"]' for k in range(1, 20001))

FORGING_WITH_TESTS = {  # (solution, tests): shapes that would let the sandbox decide, or tie up the grader
    "hash-colliding set answer": (_forge_answers(f'["S", [{_COLLIDING}]]'), ADD_TESTS),
    "hash-colliding dict answer": (_forge_answers('["d", [' + ", ".join(
        f'[["i", "{k * _M61:x}"], ["N"]]' for k in range(1, 20001)) + "]]"), ADD_TESTS),
    "hash-colliding list under set()": (f"def add(a, b):\n    return [k * {_M61} for k in range(20000)]\n",
                                        "assert set(add(1, 2)) == {3}"),
}

FORGING_SHAPES = {  # never reach the sandbox: the comparison would run on the solution's objects
    "comparison inside == True": (_YES + "def add(a, b):\n    return Yes()\n", "assert (add(1, 2) == 3) == True"),
    "comparison inside bool()": (_YES + "def add(a, b):\n    return Yes()\n", "assert bool(add(1, 2) == 3)"),
    "comparison inside all()": (_YES + "def add(a, b):\n    return [Yes()]\n", "assert all(x == 3 for x in add(1, 2))"),
    "isclose inside all()": ("import math\nmath.isclose = lambda *a, **k: True\ndef add(a, b):\n    return [0.0]\n",
                             "import math\nassert all(math.isclose(x, 3.0) for x in add(1, 2))"),
}

ESCAPING = {
    "setpriority(PRIO_USER, 0)": _escape("os.setpriority(os.PRIO_USER, 0, 7)"),
    "setpriority on the test process": _escape(f"os.setpriority(os.PRIO_PROCESS, {PID}, 7)"),
    "sched_setaffinity of the test process": _escape(f"os.sched_setaffinity({PID}, {{0}})"),
    "sched_setscheduler of the test process": _escape(
        f"os.sched_setscheduler({PID}, os.SCHED_IDLE, os.sched_param(0))"),
    "sched_setparam of the test process": _escape(f"os.sched_setparam({PID}, os.sched_param(0))"),
    "ioprio_set of the test process": _syscall_escape(f"libc.syscall(251, 1, {PID}, (3 << 13))"),
    "klogctl reads the kernel log": _syscall_escape("libc.klogctl(3, ctypes.create_string_buffer(4096), 4096)"),
    "mknod of /dev/mem": _escape("import stat\nos.mknod('mem', stat.S_IFCHR | 0o600, os.makedev(1, 1))"),
    "migrate_pages of the test process": _syscall_escape(f"libc.syscall(256, {PID}, 0, 0, 0)"),
    "fork": _escape("pid = os.fork()\nif pid == 0:\n    os._exit(0)"),
    "exec": _escape("os.execv('/bin/true', ['true'])"),
    "subprocess": _escape("subprocess.run(['true'], check=True)"),
    "ptrace of the test process": _syscall_escape(f"libc.ptrace(16, {PID}, 0, 0)"),
    "reads the test process's memory": _escape(f"open('/proc/{PID}/mem', 'rb').read(1)"),
    "reads the test process's environment": _escape(f"open('/proc/{PID}/environ', 'rb').read()"),
    "signals the test process": _escape(f"os.kill({PID}, signal.SIGUSR1)"),
    "fchmod of a readable stdlib file": _escape("fd = os.open(os.__file__, os.O_RDONLY)\nos.fchmod(fd, os.stat(fd).st_mode)"),
    "SysV shared memory segment that outlives the run": _syscall_escape("libc.shmget(0, 1 << 20, 0o1600)"),
    "POSIX message queue": _syscall_escape("libc.syscall(240, b'rr-corpus', 0o100 | 2, 0o600, None)"),
    "reads the shipped expected values": _escape(
        f"open({os.path.join(os.path.dirname(os.path.abspath(rr.tasks.__file__)), 'data', 'code_problems.json')!r}).read()"),
}

OUTSIDE = {  # the attempt itself may "succeed" silently; the outside state shows whether it reached out
    "SIGIO via F_SETOWN to the test process": WRONG_ADD + textwrap.dedent(f"""
        import os, fcntl, signal, time
        r, w = os.pipe()
        fcntl.fcntl(r, fcntl.F_SETOWN, {PID})
        fcntl.fcntl(r, 10, signal.SIGUSR1)  # F_SETSIG
        fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK)
        os.write(w, b'x')
        time.sleep(0.2)
        """),
}

HANGING = {
    "busy loop": "while True:\n    pass\n",
    "sleep": "import time\ntime.sleep(60)\n",
    "ignores SIGTERM and sleeps in a call": (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "def add(a, b):\n    time.sleep(60)\n"),
}

EXHAUSTING = {
    "memory": "def add(a, b):\n    return len(bytearray(2 * 1024 ** 3))\n",
    "disk": "def add(a, b):\n    with open('big', 'wb') as f:\n        f.write(b'x' * (64 * 1024 * 1024))\n    return 3\n",
    "file descriptors": "fds = [open('/dev/null') for _ in range(10000)]\n" + WRONG_ADD,
    "recursion": ("import sys\nsys.setrecursionlimit(10 ** 7)\n"
                  "def add(a, b):\n    return add(a, b) + 1\n"),
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        break\n" + WRONG_ADD,
    "thread bomb": ("import threading, time\nfor _ in range(10000):\n    try:\n"
                    "        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
                    "    except Exception:\n        break\n" + WRONG_ADD),
    "output flood": "def add(a, b):\n    while True:\n        print('x' * 100000)\n",
}

GENUINE = {
    "correct": ("def add(a, b):\n    return a + b\n", ADD_TESTS, "passed"),
    "correct, prints and reads input": (
        "def add(a, b):\n    print('hi')\n    return a + b\nif __name__ == '__main__':\n    add(input(), 1)\n",
        ADD_TESTS, "passed"),
    "wrong": (WRONG_ADD, ADD_TESTS, "failed"),
    "set and sorted wrappers": ("def f():\n    return [3, 1, 2]\n",
                                "assert set(f()) == {1, 2, 3}\nassert sorted(f()) == [1, 2, 3]", "passed"),
    "isclose": ("def f():\n    return 0.1 + 0.2\n", "import math\nassert math.isclose(f(), 0.3, rel_tol=1e-9)", "passed"),
    "not and an and chain": ("def f(x):\n    return x > 0\n", "assert not f(-1)\nassert f(1) and f(2)", "passed"),
}

CASES = ({f"forging: {k}": (v, ADD_TESTS) for k, v in FORGING.items()}
         | {f"forging: {k}": v for k, v in FORGING_WITH_TESTS.items()}
         | {f"outside: {k}": (v, ADD_TESTS) for k, v in OUTSIDE.items()}
         | {f"escaping: {k}": (v, ESCAPED) for k, v in ESCAPING.items()}
         | {f"hanging: {k}": (v, ADD_TESTS) for k, v in HANGING.items()}
         | {f"exhausting: {k}": (v, ADD_TESTS) for k, v in EXHAUSTING.items()})


def _xattrs(path: str) -> list[str]:
    try:
        return os.listxattr(path)
    except OSError:
        return []


def _sysv_shm_segments() -> list[str]:
    try:
        with open("/proc/sysvipc/shm") as table:
            return sorted(line.split()[1] for line in table.readlines()[1:])
    except OSError:
        return []


def _outside_state(canary_dir: str) -> dict:
    secret = os.path.join(canary_dir, "secret.txt")
    return {
        "canary metadata": (os.stat(secret).st_mode, os.stat(secret).st_mtime_ns, _xattrs(secret)),
        "sysv shm segments": _sysv_shm_segments(),
        "niceness": os.getpriority(os.PRIO_PROCESS, 0),
        "affinity": os.sched_getaffinity(0),
        "scheduler": os.sched_getscheduler(0),
        "ioprio": _ioprio(),
        "signals received": list(_SIGNALS),
        "canary dir": sorted(os.listdir(canary_dir)),
        "temp dirs left": sorted(d for d in os.listdir(tempfile.gettempdir()) if d.startswith("rr-sandbox-")),
    }


@pytest.fixture(scope="module")
def corpus(require_sandbox_layers):
    """Every hostile case, run in parallel once; the outside state before and after. Escapes are
    contained by seccomp, Landlock and dropped capabilities: a machine without them fails here."""
    require_sandbox_layers("seccomp", "landlock", "no-capabilities", "rlimits")
    previous = signal.signal(signal.SIGUSR1, lambda sig, frame: _SIGNALS.append(sig))
    canary = tempfile.mkdtemp(prefix="rr-corpus-canary-")
    with open(os.path.join(canary, "secret.txt"), "w") as secret:
        secret.write("rr-corpus-secret")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.setblocking(False)
    port = server.getsockname()[1]
    extra = {
        "escaping: connects to a local server": _escape(
            f"s = socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.sendall(b'x')"),
        "escaping: raw socket syscall": _syscall_escape("libc.syscall(41, 2, 1, 0)"),
        "escaping: writes a file outside": _escape(f"open({os.path.join(canary, 'escaped')!r}, 'w').write('x')"),
        "escaping: reads a secret file": _escape(f"open({os.path.join(canary, 'secret.txt')!r}).read()"),
        "escaping: environment secrets": _escape(
            "assert any(k.startswith(('AWS', 'HF_', 'MLFLOW')) for k in os.environ)"),
        "escaping: chmod of a file outside": _escape(f"os.chmod({os.path.join(canary, 'secret.txt')!r}, 0o666)"),
        "escaping: utime of a file outside": _escape(f"os.utime({os.path.join(canary, 'secret.txt')!r}, (0, 0))"),
        "escaping: setxattr of a file outside": _escape(
            f"os.setxattr({os.path.join(canary, 'secret.txt')!r}, 'user.rr', b'x')"),
        "escaping: inotify watch outside": _syscall_escape(
            f"libc.inotify_add_watch(libc.inotify_init(), {canary!r}.encode(), 0xfff)"),
    }
    cases = CASES | {name: (code, ESCAPED) for name, code in extra.items()}
    os.environ["AWS_SECRET_ACCESS_KEY"] = "rr-corpus-secret"
    before = _outside_state(canary)
    try:
        names = list(cases)
        results = run_many([cases[n] for n in names], max_workers=4, timeout_s=3.0, memory_mb=256)
        genuine = run_many([(code, tests) for code, tests, _ in GENUINE.values()], max_workers=4)
        connected = True
        try:
            server.accept()
        except BlockingIOError:
            connected = False
        after = _outside_state(canary)
    finally:
        os.environ.pop("AWS_SECRET_ACCESS_KEY", None)
        server.close()
        signal.signal(signal.SIGUSR1, previous)
        os.sched_setaffinity(0, before["affinity"])  # undo, should an escape have worked
        import shutil
        shutil.rmtree(canary)
    yield {"results": dict(zip(names, results)), "genuine": dict(zip(GENUINE, genuine)),
           "before": before, "after": after, "connected": connected}


def test_the_corpus_is_large_enough():
    assert len(CASES) + 5 >= 30


@pytest.mark.parametrize("name", list(CASES) + ["escaping: connects to a local server", "escaping: raw socket syscall",
                                                "escaping: writes a file outside", "escaping: reads a secret file",
                                                "escaping: environment secrets", "escaping: chmod of a file outside",
                                                "escaping: utime of a file outside",
                                                "escaping: setxattr of a file outside",
                                                "escaping: inotify watch outside"])
def test_hostile_solution_is_not_passed(corpus, name):
    result = corpus["results"][name]
    assert not result.passed and result.status != "passed", (name, result)
    assert {"seccomp", "landlock", "rlimits"} <= set(result.layers), result  # reported in every verdict
    if name.startswith("forging: hash-colliding") and "set()" not in name:
        assert result.status == "error" and "one hash" in result.detail, result  # refused, not hours of work
    if name.startswith("hanging"):
        assert result.status == "timeout", result
    if name.startswith("escaping"):
        assert result.status == "error" and "raised" in result.detail, result  # the attempt itself failed


@pytest.mark.parametrize("name", list(FORGING_SHAPES))
def test_test_shapes_that_the_sandbox_would_decide_fail_closed(name):
    code, tests = FORGING_SHAPES[name]
    result = run_many([(code, tests)])[0]
    assert result.status == "error" and "not a supported test shape" in result.detail, result


def test_nothing_outside_changed(corpus):
    assert corpus["after"] == corpus["before"]
    assert not corpus["connected"], "a sandboxed solution reached a local server"


def test_genuine_solutions_are_graded_right(corpus):
    got = {name: result.status for name, result in corpus["genuine"].items()}
    assert got == {name: expected for name, (_, _, expected) in GENUINE.items()}
