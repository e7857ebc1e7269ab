"""The base model's greedy pass@1 on each code form over the quickstart's test problems: which forms count
(the base passes ≥ 5 of its items) before anything is unlearned.

Every test problem is asked in every form (rr/tasks/code_forms.py), answered greedily, and graded in the
sandbox; the table also gives what the test split's own rotation (form_items) would count. Prints a
Markdown table and one JSON line; --responses FILE keeps every prompt, answer and verdict.

    python bench/bench_code_forms.py --max-new-tokens 128 --batch-size 16 --responses /tmp/forms.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from rr.evaluation.metrics import wilson_interval
from rr.generation.hf import HFGenerator
from rr.models import load_model_and_tokenizer
from rr.tasks.base import SamplingParams
from rr.tasks.code import CodeTask, CodeTaskConfig
from rr.tasks.code_forms import CODE_FORMS, HELD_OUT_FORMS, FormItem, form_items

COUNTED_MIN_PASSES = 5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--responses", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    job = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    task = CodeTask(CodeTaskConfig(**job["task"]), seed=job.get("seed", 0))
    problems = task.problems("test")
    model, tokenizer = load_model_and_tokenizer(job["model"]["name_or_path"])
    generator = HFGenerator(model, tokenizer, batch_size=args.batch_size)  # renders each form's Prompt itself

    items = [FormItem(problem, form) for form in CODE_FORMS for problem in problems]
    responses: dict[str, str] = {}
    started = time.perf_counter()
    # One generate call per stop set: chat forms end at their code fence, completions where top-level code resumes.
    for stop in sorted({form.stop for form in CODE_FORMS.values()}):
        group = [item for item in items if CODE_FORMS[item.form].stop == stop]
        outputs = generator.generate([item.prompt() for item in group], SamplingParams(max_new_tokens=args.max_new_tokens, stop=stop))
        responses.update({item.id: completions[0] for item, completions in zip(group, outputs)})
    generation_s = time.perf_counter() - started

    started = time.perf_counter()
    programs = [item.program(responses[item.id]) for item in items]
    results = task.run_solutions([item.problem for item in items], programs)
    grading_s = time.perf_counter() - started
    passed = {item.id: result.passed for item, result in zip(items, results)}

    rotation = form_items(problems, "test")
    table = []
    for name, form in CODE_FORMS.items():
        mine = [item for item in items if item.form == name]
        n_pass = sum(passed[item.id] for item in mine)
        in_split = [item for item in rotation if item.form == name]
        split_pass = sum(passed[item.id] for item in in_split)
        low, high = wilson_interval(n_pass, len(mine))
        table.append({"form": name, "held_out": name in HELD_OUT_FORMS, "items": len(mine), "passed": n_pass,
                      "pass@1": n_pass / len(mine), "wilson95": [round(low, 3), round(high, 3)],
                      "empty_programs": sum(not programs[i] for i, item in enumerate(items) if item.form == name),
                      "split_items": len(in_split), "split_passed": split_pass,
                      "counts_in_split": split_pass >= COUNTED_MIN_PASSES})

    print(f"| form | held out | pass@1 ({len(problems)} problems) | Wilson 95% | no program | "
          f"test-split rotation: passed / items | counts (≥ {COUNTED_MIN_PASSES}) |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['form']} | {'yes' if row['held_out'] else ''} | {row['pass@1']:.3f} ({row['passed']}) | "
              f"[{row['wilson95'][0]:.3f}, {row['wilson95'][1]:.3f}] | {row['empty_programs']} | "
              f"{row['split_passed']} / {row['split_items']} | {'yes' if row['counts_in_split'] else 'no'} |")
    print(json.dumps({"problems": len(problems), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                      "generation_s": round(generation_s, 1), "grading_s": round(grading_s, 1), "forms": table}))
    if args.responses:
        with args.responses.open("w", encoding="utf-8") as out:
            for item, program, result in zip(items, programs, results):
                out.write(json.dumps({"id": item.id, "form": item.form, "prompt": item.prompt().to_json(),
                                      "response": responses[item.id], "program": program,
                                      "status": result.status, "passed": result.passed}) + "\n")


if __name__ == "__main__":
    main()
