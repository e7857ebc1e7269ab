"""Times the Vendi score of 100,000 × 768 embeddings, and scoring 32 new rows against them via RunningGram.

    python bench/bench_vendi.py [--rows 100000] [--dim 768] [--new-rows 32] [--repeats 3] [--blas-threads N]

Prints one JSON line, with the BLAS in use (threadpoolctl) when available. Times are the median
of the repeats; `incremental_speedup` is full recompute of D ∪ y over RunningGram.vendi_with(y).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from rr.reveal.diversity import RunningGram, vendi_score


def _median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _blas_info() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{k: pool.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for pool in threadpool_info()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--new-rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="cap BLAS threads (threadpoolctl); on busy shared cores 1 thread is often faster")
    args = parser.parse_args()
    if args.blas_threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads)

    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    new_rows = rng.standard_normal((args.new_rows, args.dim), dtype=np.float32)

    vendi_seconds, vendi = _median_seconds(lambda: vendi_score(embeddings), args.repeats)
    running = RunningGram(args.dim)
    add_seconds, _ = _median_seconds(lambda: RunningGram(args.dim).add(embeddings), 1)
    running.add(embeddings)
    with_seconds, vendi_with = _median_seconds(lambda: running.vendi_with(new_rows), args.repeats)

    print(json.dumps({
        "bench": "vendi", "rows": args.rows, "dim": args.dim, "blas_threads": args.blas_threads, "new_rows": args.new_rows, "repeats": args.repeats,
        "vendi_score_s": round(vendi_seconds, 4), "running_gram_add_s": round(add_seconds, 4),
        "vendi_with_s": round(with_seconds, 4), "incremental_speedup": round(vendi_seconds / with_seconds, 1),
        "vendi": round(vendi, 3), "vendi_with": round(vendi_with, 3),
        "cpu_count": os.cpu_count(), "numpy": np.__version__, "blas": _blas_info(),
    }))


if __name__ == "__main__":
    main()
