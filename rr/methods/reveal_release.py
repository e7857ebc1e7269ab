"""`reveal-release` in `rr compare`: the job's own release stage (Eq. 1), run or resumed in the job directory."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from rr.errors import RRError
from rr.methods import Method, MethodRun, ReleaseData


def run_method(job, method: Method, data: ReleaseData, out_dir: Path, progress: Callable[[str], None]) -> MethodRun:
    """The release stage's result is the method's: `rr run` and `rr compare` share release/ (no second run).

    Its wall time is release/timing.json's: the time of the release runs that did the work."""
    from rr.release.stage import run_release

    if data.source != "self-generated":
        raise RRError("compare.forget_data: external: reveal-release releases the job's self-generated forget set "
                      "(release/); compare it on external data with pem-negation and the fine-tuning methods, "
                      "or set compare.forget_data: self-generated")
    summary = run_release(job, progress)
    timing = job.read_json("release/timing.json") or {}
    # None: the release finished before rr recorded its timing (older job directories)
    return MethodRun(method.name, summary["final"], timing.get("wall_time_s"),
                     {"ledger": summary["ledger"], "steps": summary["steps"],
                      "stopped_reason": summary["stopped_reason"], "release_dir": str(job.dir / "release")})
