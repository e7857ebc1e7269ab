"""Generator throughput on the embedded model: batched vs one prompt at a time, same decode call and max_new_tokens.

Prints one JSON line: responses/s and non-pad tokens/s for batch 1 and each batch size, their ratios,
Reveal arms scored per minute at the quickstart's settings, and what dropping finished requests from a
batch saves (the largest batch size with and without it, same prompts and answers).

    python bench/bench_generation.py --batch-sizes 8 32 --prompts 32 --max-new-tokens 64
    python bench/bench_generation.py --batch-sizes 40 --prompts 40 --max-new-tokens 192 --stop-at-code-fence
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arm-contexts", type=int, default=8, help="contexts answered per arm (quickstart)")
    parser.add_argument("--stop-at-code-fence", action="store_true",
                        help="answers end at their code block's closing fence, as in the code task's evaluation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rr.generation.hf import HFGenerator
    from rr.models import load_model_and_tokenizer
    from rr.tasks.base import SamplingParams
    from rr.tasks.code import CodeTask, CodeTaskConfig
    from rr.tasks.code_problems import CODE_STOP

    model, tokenizer = load_model_and_tokenizer("embedded:smollm2")
    task = CodeTask(CodeTaskConfig(), seed=0)
    contexts = (task.contexts("reveal") + task.contexts("validation") + task.contexts("test"))[:args.prompts]
    prompts = [c.prompt for c in contexts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0,
                            stop=CODE_STOP if args.stop_at_code_fence else ())
    answers = {}

    def measure(batch_size: int, shrink_finished: bool = True) -> dict:
        generator = HFGenerator(model, tokenizer, batch_size=batch_size, shrink_finished=shrink_finished)
        generator.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
        start = time.perf_counter()
        outputs = generator.generate(prompts, params)
        seconds = time.perf_counter() - start
        tokens = generator.count_tokens([o[0] for o in outputs])
        answers[(batch_size, shrink_finished)] = outputs
        return {"batch_size": batch_size, "seconds": round(seconds, 2),
                "responses_per_s": round(len(prompts) / seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
                "non_pad_tokens": tokens}

    single = measure(1)
    batched = [measure(b) for b in args.batch_sizes]
    best = max(batched, key=lambda r: r["tokens_per_s"])
    largest = max(args.batch_sizes)
    unshrunk = measure(largest, shrink_finished=False)
    shrunk = next(r for r in batched if r["batch_size"] == largest)
    arms_per_minute = 60 * best["responses_per_s"] / args.arm_contexts
    print(json.dumps({
        "benchmark": "generation", "model": "SmolLM2-135M-Instruct (embedded)", "threads": args.threads,
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "stop_at_code_fence": args.stop_at_code_fence,
        "one_at_a_time": single, "batched": batched,
        "tokens_per_s_ratio": {r["batch_size"]: round(r["tokens_per_s"] / single["tokens_per_s"], 2) for r in batched},
        "arms_scored_per_minute": round(arms_per_minute, 2),
        "arms_per_minute_note": f"{args.arm_contexts} greedy answers per arm at the best batch size; "
                                "relevance and Vendi scoring are negligible beside generation",
        "finished_rows_leave_the_batch": {
            "batch_size": largest, "seconds_with": shrunk["seconds"], "seconds_without": unshrunk["seconds"],
            "speedup": round(unshrunk["seconds"] / shrunk["seconds"], 2),
            "same_answers": answers[(largest, True)] == answers[(largest, False)]},
    }))


if __name__ == "__main__":
    main()
