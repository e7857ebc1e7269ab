"""The code grader's cost per solution against what it is compared with: the same programs run as plain,
unsandboxed `python -c` subprocesses (what a user without a sandbox would do), and the interpreter's own
start-up (`python -I -S -c pass`, the floor any process-per-solution grader pays). Every shipped problem's
reference solution is graded; all must pass. Prints a Markdown table and one JSON line.

    python bench/bench_grading.py --repeats 3 --workers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from rr.tasks.code_problems import check_program, load_builtin_problems
from rr.tasks.sandbox import run_many


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    problems = load_builtin_problems()
    items = [(p.reference_solution, check_program(p)) for p in problems]

    def sandboxed() -> None:
        results = run_many(items, max_workers=args.workers)
        failing = [p.id for p, r in zip(problems, results) if not r.passed]
        if failing:
            raise SystemExit(f"reference solutions not graded passed: {failing}")

    def plain_program(code: str, tests: str) -> None:
        done = subprocess.run([sys.executable, "-c", code + "\n" + tests], capture_output=True, timeout=60)
        if done.returncode != 0:
            raise SystemExit(f"a reference solution fails as a plain program: {done.stderr[-500:]!r}")

    def plain() -> None:
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda item: plain_program(*item), items))

    def startup() -> None:
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda _: subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True), items))

    rows = {}
    for name, function in (("rr sandbox (grade decided outside)", sandboxed), ("plain python -c, no sandbox", plain),
                           ("interpreter start-up only", startup)):
        times = [_timed(function) for _ in range(args.repeats)]
        rows[name] = statistics.median(times) / len(items) * 1000
    sandbox_ms = rows["rr sandbox (grade decided outside)"]
    print(f"{len(items)} reference solutions, {args.workers} workers, median of {args.repeats}\n")
    print("| how | ms per solution | sandbox ÷ this |\n|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.1f} | {sandbox_ms / ms:.2f} |")
    print(json.dumps({"solutions": len(items), "workers": args.workers, "ms_per_solution": rows}))


if __name__ == "__main__":
    main()
