"""Where a job's time goes: each phase's wall time and the work done in it (tokens prefilled, generated, scored,
trained), appended to the job's profile.jsonl as each phase ends. `bench/bench_profile.py` turns it into the
time the same work would take at this machine's matmul peak.

Counters are process-wide: the generators and the PEM trainer add to them wherever they run in this process
(work done on Ray replicas is not counted; its phases still get their wall time). A phase records the counters'
growth between its start and its end, so nested phases each hold their own and their children's work.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

# prefill: prompt tokens (non-pad) and the positions computed for them (pad included); generated: answer tokens
# and the decode positions computed (rows still in the batch at each step); scored: tokens teacher-forced without
# training (perplexity, token statistics); trained: tokens a training forward and backward passed over
COUNTERS = ("prefill_tokens", "prefill_positions", "generated_tokens", "decode_positions", "scored_tokens",
            "scored_positions", "trained_tokens", "trained_positions")

_totals = dict.fromkeys(COUNTERS, 0)
_sink: Path | None = None
_open: list[str] = []


def count(**amounts: int) -> None:
    """Add work to the process's counters (names from COUNTERS)."""
    for name, amount in amounts.items():
        _totals[name] += int(amount)


def totals() -> dict[str, int]:
    return dict(_totals)


@contextlib.contextmanager
def profiling(path: Path) -> Iterator[None]:
    """Phases that end inside this block are appended to `path` (a job's profile.jsonl); outside, none is kept."""
    global _sink
    previous, _sink = _sink, Path(path)
    try:
        yield
    finally:
        _sink = previous


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Record the wall time and the work of the block as phase `name` (nested in any open phase: "a/b"). A block
    that raises records nothing: a rerun does the work again and records it then."""
    before, started = dict(_totals), time.perf_counter()
    _open.append(name)
    try:
        yield
    finally:
        path = "/".join(_open)
        _open.pop()
    if _sink is None:
        return
    record = {"phase": path, "wall_s": round(time.perf_counter() - started, 3), "pid": os.getpid(),
              "ended_at": round(time.time(), 3), **{name: _totals[name] - before[name] for name in COUNTERS}}
    with open(_sink, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_profile(path: Path) -> list[dict]:
    """A profile.jsonl's records, in the order the phases ended; a line cut off by a kill is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("phase"), str):
            records.append(record)
    return records
