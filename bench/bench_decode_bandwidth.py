"""How close a small-batch decode step's matmuls come to the machine's memory bandwidth: the linear layers of the
embedded model (SmolLM2-135M: 30 layers of q, k, v, o and the MLP's gate, up and down, then the tied output
head), fp32, run on `batch` rows as one decode step runs them, against reading the same bytes with a plain sum.

Prints one JSON line: the streaming read rate of a 1 GiB tensor, and for each batch size the step's linear time,
the weight bytes it read per second and the FLOP/s it reached. Best of 5 repeats; 2 threads as the jobs use.

    python bench/bench_decode_bandwidth.py [--batch-sizes 1 4 16 40]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def best_of(repeats: int, work) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 40])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from rr.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("embedded:smollm2")
    linears = [module.weight.detach() for module in model.modules() if isinstance(module, torch.nn.Linear)]
    head = model.get_output_embeddings().weight.detach()
    if not any(weight.data_ptr() == head.data_ptr() for weight in linears):  # a tied head is the embedding
        linears.append(head)
    weight_bytes = sum(w.numel() * w.element_size() for w in linears)
    flops_per_row = 2 * sum(w.numel() for w in linears)

    big = torch.ones(2**28)  # 1 GiB of fp32, far beyond the caches
    read_s = best_of(5, lambda: big.sum())
    rows = []
    for batch in args.batch_sizes:
        inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in linears}

        def step():
            for weight in linears:
                torch.nn.functional.linear(inputs[weight.shape[1]], weight)

        seconds = best_of(5, step)
        rows.append({"batch": batch, "linear_ms": round(seconds * 1000, 1),
                     "weights_gb_per_s": round(weight_bytes / seconds / 1e9, 1),
                     "gflop_per_s": round(batch * flops_per_row / seconds / 1e9, 1)})
    print(json.dumps({"benchmark": "decode_bandwidth", "threads": args.threads,
                      "weight_mb": round(weight_bytes / 1e6), "stream_read_gb_per_s": round(big.numel() * 4 / read_s / 1e9, 1),
                      "steps": rows}))


if __name__ == "__main__":
    main()
