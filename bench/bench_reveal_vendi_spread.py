"""How much the Reveal report's Vendi check depends on its one random subsample of the forget set.

    python bench/bench_reveal_vendi_spread.py --job runs/quickstart [--draws 200]

The report compares the forget set, subsampled to the fixed-instruction baseline's count per context, with
that baseline's Vendi score. This redraws the subsample --draws times (one seed each) from a finished job's
forget set and prints one JSON line: the mean, sd, min and max of the subsample's Vendi score and the
fraction of draws above the baseline. Reads only the job directory (forget set, manifest, config); loads the
job's embedder, not its model.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from rr.config import load_config
from rr.job import Job
from rr.reveal.diversity import vendi_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, type=Path, help="a job directory whose Reveal has finished")
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    manifest_path = args.job / "reveal" / "manifest.json"
    if not manifest_path.exists():
        raise SystemExit(f"{manifest_path}: not found; run `rr reveal --output {args.job}` first")
    comparison = json.loads(manifest_path.read_text())["comparison"]
    records = [json.loads(line) for line in (args.job / "reveal" / "forget_set.jsonl").read_text().splitlines()]
    job = Job(load_config(args.job / "config.yaml", args.job))
    embeddings = job.embed([r["response"] for r in records])
    by_context: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_context.setdefault(r["context_id"], []).append(i)
    per_context = comparison["samples_per_context"]
    scores = []
    for seed in range(args.draws):
        rng = random.Random(seed)
        subsample = [i for rows in by_context.values() for i in rng.sample(rows, min(per_context, len(rows)))]
        scores.append(vendi_score(embeddings[sorted(subsample)]))
    scores = np.array(scores)
    baseline = comparison["fixed_instruction_vendi"]
    print(json.dumps({"draws": args.draws, "n": int(comparison["n_for_vendi"]),
                      "report_subsample": round(comparison["forget_set_vendi_subsampled"], 3),
                      "mean": round(float(scores.mean()), 3), "sd": round(float(scores.std()), 3),
                      "min": round(float(scores.min()), 3), "max": round(float(scores.max()), 3),
                      "fixed_instruction": round(baseline, 3), "fraction_above_fixed": round(float((scores > baseline).mean()), 3)}))


if __name__ == "__main__":
    main()
