"""What the ray_jobs/ entrypoints share: parse --config/--output, run a stage on the Ray executor, exit codes.

`ray job submit --working-dir . -- python ray_jobs/release.py --config configs/quickstart.yaml` runs the
job's driver on the cluster; the driver joins it (RAY_ADDRESS) and places replicas, trials and trainers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

from rr.errors import RRError


def _progress(start: float) -> Callable[[str], None]:
    def emit(message: str) -> None:
        print(f"{time.time() - start:7.1f}s {message}", flush=True)
    return emit


def load_ray_job(argv: list[str] | None, description: str, extra: Callable[[argparse.ArgumentParser], None] = None):
    """(Job, args): the config with compute.executor forced to ray (these are Ray entrypoints; a change of
    executor alone resumes a job directory)."""
    from rr.config import JobConfig, config_data, load_config
    from rr.job import Job

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="job config (YAML), e.g. configs/quickstart.yaml")
    parser.add_argument("--output", default=None, help="job directory (overrides output_dir); on a cluster, shared "
                        "storage, so a resubmitted job resumes wherever its driver lands")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    config = load_config(args.config, args.output)
    if config.compute.executor != "ray":
        data = config_data(config)
        data["compute"]["executor"] = "ray"
        config = JobConfig.model_validate(data)
    return Job(config), args


def main(stage: Callable, argv: list[str] | None, description: str, extra=None) -> int:
    """Run `stage(job, args, progress)`; the tracking run and the executor's workers are closed however it ends."""
    start = time.time()
    job = None
    try:
        job, args = load_ray_job(argv, description, extra)
        print(f"rr job {job.config.name} → {job.dir} (executor: ray)", flush=True)
        stage(job, args, _progress(start))
    except AuditFailed:
        job.tracker.close()
        print(f"audit verdict: FAIL (total {time.time() - start:.0f}s)", flush=True)
        return 1
    except RRError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        if job is not None:
            job.tracker.close(failed=True)
        return 2
    except BaseException:
        if job is not None:
            job.tracker.close(failed=True)
        raise
    finally:
        if job is not None:
            job.close()
    job.tracker.close()
    print(f"total {time.time() - start:.0f}s", flush=True)
    return 0


def reveal_stage(job, args, progress) -> None:
    from rr.reveal.stage import run_reveal

    manifest = run_reveal(job, progress)
    job.tracker.reveal_finished(manifest)
    print(f"forget set: {manifest['size']} records in {job.dir / 'reveal' / 'forget_set.jsonl'}", flush=True)


def release_stage(job, args, progress) -> None:
    """Reveal (skipped when finished) then Release, as `rr run` does."""
    from rr.release.stage import run_release

    reveal_stage(job, args, progress)
    summary = run_release(job, progress)
    print((job.dir / "release" / "summary.md").read_text(), flush=True)
    print(json.dumps({"ledger": summary["ledger"]}), flush=True)


def evaluate_stage(job, args, progress) -> None:
    """Score base + the job's ledger (or the base model) on a split; written to evaluation/<split>.json."""
    from rr.evaluation.forms import evaluate_with_forms
    from rr.release.ledger import Ledger
    from rr.tasks.base import SPLITS

    if args.split not in SPLITS:
        raise RRError(f"--split {args.split!r}: choose one of {', '.join(SPLITS)}")
    ledger_path = job.dir / "release" / "ledger.json"
    composition = Ledger.load(ledger_path).resolve(ledger_path.parent) if ledger_path.exists() else []
    progress(f"evaluating {'base + ' + str(len(composition)) + ' ledger entries' if composition else 'the base model'} "
             f"on the {args.split} split")
    result, table = evaluate_with_forms(job.executor, job.task, args.split, composition)
    result["ledger_entries"] = len(composition)
    job.write_json(f"evaluation/{args.split}.json", result)
    if table:
        (job.dir / "evaluation" / f"{args.split}-forms.md").write_text(table)
        progress(table)
    print(json.dumps(result, indent=2), flush=True)


def audit_stage(job, args, progress) -> None:
    """`rr audit` on the Ray executor; exits 1 when the verdict fails."""
    from rr.audit.stage import run_audit

    result = run_audit(job, progress)
    print((job.dir / "audit" / "report.md").read_text(), flush=True)
    if not result["verdict"]["passed"]:
        raise AuditFailed()


class AuditFailed(Exception):
    """The audit ran and its verdict failed (exit 1, as `rr audit`)."""
