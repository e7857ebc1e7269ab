"""Weight search by runtime scaling vs. re-merging, and the ledger's size vs. full model copies.

A SmolLM2-135M-shaped Llama (random weights, tied embeddings) carries a ledger of `--entries` rank-8 PEMs on
q_proj/v_proj. Evaluating `--candidates` weights for the newest entry:
  * runtime: `ComposedModel.set_weight(-1, w)` + one forward over a fixed batch;
  * re-merge: deepcopy of the base model + merging W + Σ w·(α/r)·B·A into it + the same forward.
Both give the same logits (checked). Prints one JSON line with the times, memory and ratios.

    python bench/bench_ledger.py --candidates 6 --entries 5 --batch 4 --seq 64
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--entries", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from rr.release.ledger import ComposedModel, Pem, WeightedPem, merged_state_dict

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    pems = []
    for index in range(args.entries):
        tensors = {name: (torch.randn(args.rank, m.in_features, generator=generator) * 0.02,
                          torch.randn(m.out_features, args.rank, generator=generator) * 0.02)
                   for name, m in model.named_modules() if name.endswith(("q_proj", "v_proj"))}
        pems.append(Pem(f"pem{index}", "forget" if index % 2 == 0 else "retain", args.rank, 2.0 * args.rank,
                        ["q_proj", "v_proj"], tensors))
    previous = [WeightedPem(p, -1.0 if p.kind == "forget" else 0.5) for p in pems[:-1]]
    candidates = [-0.5 * (i + 1) for i in range(args.candidates)]
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator)

    def forward(m):
        with torch.no_grad():
            return m(input_ids=input_ids).logits[:, -1]

    forward(model)  # warm-up

    # runtime scaling: one live model, the newest entry's weight changed in place
    composed = ComposedModel(model)
    for pem, weight in previous + [WeightedPem(pems[-1], 0.0)]:
        composed.append(pem, weight)
    runtime_outputs, refold_s = [], 0.0
    start = time.perf_counter()
    for weight in candidates:
        tick = time.perf_counter()
        composed.set_weight(-1, weight)
        refold_s += time.perf_counter() - tick
        runtime_outputs.append(forward(model))
    runtime_s = time.perf_counter() - start
    composed.detach()

    # re-merge: a fresh copy of the base model per candidate, weights merged into it
    merged_outputs, merge_overhead_s = [], 0.0
    start = time.perf_counter()
    for weight in candidates:
        tick = time.perf_counter()
        copy_model = copy.deepcopy(model)
        merged = merged_state_dict(model, previous + [WeightedPem(pems[-1], weight)])
        with torch.no_grad():
            for name in pems[0].tensors:
                copy_model.get_parameter(f"{name}.weight").copy_(merged[f"{name}.weight"])
        merge_overhead_s += time.perf_counter() - tick
        merged_outputs.append(forward(copy_model))
        del copy_model, merged
    remerge_s = time.perf_counter() - start
    max_diff = max(float((a - b).abs().max()) for a, b in zip(runtime_outputs, merged_outputs))

    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ledger_bytes = sum(p.num_bytes() for p in pems)
    print(json.dumps({
        "bench": "ledger", "candidates": args.candidates, "entries": args.entries, "rank": args.rank,
        "batch": [args.batch, args.seq], "threads": args.threads,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "runtime_scaling_s": round(runtime_s, 3), "remerge_s": round(remerge_s, 3),
        "speedup": round(remerge_s / runtime_s, 2),
        "set_weight_overhead_s": round(refold_s, 4), "deepcopy_merge_overhead_s": round(merge_overhead_s, 3),
        "overhead_ratio": round(merge_overhead_s / max(refold_s, 1e-9), 1),
        "ledger_mb": round(ledger_bytes / 2**20, 2), "full_copies_mb": round(args.entries * model_bytes / 2**20, 1),
        "memory_ratio": round(args.entries * model_bytes / ledger_bytes, 1),
        "max_abs_logit_diff": max_diff,
    }))


if __name__ == "__main__":
    main()
