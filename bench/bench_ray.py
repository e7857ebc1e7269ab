"""Ray executor throughput, as ratios measured in one run: arm evaluation (one Reveal round's generate call) on 1 vs
2 generator replicas, and the merge weight search with its Tune trials in parallel vs one candidate at a time.
Each replica is pinned to `--threads` torch threads, so 2 replicas use 2× the threads of 1.

    python bench/bench_ray.py [--repeats 2] [--threads 1] [--max-new-tokens 48]

On a 2-core machine a ratio near 1 is the expected, honest result: two replicas of one thread each have the
same two cores that one replica and the driver share. Results go into BENCHMARKS.md with this command.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


class ScoreByGeneration:
    """A weight-search stand-in task: greedy answers to the reveal contexts (the work a candidate's evaluation
    sends to the replicas), scored by how many look like code."""

    def __init__(self, contexts, max_new_tokens):
        self.prompts, self.max_new_tokens = [c.prompt for c in contexts], max_new_tokens

    def evaluate(self, model, split):
        from rr.tasks.base import Evaluation, SamplingParams

        answers = model.generate(self.prompts, SamplingParams(max_new_tokens=self.max_new_tokens))
        return Evaluation(sum("def " in a[0] for a in answers) / len(answers), 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    from rr.config import JobConfig
    from rr.job import Job
    from rr.reveal.search import instruction_prompt
    from rr.generation.base import request_seed
    from rr.tasks.base import SamplingParams

    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rr-ray-bench-", dir="/tmp"))
    data = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    data.update(output_dir=tempfile.mkdtemp(prefix="rr-bench-job-"), tracking={"enabled": False})
    data["compute"] = {"executor": "ray", "generator_replicas": 1, "max_generator_replicas": 2,
                       "replica_num_cpus": 0.5, "threads_per_replica": args.threads, "request_resources": False}
    job = Job(JobConfig.model_validate(data))
    executor = job.executor
    contexts = job.task.contexts("reveal")
    instructions = ["Write a Python function for this.", "Answer with code only.", "Explain, then give code.",
                    "Solve it step by step in Python."]
    prompts = [instruction_prompt(i, c) for i in instructions for c in contexts]
    seeds = [request_seed(0, "bench", p) for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    task = ScoreByGeneration(contexts[:4], args.max_new_tokens)

    def timed(fn) -> float:
        fn()  # warm-up: models loaded, adapters registered
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    arms = {}
    for replicas in (1, 2):
        executor._ensure_pool(replicas)
        arms[replicas] = timed(lambda: executor.generate(prompts, params, seeds))
    pem = _random_pem(job.model)
    weights = [-0.5, -1.0, -2.0, -4.0]

    def search(parallel):
        job.config.compute.parallel_candidates = parallel
        executor.search_weights(task, "validation", [], pem, weights, lambda w, e: None, lambda: False)

    search_times = {"parallel": timed(lambda: search(len(weights))), "one_at_a_time": timed(lambda: search(1))}
    result = {
        "cores": os.cpu_count(), "threads_per_replica": args.threads, "requests_per_round": len(prompts),
        "max_new_tokens": args.max_new_tokens, "candidates": len(weights),
        "arm_eval_s": {"1_replica": round(arms[1], 2), "2_replicas": round(arms[2], 2)},
        "arm_eval_speedup_2_vs_1": round(arms[1] / arms[2], 2),
        "weight_search_s": {k: round(v, 2) for k, v in search_times.items()},
        "weight_search_speedup_parallel_vs_serial": round(search_times["one_at_a_time"] / search_times["parallel"], 2),
    }
    print(json.dumps(result, indent=1))
    job.close()
    ray.shutdown()


def _random_pem(model):
    import torch

    from rr.release.ledger import Pem

    generator = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(4, m.in_features, generator=generator) * 0.05,
                      torch.randn(m.out_features, 4, generator=generator) * 0.05)
               for name, m in model.named_modules() if name.endswith(("q_proj", "v_proj"))}
    return Pem("bench-forget", "forget", 4, 8.0, ["q_proj", "v_proj"], tensors)


if __name__ == "__main__":
    main()
