"""A job's profile against the machine's limit: each phase's wall time next to the time its work would take at
this machine's matmul peak, measured in the same run for the dtype the job used.

Reads JOB_DIR/profile.jsonl (written by every `rr run`, `rr reveal`, `rr release`, `rr audit`; see
rr/core/profile.py), measures the dense matmul peak with the job's thread count, and prints a Markdown table (and
one JSON line with --json). Work is counted as FLOPs of the model's weights, 2 per parameter per token: prefill
over the body (the input embedding is a lookup, and only the last position reaches the output head), decode and
teacher-forced scoring over the body and the head, training 4 per parameter (forward, and the backward's
activation gradients; the LoRA's own gradients are negligible). Attention over the cache and padding are not
counted as work: they are part of what separates a phase from the limit.

    python bench/bench_profile.py runs/quickstart --threads 2
    python bench/bench_profile.py runs/quickstart --depth 2 --json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def matmul_peak(dtype: torch.dtype, threads: int, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` square matmuls of `size` in `dtype` on `threads` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def parameter_counts(name_or_path: str) -> tuple[int, int]:
    """(parameters of the body without the input embedding, parameters of the output head)."""
    from rr.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(name_or_path)
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once, as the embedding
    return total - embedding, head


def phase_flops(record: dict, body: int, head: int) -> float:
    return (2 * body * record.get("prefill_tokens", 0)
            + 2 * (body + head) * (record.get("generated_tokens", 0) + record.get("scored_tokens", 0))
            + 4 * (body + head) * record.get("trained_tokens", 0))


def table(records: list[dict], peak: float, body: int, head: int, depth: int) -> list[dict]:
    rows = []
    for record in records:
        if record["phase"].count("/") >= depth:
            continue
        flops = phase_flops(record, body, head)
        at_peak = flops / peak
        rows.append({"phase": record["phase"], "wall_s": record["wall_s"], "at_peak_s": round(at_peak, 1),
                     "of_limit": round(at_peak / record["wall_s"], 3) if record["wall_s"] else None,
                     **{k: record.get(k, 0) for k in ("prefill_tokens", "generated_tokens", "scored_tokens",
                                                      "trained_tokens")}})
    return rows


def markdown(rows: list[dict], peak: float, dtype: str, threads: int) -> str:
    lines = [f"matmul peak ({dtype}, {threads} threads): {peak / 1e9:.1f} GFLOP/s", "",
             "| phase | wall s | at peak s | % of limit | prefilled | generated | scored | trained |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = "" if r["of_limit"] is None else f"{100 * r['of_limit']:.0f}%"
        lines.append(f"| {r['phase']} | {r['wall_s']:.0f} | {r['at_peak_s']:.0f} | {share} | {r['prefill_tokens']:,} | "
                     f"{r['generated_tokens']:,} | {r['scored_tokens']:,} | {r['trained_tokens']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--depth", type=int, default=3, help="phases nested at most this deep (reveal/outer 1 round 1: 2)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from rr.config import load_config
    from rr.core.profile import read_profile

    config = load_config(args.job_dir / "config.yaml", args.job_dir)
    records = read_profile(args.job_dir / "profile.jsonl")
    body, head = parameter_counts(config.model.name_or_path)
    peak = matmul_peak(getattr(torch, args.dtype), args.threads)
    rows = table(records, peak, body, head, args.depth)
    print(markdown(rows, peak, args.dtype, args.threads))
    if args.json:
        print(json.dumps({"peak_flops": peak, "body_parameters": body, "head_parameters": head, "rows": rows}))


if __name__ == "__main__":
    main()
