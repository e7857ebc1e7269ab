"""The code sandbox: correct code passes, wrong code fails, hostile code is contained (Invariant 4)."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from rr.errors import RRError
from rr.tasks.sandbox import run_in_sandbox, run_many, seccomp_program


@pytest.fixture(scope="module")
def layers() -> tuple[str, ...]:
    """The isolation layers this machine grants (Landlock and seccomp depend on the kernel)."""
    result = run_in_sandbox("x = 1", "assert x == 1")
    assert result.passed, result
    return result.layers


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
def test_fork_bomb_is_contained_and_the_machine_survives(layers):
    if os.geteuid() == 0 and "seccomp" not in layers:
        pytest.skip("root without seccomp: RLIMIT_NPROC does not bind root, a real fork bomb would run")
    before = _process_count()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_in_sandbox(bomb, "", timeout_s=2.0)
    assert result.status in ("timeout", "error")
    time.sleep(0.2)
    assert _process_count() <= before + 5  # nothing left behind
    assert run_in_sandbox("x = 2", "assert x == 2").passed  # and the next run still works


def test_subprocesses_cannot_be_started(layers):
    if "seccomp" not in layers:
        pytest.skip("seccomp is not available here")
    result = run_in_sandbox("import subprocess\nsubprocess.run(['true'])", "")
    assert result.status == "error" and "PermissionError" in result.detail


def test_relative_writes_land_in_a_temp_dir_that_is_removed():
    code = "import os\nopen('proof.txt', 'w').write('x')\nos.makedirs('sub/dir')\n"
    result = run_in_sandbox(code, "import os\nassert False, os.getcwd()")
    assert result.status == "failed"
    cwd = re.search(r"\((/[^)]*)\)", result.detail).group(1)
    assert os.path.basename(os.path.dirname(cwd)).startswith("rr-sandbox-")
    assert not os.path.exists(cwd) and not os.path.exists(os.path.dirname(cwd))


def test_writes_outside_the_temp_dir_fail(tmp_path, layers):
    target = tmp_path / "escape.txt"
    result = run_in_sandbox(f"open({str(target)!r}, 'w').write('escaped')\n", "")
    if "landlock" not in layers and os.access(tmp_path, os.W_OK):
        pytest.skip("no Landlock here: a process of the same user can write where the user can")
    assert result.status == "error"
    assert not target.exists()
    up = run_in_sandbox("open('../../escape.txt', 'w').write('escaped')\n", "")
    assert up.status == "error"


def test_files_outside_are_not_readable(tmp_path, layers):
    if "landlock" not in layers:
        pytest.skip("Landlock is not available here")
    secret = tmp_path / "token.txt"
    secret.write_text("rr-test-secret")
    result = run_in_sandbox(f"data = open({str(secret)!r}).read()\n", "assert 'secret' not in data")
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


def test_signals_to_other_processes_are_refused(layers):
    if "seccomp" not in layers and "landlock" not in layers:
        pytest.skip("neither seccomp nor Landlock scoping is available here")
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
