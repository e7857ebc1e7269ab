"""The code sandbox and its trusted grader: correct code passes, wrong code fails, hostile code is
contained (Invariants 4 and 7). The adversarial corpus is tests/test_sandbox_corpus.py."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from rr.errors import RRError
from rr.tasks.grading import UnsupportedTest, check_holds, decide, decode_answers, decode_value, plan_tests
from rr.tasks.sandbox import encode_value, landlock_read_grants, run_in_sandbox, run_many, seccomp_program


def test_correct_code_passes_and_wrong_code_fails():
    ok = run_in_sandbox("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3\nassert add(-1, 1) == 0")
    assert (ok.passed, ok.status) == (True, "passed")

    wrong = run_in_sandbox("def add(a, b):\n    return a - b\n", "assert add(1, 1) == 0\nassert add(1, 2) == 3")
    assert (wrong.passed, wrong.status) == (False, "failed")
    assert "add(1, 2) == 3" in wrong.detail  # names the failing test


def test_broken_code_is_an_error_not_a_pass():
    assert run_in_sandbox("def f(:\n    pass", "assert True").status == "error"
    assert run_in_sandbox("def f():\n    return 1", "assert g() == 1").status == "error"  # NameError
    # Leaving early is never a pass: SystemExit is caught, os._exit skips the verdict.
    assert run_in_sandbox("import sys\nsys.exit(0)", "assert False").status == "error"
    assert run_in_sandbox("import os\nos._exit(0)", "assert False").status == "error"


def test_demo_blocks_and_input_do_not_break_a_correct_solution():
    code = "def f():\n    return 1\n\nif __name__ == '__main__':\n    print(f(input()))\n"
    assert run_in_sandbox(code, "assert f() == 1").passed


def test_infinite_loop_costs_only_the_timeout():
    start = time.monotonic()
    result = run_in_sandbox("while True:\n    pass", "", timeout_s=1.0)
    assert result.status == "timeout"
    assert time.monotonic() - start < 10  # 1 s limit plus interpreter start-up on a busy machine


def test_sleeping_code_times_out():
    result = run_in_sandbox("import time\ntime.sleep(60)", "", timeout_s=1.0)
    assert result.status == "timeout"


def _process_count() -> int:
    return sum(entry.isdigit() for entry in os.listdir("/proc"))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to count processes")
def test_fork_bomb_is_contained_and_the_machine_survives(require_sandbox_layers):
    require_sandbox_layers("seccomp")  # RLIMIT_NPROC does not bind root: without seccomp a real bomb runs
    before = _process_count()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_in_sandbox(bomb, "", timeout_s=2.0)
    assert result.status in ("timeout", "error")
    time.sleep(0.2)
    assert _process_count() <= before + 5  # nothing left behind
    assert run_in_sandbox("x = 2", "assert x == 2").passed  # and the next run still works


def test_subprocesses_cannot_be_started(require_sandbox_layers):
    require_sandbox_layers("seccomp")
    result = run_in_sandbox("import subprocess\nsubprocess.run(['true'])", "")
    assert result.status == "error" and "PermissionError in the solution" in result.detail


def test_relative_writes_land_in_a_temp_dir_that_is_removed():
    code = "import os\nopen('proof.txt', 'w').write('x')\nos.makedirs('sub/dir')\n"
    result = run_in_sandbox(code, "import os\nassert os.getcwd() == ''")
    assert result.status == "failed"
    cwd = re.search(r"\(got '(/[^']*)'\)", result.detail).group(1)
    assert os.path.basename(os.path.dirname(cwd)).startswith("rr-sandbox-")
    assert not os.path.exists(cwd) and not os.path.exists(os.path.dirname(cwd))


def test_writes_outside_the_temp_dir_fail(tmp_path, require_sandbox_layers):
    require_sandbox_layers("landlock")  # without it a process of the same user writes where the user can
    target = tmp_path / "escape.txt"
    result = run_in_sandbox(f"open({str(target)!r}, 'w').write('escaped')\n", "")
    assert result.status == "error"
    assert not target.exists()
    up = run_in_sandbox("open('../../escape.txt', 'w').write('escaped')\n", "")
    assert up.status == "error"


def test_files_outside_are_not_readable(tmp_path, require_sandbox_layers):
    require_sandbox_layers("landlock")
    secret = tmp_path / "token.txt"
    secret.write_text("rr-test-secret")
    result = run_in_sandbox(f"data = open({str(secret)!r}).read()\n", "assert data == ''")
    assert result.status == "error" and "Permission" in result.detail


def test_environment_secrets_are_not_inherited(monkeypatch):
    for name in ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "rr-test-secret-value")
    code = ("import os\nleaked = [k for k, v in os.environ.items()\n"
            "          if 'rr-test-secret' in v or k.startswith(('AWS', 'HF_', 'MLFLOW'))]\n")
    result = run_in_sandbox(code, "assert leaked == [], leaked")
    assert result.passed, result.detail


def test_network_sockets_fail():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = (f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
                f"s.connect(('127.0.0.1', {port}))\ns.sendall(b'hello')\n")
        result = run_in_sandbox(code, "")
        assert result.status == "error"
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
        raw = run_in_sandbox("import socket\nsocket.create_connection(('127.0.0.1', %d))\n" % port, "")
        assert raw.status == "error"
    finally:
        server.close()


def test_signals_to_other_processes_are_refused(require_sandbox_layers):
    require_sandbox_layers("seccomp")
    # Signal 0 only probes: harmless even if the sandbox were to let it through.
    result = run_in_sandbox(f"import os\nos.kill({os.getpid()}, 0)\n", "")
    assert result.status == "error"


def test_a_2gb_allocation_is_a_memory_error():
    result = run_in_sandbox("block = bytearray(2 * 1024 ** 3)\n", "", memory_mb=512)
    assert result.status == "memory"
    assert not result.passed


def test_output_floods_are_cut_off():
    start = time.monotonic()
    result = run_in_sandbox("while True:\n    print('x' * 100000)\n", "", timeout_s=3.0)
    assert result.status in ("error", "timeout")
    assert time.monotonic() - start < 15


def test_run_many_keeps_input_order():
    items = [("x = %d" % i, "assert x == %d" % (i if i % 2 == 0 else -1)) for i in range(6)]
    results = run_many(items, max_workers=2)
    assert [r.passed for r in results] == [True, False, True, False, True, False]
    assert run_many([], max_workers=2) == []


def test_bad_arguments_raise_rr_error():
    with pytest.raises(RRError, match="timeout_s"):
        run_in_sandbox("x = 1", "", timeout_s=0)
    with pytest.raises(RRError, match="memory_mb"):
        run_in_sandbox("x = 1", "", memory_mb=1)
    with pytest.raises(RRError, match="max_workers"):
        run_many([("x = 1", "")], max_workers=0)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_seccomp_program_jumps_stay_inside_and_end_in_allow(arch):
    program = seccomp_program(arch, pid=4242)
    assert len(program) < 4096  # BPF_MAXINSNS
    for index, (code, jt, jf, _k) in enumerate(program):
        if code & 0x07 == 0x05:  # BPF_JMP: both targets land on an instruction
            assert index + 1 + max(jt, jf) < len(program)
    assert program[-1] == (0x06, 0, 0, 0x7FFF0000)


# ---- the trusted grader -------------------------------------------------------------------

def test_test_shapes_become_calls_and_trusted_expected_values():
    plan = plan_tests("import math\nassert f(1) == [1, 2]\nassert set(g()) == set((4, 5)) and not h()\n"
                      "assert math.isclose(area(2), 12.5, rel_tol=0.001)\nassert sorted(k()) == [1, 2]\n"
                      "x = 2\nassert -1 == f(0)\nassert ok(3)")
    assert plan.steps == ("import math", 0, 1, 2, 3, 4, "x = 2", 5, 6)  # in the written order
    assert [(c.expression, c.mode, c.expected, c.wrappers) for c in plan.checks] == [
        ("f(1)", "equal", [1, 2], ()), ("g()", "equal", {4, 5}, ("set",)), ("h()", "falsy", None, ()),
        ("area(2)", "isclose", 12.5, ()), ("k()", "equal", [1, 2], ("sorted",)), ("f(0)", "equal", -1, ()),
        ("ok(3)", "truthy", None, ())]
    set_check, isclose_check = plan.checks[1], plan.checks[3]
    assert check_holds(set_check, [5, 4, 4]) and not check_holds(set_check, [[4], 5])  # unhashable: a failure
    assert check_holds(isclose_check, 12.51) and not check_holds(isclose_check, "12.5")


@pytest.mark.parametrize("test", ["assert f(1) > 2", "assert f(1) == g(2)", "assert f(1) is None",
                                  "for x in [1]:\n    assert f(x) == 1", "assert f(1) == 1 or f(2) == 2",
                                  "assert math.isclose(f(1), 'a')", "assert bool(f(1) == 2)",
                                  "assert (f(1) == 2) == True", "assert all(math.isclose(x, 1) for x in [f(1)])"])
def test_other_test_shapes_fail_closed_naming_the_shape(test):
    with pytest.raises(UnsupportedTest, match="not supported|not a supported|non-numeric"):
        plan_tests(test)
    result = run_in_sandbox("def f(x):\n    return 1\ng = f\n", test)
    assert result.status == "error" and "supported" in result.detail or "non-numeric" in result.detail


def test_expected_values_never_enter_the_sandbox():
    # The solution searches every object it can reach for the expected value; it finds none.
    code = ("import gc, sys\nneedle = 'violet' + '-42'\n"
            "def secret_word():\n"
            "    for o in gc.get_objects():\n"
            "        items = o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else ()\n"
            "        for item in list(items):\n"
            "            if isinstance(item, str) and needle in item and item is not needle:\n"
            "                return item\n"
            "    return 'not found'\n")
    result = run_in_sandbox(code, "assert secret_word() == 'zebra-violet-42'")
    assert result.status == "failed" and "got 'not found'" in result.detail, result


def test_answers_are_exact_built_in_values_both_ways():
    value = [1, -2**70, 0.1, float("inf"), "é\ud800", b"\x00", True, None, (1, (2,)), {1: {"a"}},
             frozenset({3}), {"k": [1.5]}]
    assert decode_value(encode_value(value)) == value
    nan = decode_value(encode_value(float("nan")))
    assert nan != nan  # nan stays nan: it equals nothing, as in Python
    with pytest.raises(TypeError):
        encode_value(type("Int", (int,), {})(3))  # a subclass is not encoded


@pytest.mark.parametrize("record", [
    b'["value", "a", ["i", "3"]]\n["value", "a", ["i", "3"]]\n',  # two answers to one call
    b'["value", "zz", ["i", "3"]]\n',  # an id nobody asked for
    b'["value", "a", ["B", 2]]\n',  # a bool that is not 0/1
    b'["value", "a", ["i", "0x3"]]\n',  # not hex digits
    b'["value", "a", ["S", [["l", []]]]]\n',  # a set holding a list
    b'["value", "a", ["?", 1]]\n',  # an unknown tag
    b'["value", "a", ["Q", ["1", "0"]]]\n',  # a fraction over zero
    b'["value", "a", ["D", "1 "]]\n',  # a decimal Decimal.__str__ never writes
    b'["value", "a", ["D", "1E+9999999999999999999"]]\n',  # an exponent that overflows Decimal
    b'["value", "a", ["f", "0x1p+99999"]]\n',  # a float that overflows
    b'["value", "a", ["c", ["0x1p+99999", "0x0p+0"]]]\n',  # a complex part that overflows
    b'["value", "a", ["i", "' + b"f" * 4097 + b'"]]\n',  # an int longer than any literal it could equal
    b'["value", "a", NaN]\n',  # a bare JSON constant
    b'{"status": "passed"}\n',  # not a record
    b'["value", "a", ' + b'["l", [' * 150 + b'["N"]' + b']]' * 150 + b']\n',  # too deep
])
def test_malformed_answers_are_rejected(record):
    answers = decode_answers(b'["layers", ["x"]]\n' + record, ["a", "b"])
    assert answers.problem and "malformed" in answers.problem


def test_a_record_cut_off_is_missing_not_a_reason_to_hide_an_earlier_failure():
    plan = plan_tests("assert f() == 1\nassert g() == 2")
    raw = b'["layers", []]\n["value", "a", ["i", "2"]]\n["value", "b", ["i"'  # killed mid-record
    for report in ({"outcome": "exited", "exit_code": None, "signal": "SIGXCPU"}, {"outcome": "timeout"}):
        status, detail, _ = decide(plan, ["a", "b"], raw, report)
        assert status == "failed" and "f() == 1" in detail, (report, detail)
    status, _, _ = decide(plan, ["a", "b"], raw.rsplit(b"\n", 1)[0] + b"\n", {"outcome": "timeout"})
    assert status == "failed"
    assert decide(plan, ["a", "b"], b'["layers", []]\n["value", "a", ["i", "1"]]\n',
                  {"outcome": "timeout", "timeout_s": 5})[0] == "timeout"


def test_decorated_setup_and_any_decimal_context_are_graded_as_written():
    tests = "from dataclasses import dataclass\n@dataclass\nclass P:\n    x: int\nassert norm(P(3)) == 3"
    assert run_in_sandbox("def norm(p):\n    return abs(p.x)\n", tests).passed
    capitals_off = "import decimal\ndecimal.getcontext().capitals = 0\ndef big():\n    return decimal.Decimal('1E+5')\n"
    assert run_in_sandbox(capitals_off, "assert big() == 100000").passed


def test_timeouts_report_the_layers_in_force(sandbox_layers):
    result = run_in_sandbox("while True:\n    pass\n", "assert f() == 1", timeout_s=1.0)
    assert result.status == "timeout" and set(result.layers) == sandbox_layers


def test_tests_without_checks_are_not_a_pass():
    assert run_in_sandbox("x = 1", "y = 2").status == "error"


# ---- seccomp: every denied syscall, in the filter and live --------------------------------

# Numbers from asm/unistd_64.h and asm-generic/unistd.h, written out again here to check the table.
DENIED = {"setpriority": (141, 140), "sched_setparam": (142, 118), "sched_setscheduler": (144, 119),
          "sched_setaffinity": (203, 122), "sched_setattr": (314, 274), "ioprio_set": (251, 30),
          "syslog": (103, 116), "mknodat": (259, 33), "migrate_pages": (256, 238), "move_pages": (279, 239),
          "fork": (57, None), "execve": (59, 221), "socket": (41, 198), "ptrace": (101, 117),
          "process_vm_readv": (310, 270), "setrlimit": (160, 164), "mount": (165, 40), "bpf": (321, 280),
          "keyctl": (250, 219), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
          "io_uring_setup": (425, 425), "mknod": (133, None),
          "chmod": (90, None), "fchmod": (91, 52), "fchmodat": (268, 53), "fchownat": (260, 54),
          "utimensat": (280, 88), "setxattr": (188, 5), "fremovexattr": (199, 16), "shmget": (29, 194),
          "shmat": (30, 196), "semget": (64, 190), "msgget": (68, 186), "mq_open": (240, 180),
          "inotify_add_watch": (254, 27)}


def _run_bpf(program, arch_value: int, nr: int, args=(0,) * 6) -> int:
    """Evaluate the filter on one syscall (struct seccomp_data: nr, arch, ip, args)."""
    data = nr.to_bytes(4, "little") + arch_value.to_bytes(4, "little") + bytes(8)
    data += b"".join((a & (2**64 - 1)).to_bytes(8, "little") for a in args)
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:
            acc = int.from_bytes(data[k:k + 4], "little")
        elif code == 0x06:
            return k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        pc += 1


@pytest.mark.parametrize("arch,arch_value,column", [("x86_64", 0xC000003E, 0), ("aarch64", 0xC00000B7, 1)])
@pytest.mark.parametrize("name", sorted(DENIED))
def test_seccomp_program_denies_each_syscall(arch, arch_value, column, name):
    nr = DENIED[name][column]
    if nr is None:
        pytest.skip(f"{arch} has no {name} syscall")  # aarch64 has only the *at variants and clone
    program = seccomp_program(arch, pid=4242)
    assert _run_bpf(program, arch_value, nr) == 0x00050001, f"{name} ({nr}) is not answered EPERM"
    assert _run_bpf(program, arch_value, 0 if column == 0 else 63) == 0x7FFF0000  # read is allowed


_PROBES = {  # args harmless even if the call went through (the process itself, no-op values)
    "setpriority": (0, 0, 0), "sched_setparam": (0, "param"), "sched_setscheduler": (0, 0, "param"),
    "sched_setaffinity": (0, 8, "mask"), "sched_setattr": (0, "attr", 0), "ioprio_set": (1, 0, 4 | (2 << 13)),
    "syslog": (10, 0, 0), "mknod": ("name", 0o10600, 0), "mknodat": (-100, "name", 0o10600, 0),
    "migrate_pages": (0, 0, 0, 0), "move_pages": (0, 0, 0, 0, 0, 0),
    # no such file / bad sizes / bad fd if they went through: nothing is changed or created
    "fchmodat": (-100, "name", 0o600, 0), "utimensat": (-100, "name", 0, 0), "setxattr": ("name", "name", 0, 0, 0),
    "shmget": (0, 0, 0), "msgget": (0, 0), "mq_open": ("name", 0, 0, 0), "inotify_add_watch": (-1, "name", 1),
}


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the live probes use x86_64 syscall numbers")
def test_each_newly_denied_syscall_fails_in_the_sandbox(require_sandbox_layers):
    require_sandbox_layers("seccomp")
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
            "param = ctypes.byref(ctypes.c_int(0))\nmask = ctypes.byref(ctypes.c_ulong(2**64 - 1))\n"
            "attr = ctypes.byref((ctypes.c_uint32 * 12)(48))\nname = b'node'\n"
            "def probe(nr, *args):\n"
            "    if libc.syscall(nr, *[a if not isinstance(a, int) else ctypes.c_long(a) for a in args]) < 0:\n"
            "        return ctypes.get_errno()\n    return 0\n")
    args = {name: ", ".join(str(a) for a in values) for name, values in _PROBES.items()}
    items = [(code, f"assert probe({DENIED[name][0]}, {args[name]}) == 1") for name in _PROBES]
    results = run_many(items, max_workers=4)
    assert {name: r.status for name, r in zip(_PROBES, results)} == {name: "passed" for name in _PROBES}, \
        [(name, r.detail) for name, r in zip(_PROBES, results) if not r.passed]


def test_landlock_never_grants_the_rr_package_beneath_a_library_dir(tmp_path):
    # pip install . puts rr (and its shipped problems' expected values) in <venv>/lib/.../site-packages,
    # beneath sys.prefix/lib, which the runner may read: it is granted around, entry by entry.
    site = tmp_path / "lib" / "python3" / "site-packages"
    for path in ("rr/tasks/data", "numpy", "other"):
        (site / path).mkdir(parents=True)
    (site / "six.py").write_text("")
    (tmp_path / "lib" / "libpython.so").write_text("")
    grants = dict(landlock_read_grants({str(tmp_path / "lib"), str(site), "/usr/lib"}, str(site / "rr")))
    assert grants[str(site / "numpy")] is True and grants[str(site / "six.py")] is False
    assert grants[str(tmp_path / "lib" / "libpython.so")] is False and grants["/usr/lib"] is True
    assert not any(path == str(tmp_path / "lib") or path.startswith(str(site / "rr")) or path == str(site)
                   for path in grants)
