"""What Ray Train itself costs per fit: a TorchTrainer (gloo, one CPU worker, as RayExecutor.train_pem builds it) of a
no-op worker function, with Ray Train's default health-check interval (2 s) and with rr's (0.5 s,
rr.execution.ray.TRAIN_HEALTH_CHECK_ENV), in one local Ray. Each PEM and each audit relearning on Ray is one fit.

Prints one JSON line: each fit's seconds, by interval, each interval in a fresh local Ray of its own (its first fit,
which also starts the worker processes, not counted).

    python bench/bench_ray_train_start.py [--fits 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def fit_once() -> float:
    """One TorchTrainer.fit() of a no-op function in this process's Ray, timed from construction."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def noop(config):
        from ray import train

        train.report({"done": 1})

    start = time.perf_counter()
    TorchTrainer(noop, torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"noop-{time.time_ns()}", storage_path=tempfile.mkdtemp())).fit()
    return time.perf_counter() - start


def child(fits: int) -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    fit_once()  # the first fit also starts Ray's worker processes: not counted
    print(json.dumps([round(fit_once(), 2) for _ in range(fits)]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fits", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.fits)
        return
    from rr.execution.ray import TRAIN_HEALTH_CHECK_ENV

    name, value = TRAIN_HEALTH_CHECK_ENV
    results: dict[str, list[float]] = {}
    for label, interval in (("ray_default_2s", None), (f"rr_{value}s", value)):
        env = {k: v for k, v in os.environ.items() if k != name}
        if interval:
            env[name] = interval
        out = subprocess.run([sys.executable, __file__, "--child", "--fits", str(args.fits)], env=env, check=True,
                             capture_output=True, text=True).stdout
        results[label] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({"benchmark": "ray_train_start", "cores": os.cpu_count(), "fits_s": results,
                      "median_s": {k: statistics.median(v) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
