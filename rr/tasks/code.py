"""The code task (papers/002 §4): forget writing Python, keep arithmetic word problems.

Forget score: pass@1 (greedy) of the model's code on held-out problems, executed in the sandbox
(rr/tasks/sandbox.py). Utility score: exact-match accuracy on arithmetic word problems. Also
reported: perplexity on general prose.

Embedded data (source="builtin"), all written for rr and shipped in rr/tasks/data/:
- code_problems.json: 145 MBPP-style problems (a one-sentence task, the function name, three
  assert tests and a reference solution that a test runs against its own tests);
- arithmetic word problems generated from the seed (rr/tasks/arithmetic.py);
- general_text.txt: encyclopedia-style paragraphs on geography, history, nature and everyday life,
  one per line, for the test split's perplexity; general_text_validation.txt: others like them for the
  validation split's, where weights are chosen (a weight is never chosen on the test text).
With source="hf" the real datasets are used instead (rr/tasks/loaders.py): MBPP for the three
code splits, optionally MBPP+ on the test split, and GSM8K for arithmetic.
"""

from __future__ import annotations

import random
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rr.core.prompt import as_request
from rr.errors import RRError
from rr.evaluation.metrics import wilson_interval
from rr.tasks.arithmetic import ArithmeticItem, arithmetic_prompt, generate_arithmetic_splits, is_correct
from rr.tasks.base import (SPLITS, Context, Evaluation, Example, ModelHandle, SamplingParams, StopEarly, check_forms,
                           check_split, generate_each)
from rr.tasks.code_forms import (CODE_FORMS, FORMS_BY_SPLIT, FRAMED_FORMS, HELD_OUT_FORMS, FormItem, form_items, framed_like,
                                 has_parts)
from rr.tasks.code_problems import (BUILTIN_PROBLEMS, CODE_STOP, GENERAL_TEXT, VALIDATION_GENERAL_TEXT, CodeProblem,
                                    check_program, code_likeness, load_builtin_problems, load_perplexity_paragraphs)
from rr.tasks.general_check import INSTRUCTIONS, arithmetic_check_items, load_instruction_items, run_general_check
from rr.tasks.sandbox import SandboxResult, run_many


class CodeTaskConfig(BaseModel):
    """The `task:` block for the code task. Sizes are per split; the splits never overlap."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=4096)  # as rr/config.py's models

    name: Literal["code"] = "code"
    source: Literal["builtin", "hf"] = "builtin"
    n_reveal_contexts: int = Field(40, ge=1, le=10_000, description="coding prompts Reveal answers")
    n_validation: int = Field(20, ge=1, le=10_000, description="problems the weight search scores candidates on")
    n_test: int = Field(40, ge=1, le=10_000, description="problems reports and promotion gates use")
    n_arithmetic_validation: int = Field(60, ge=1, le=10_000)
    n_arithmetic_test: int = Field(200, ge=1, le=10_000)
    n_retain_examples: int = Field(200, ge=1, le=10_000, description="arithmetic items retain PEMs train on")
    n_perplexity_paragraphs: int = Field(40, ge=1, le=10_000, description="test split: paragraphs of the shipped "
                                         "prose scored for perplexity")
    n_validation_perplexity_paragraphs: int = Field(
        20, ge=1, le=10_000, description="validation split: paragraphs of separate shipped prose scored for perplexity, "
        "so a weight chosen on it is not chosen on the test text")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="generation budget for code answers")
    arithmetic_max_new_tokens: int = Field(128, ge=1, le=32768)
    arithmetic_level: Literal["one-step", "mixed"] = Field(
        "mixed", description="one-step: single add/subtract/multiply problems; mixed: one- and two-step")
    sandbox_timeout_s: float = Field(5.0, gt=0, le=600)
    sandbox_memory_mb: int = Field(512, ge=64, le=65536)
    sandbox_workers: int = Field(2, ge=1, le=256, description="sandboxed test runs in parallel")
    mbpp_plus: bool = Field(False, description="source=hf only: also report pass@1 on MBPP+ (MBPP form) on the test split")
    n_general_check_instructions: int = Field(
        40, ge=0, le=10_000, description="test split: everyday instructions judged by a rule (rr/tasks/general_check.py)")
    n_general_check_arithmetic: int = Field(
        40, ge=0, le=10_000, description="test split: arithmetic test items asked in two wordings no split uses")
    n_general_check_validation: int = Field(
        0, ge=0, le=10_000, description="validation split: everyday instructions of a second shipped set "
        "(general_check_validation.jsonl), judged by rule; release.min_general_check_ratio decides on them. "
        "0: none, the validation split scores the task alone")
    retain_in_forms: bool = Field(True, description="frame two in three retain items as the system-role and "
                                                    "few-shot development forms frame a coding request")
    forms: list[str] | None = Field(
        None, description="the forms to ask (rr/tasks/code_forms.py); default all ten. Each split asks those of "
                          "its forms listed here, so the list needs a form Reveal and validation use (e.g. mbpp)")
    forget_decision: Literal["pooled", "worst-form"] = Field(
        "pooled", description="the forget score of a split: pass@1 pooled over the items of all its forms, or "
                              "the highest pass@1 of any one form (the form that forgot least)")
    min_validation_items_per_form: int = Field(
        5, ge=1, le=10_000, description="each validation problem is asked in enough development forms that every "
                                        "form gets at least this many items (all forms when problems are few)")
    min_test_items_per_form: int = Field(
        20, ge=1, le=10_000, description="the same on the test split, over development and held-out forms (a "
                                         "counted test form needs 20)")

    @model_validator(mode="after")
    def _known_forms(self) -> "CodeTaskConfig":
        check_forms(self.forms, list(CODE_FORMS), FORMS_BY_SPLIT)
        return self

    @model_validator(mode="after")
    def _mbpp_plus_needs_hf(self) -> "CodeTaskConfig":
        if self.mbpp_plus and self.source != "hf":
            raise ValueError("task.mbpp_plus needs task.source: hf (MBPP+ is downloaded from the hub)")
        return self




# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------

class CodeTask:
    """Forget coding (pass@1 in the sandbox), keep arithmetic (accuracy) and prose (perplexity)."""

    name = "code"
    answer_stop = CODE_STOP
    held_out_forms = HELD_OUT_FORMS  # in the test split only
    form_metric = "pass@1"

    def __init__(self, config: CodeTaskConfig | None = None, seed: int = 0):
        self.config = config or CodeTaskConfig()
        self.seed = seed
        if self.config.source == "hf":
            self._problems, self._plus = self._hf_problem_splits()
            self._arithmetic, self._retain = self._hf_arithmetic_splits()
        else:
            self._problems, self._plus = self._builtin_problem_splits(), []
            self._arithmetic, self._retain = self._builtin_arithmetic_splits()
        self._paragraphs = {}  # split → the prose its perplexity is measured on (reveal: none)
        for split, path, key in (("validation", VALIDATION_GENERAL_TEXT, "n_validation_perplexity_paragraphs"),
                                 ("test", GENERAL_TEXT, "n_perplexity_paragraphs")):
            paragraphs, wanted = load_perplexity_paragraphs(path), getattr(self.config, key)
            if wanted > len(paragraphs):
                raise RRError(f"task.{key}: {wanted} asked, {path} has {len(paragraphs)} paragraphs; lower it")
            self._paragraphs[split] = paragraphs[:wanted]
        self._general_check = {}  # split → its everyday instructions
        for split, key in (("test", "n_general_check_instructions"), ("validation", "n_general_check_validation")):
            items, wanted = load_instruction_items(INSTRUCTIONS[split]), getattr(self.config, key)
            if wanted > len(items):
                raise RRError(f"task.{key}: {wanted} asked, {INSTRUCTIONS[split]} has {len(items)} instructions; "
                              "lower it")
            self._general_check[split] = items[:wanted]

    # ---- data splits ----------------------------------------------------------------------

    def _sizes(self) -> dict[str, int]:
        c = self.config
        return {"reveal": c.n_reveal_contexts, "validation": c.n_validation, "test": c.n_test}

    def _builtin_problem_splits(self) -> dict[str, list[CodeProblem]]:
        problems = load_builtin_problems()
        sizes = self._sizes()
        if sum(sizes.values()) > len(problems):
            raise RRError(f"task.n_reveal_contexts + task.n_validation + task.n_test = {sum(sizes.values())}, "
                          f"but {BUILTIN_PROBLEMS.name} has {len(problems)} problems; lower them or use source: hf")
        random.Random(f"rr-code-{self.seed}").shuffle(problems)
        splits, start = {}, 0
        for split in SPLITS:
            splits[split] = problems[start:start + sizes[split]]
            start += sizes[split]
        self._spare = problems[start:]
        return splits

    def _hf_problem_splits(self) -> tuple[dict[str, list[CodeProblem]], list[CodeProblem]]:
        from rr.tasks.loaders import load_mbpp, load_mbpp_plus

        field = {"reveal": "n_reveal_contexts", "validation": "n_validation", "test": "n_test"}
        source_split = {"reveal": "train", "validation": "validation", "test": "test"}
        splits = {}
        for split, size in self._sizes().items():
            # Forms reword a problem from its signature and behaviour clause: problems whose prompt does not
            # read "Write a function to …" (with a reference solution defining the entry point) are left out.
            problems = [p for p in load_mbpp(source_split[split]) if has_parts(p)]
            if size > len(problems):
                raise RRError(f"task.{field[split]}: {size} asked, MBPP {source_split[split]} has {len(problems)} "
                              "problems the forms can reword")
            random.Random(f"rr-code-{self.seed}-{split}").shuffle(problems)
            splits[split] = problems[:size]
            if split == "reveal":
                self._spare = problems[size:]  # MBPP train problems Reveal does not use
        plus: list[CodeProblem] = []
        if self.config.mbpp_plus:
            # Only MBPP+ problems drawn from MBPP's test split: none of them is a context or validation item.
            test_ids = {p.id.removeprefix("mbpp-") for p in load_mbpp("test")}
            plus = [p for p in load_mbpp_plus() if p.id.removeprefix("mbppplus-") in test_ids]
            random.Random(f"rr-code-{self.seed}-mbppplus").shuffle(plus)
            plus = plus[: self.config.n_test]
        return splits, plus

    def _builtin_arithmetic_splits(self) -> tuple[dict[str, list[ArithmeticItem]], list[ArithmeticItem]]:
        c = self.config
        per_split = max(c.n_retain_examples, c.n_arithmetic_validation, c.n_arithmetic_test, 200)
        generated = generate_arithmetic_splits(self.seed, per_split, c.arithmetic_level)
        retain = generated["train"][: c.n_retain_examples]
        return {"reveal": retain[: c.n_arithmetic_validation],  # diagnostics only: these are retain data
                "validation": generated["validation"][: c.n_arithmetic_validation],
                "test": generated["test"][: c.n_arithmetic_test]}, retain

    def _hf_arithmetic_splits(self) -> tuple[dict[str, list[ArithmeticItem]], list[ArithmeticItem]]:
        from rr.tasks.loaders import load_gsm8k

        c = self.config
        train, test = load_gsm8k("train"), load_gsm8k("test")
        if c.n_retain_examples + c.n_arithmetic_validation > len(train):
            raise RRError(f"task.n_retain_examples + task.n_arithmetic_validation exceed GSM8K train ({len(train)})")
        if c.n_arithmetic_test > len(test):
            raise RRError(f"task.n_arithmetic_test: {c.n_arithmetic_test} asked, GSM8K test has {len(test)}")
        random.Random(f"rr-arithmetic-{self.seed}-train").shuffle(train)
        random.Random(f"rr-arithmetic-{self.seed}-test").shuffle(test)
        retain = train[: c.n_retain_examples]
        validation = train[c.n_retain_examples: c.n_retain_examples + c.n_arithmetic_validation]
        return {"reveal": retain[: c.n_arithmetic_validation], "validation": validation,
                "test": test[: c.n_arithmetic_test]}, retain

    def problems(self, split: str) -> list[CodeProblem]:
        """The coding problems of a split (reveal contexts, validation or test)."""
        return list(self._problems[check_split(split)])

    def spare_problems(self) -> list[CodeProblem]:
        """The shipped problems no split uses (builtin: those after the three splits; hf: MBPP train problems
        Reveal does not use), in a fixed order: the audit's relearn split and membership non-members."""
        return list(self._spare)

    def arithmetic_items(self, split: str) -> list[ArithmeticItem]:
        """The arithmetic items `evaluate` scores on a split ("reveal" reuses retain data)."""
        return list(self._arithmetic[check_split(split)])

    def form_items(self, split: str) -> list[FormItem]:
        """The (problem, form) items of a split: Reveal's contexts, or what `evaluate` generates and grades
        (the held-out forms only on the test split; rr/tasks/code_forms.py)."""
        split = check_split(split)
        minimum = {"reveal": 1, "validation": self.config.min_validation_items_per_form,
                   "test": self.config.min_test_items_per_form}[split]
        return form_items(self._problems[split], split, minimum, self.config.forms)

    # ---- the Task protocol ----------------------------------------------------------------

    def contexts(self, split: str) -> list[Context]:
        """One context per (problem, form) item: a one-turn form as its user text, any other form as its
        Prompt (Reveal's forms are the chat forms, FORMS_BY_SPLIT: a raw completion takes no instruction)."""
        return [form_context(item) for item in self.form_items(split)]

    def exemplars(self) -> list[Example]:
        """Reveal's contexts with their problems' reference solutions, in split order; Reveal shows the first
        `reveal.n_exemplars` of them to the instruction model."""
        return [Example(prompt=item.prompt().user, response=f"```python\n{item.problem.reference_solution.strip()}\n```")
                for item in self.form_items("reveal") if item.problem.reference_solution]

    def external_forget_examples(self) -> list[Example]:
        """Human-written forget data (the reveal problems' reference solutions) for the external-data
        baseline `pem-external` and the ablation of papers/002 Tables 5–6. Reveal sees only the few it
        shows as exemplars, never as forget data."""
        return self.exemplars()

    def relevance(self, contexts: Sequence[Context], responses: Sequence[str]) -> list[float]:
        if len(contexts) != len(responses):
            raise RRError(f"relevance: {len(contexts)} contexts but {len(responses)} responses; "
                          "pass one response per context")
        return [code_likeness(r) for r in responses]

    def retain_examples(self) -> list[Example]:
        """Worked answers to the retain arithmetic items. With retain_in_forms, items 3k+1 and 3k+2 are framed as
        the system-role and few-shot development forms frame a coding request (code_forms.framed_like; only
        the framings of task.forms), so the retain PEM keeps non-code answers in the forget data's framings."""
        framings = [f for f in FRAMED_FORMS if self.config.forms is None or f in self.config.forms]
        examples = []
        for index, item in enumerate(self._retain):
            prompt = arithmetic_prompt(item.question)
            slot = index % (len(framings) + 1)
            if self.config.retain_in_forms and slot:
                prompt = framed_like(framings[slot - 1], prompt)
            examples.append(Example(prompt=prompt, response=item.solution))
        return examples

    def evaluate(self, model: ModelHandle, split: str, stop_early: StopEarly | None = None) -> Evaluation:
        """pass@1 per form and pooled over the split's forms (the forget score: pooled, or the worst form with
        forget_decision: worst-form) and arithmetic accuracy (utility score) on `split`, greedy; perplexity
        on the general text. With mbpp_plus, the test split also reports pass@1 on MBPP+.

        With `stop_early` the code items are graded one answer batch (the forms that end alike) at a time and the
        scoring stops once the forget score can no longer stay at or under its limit; with a utility limit the
        arithmetic is asked first. Batches are the ones full scoring asks, so every answer is the same."""
        split = check_split(split)
        c = self.config
        items = self.form_items(split)
        arithmetic = self._arithmetic[split]
        n_code, n_arith = len(items), len(arithmetic)
        order = FORMS_BY_SPLIT[split]
        correct = None
        code_results: list[SandboxResult | None] = [None] * n_code

        def stopped(reason: str) -> Evaluation:
            graded = [result for result in code_results if result is not None]
            scored = {"code": [len(graded), n_code], "arithmetic": [0 if correct is None else n_arith, n_arith]}
            counts = {"code_passed": sum(r.passed for r in graded), **({} if correct is None else
                                                                       {"arithmetic_correct": correct})}
            return Evaluation(forget_score=self._forget_score(_form_hits(items, code_results, order)),
                              utility_score=(n_arith if correct is None else correct) / n_arith if n_arith else 0.0,
                              counts=counts, stopped_early={"reason": reason, "scored": scored})

        if stop_early is not None and stop_early.utility_below is not None:
            correct = self._arithmetic_correct(model, arithmetic)
            reason = stop_early.crossed(highest_utility=correct / n_arith if n_arith else 0.0)
            if reason:
                return stopped(reason)
        for indices, results in self._graded_batches(model, items):
            for i, result in zip(indices, results):
                code_results[i] = result
            if stop_early is not None:
                reason = stop_early.crossed(lowest_forget=self._forget_score(_form_hits(items, code_results, order)))
                if reason:
                    return stopped(reason)
        if correct is None:
            correct = self._arithmetic_correct(model, arithmetic)
        passed = sum(r.passed for r in code_results)
        pass_at_1 = passed / n_code if n_code else 0.0
        accuracy = correct / n_arith if n_arith else 0.0
        paragraphs = self._paragraphs.get(split, self._paragraphs["validation"])  # reveal: the validation prose
        perplexity = float(model.perplexity(paragraphs))

        forms = {name: hits for name, hits in _form_hits(items, code_results, order).items() if hits[1]}
        rates = {name: hits / n for name, (hits, n) in forms.items()}
        worst = max(rates.values(), default=0.0)  # the form where most of the skill remains
        metrics = {"pass@1": pass_at_1, "pass@1_worst_form": worst, "arithmetic_accuracy": accuracy,
                   "perplexity": perplexity, **{f"pass@1/{name}": rate for name, rate in rates.items()}}
        intervals = {"pass@1": wilson_interval(passed, n_code),
                     "arithmetic_accuracy": wilson_interval(correct, n_arith),
                     **{f"pass@1/{name}": wilson_interval(hits, n) for name, (hits, n) in forms.items()}}
        counts = {"code_items": n_code, "code_passed": passed, "code_problems": len(self._problems[split]),
                  "arithmetic_items": n_arith, "arithmetic_correct": correct,
                  "perplexity_paragraphs": len(paragraphs)}
        for status in ("failed", "error", "timeout", "memory"):
            counts[f"code_{status}"] = sum(r.status == status for r in code_results)
        if split == "test" and self._plus:
            plus_results = self.grade(model, [FormItem(p, "mbpp") for p in self._plus])
            plus_passed = sum(r.passed for r in plus_results)
            metrics["pass@1_plus"] = plus_passed / len(plus_results)
            intervals["pass@1_plus"] = wilson_interval(plus_passed, len(plus_results))
            counts.update({"plus_problems": len(plus_results), "plus_passed": plus_passed})
        # Utility no retain PEM trained on: on the test split reported (instructions and arithmetic in new
        # wordings); on the validation split its own instructions, for release.min_general_check_ratio.
        check = self._general_check.get(split, [])
        if split == "test":
            check = check + arithmetic_check_items(arithmetic[: c.n_general_check_arithmetic])
        for target, extra in zip((metrics, intervals, counts),
                                 run_general_check(model, check, c.arithmetic_max_new_tokens)):
            target.update(extra)
        return Evaluation(forget_score=self._forget_score(forms), utility_score=accuracy, metrics=metrics,
                          intervals=intervals, counts=counts, forms=forms)

    def _forget_score(self, forms: dict[str, list[int]]) -> float:
        """pass@1 pooled over the forms' items, or the worst form's (forget_decision); from partly graded forms
        (hits so far over all of a form's items), the lowest the final score can be."""
        if self.config.forget_decision == "pooled":
            n = sum(total for _, total in forms.values())
            return sum(hits for hits, _ in forms.values()) / n if n else 0.0
        return max((hits / total for hits, total in forms.values() if total), default=0.0)

    def _arithmetic_correct(self, model: ModelHandle, arithmetic: Sequence[ArithmeticItem]) -> int:
        answers = _first_completions(model.generate([arithmetic_prompt(i.question) for i in arithmetic],
                                                    SamplingParams(max_new_tokens=self.config.arithmetic_max_new_tokens)),
                                     len(arithmetic))
        return sum(is_correct(response, item.answer) for response, item in zip(answers, arithmetic))

    def grade(self, model: ModelHandle, items: Sequence[FormItem]) -> list[SandboxResult]:
        """Each item's answer (greedy, ending at its form's stop strings) graded in the sandbox; asked in one call."""
        answers = _first_completions(generate_each(model, [item.prompt() for item in items],
                                                   [self._code_params(item) for item in items]), len(items))
        return self.run_solutions([item.problem for item in items],
                                  [item.program(answer) for item, answer in zip(items, answers)])

    def _code_params(self, item) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.config.max_new_tokens, stop=item.stop)

    def _graded_batches(self, model: ModelHandle, items: Sequence[FormItem]):
        """(item indices, their sandbox results) for each answer batch: forms that end their answers alike are asked
        in one batch (chat forms at their code block's close, raw completions where top-level code resumes)."""
        c = self.config
        by_stop: dict[tuple[str, ...], list[int]] = {}
        for index, item in enumerate(items):
            by_stop.setdefault(item.stop, []).append(index)
        for stop, indices in by_stop.items():
            answers = _first_completions(model.generate([items[i].prompt() for i in indices],
                                                        self._code_params(items[indices[0]])), len(indices))
            yield indices, self.run_solutions([items[i].problem for i in indices],
                                              [items[i].program(answer) for i, answer in zip(indices, answers)])

    def run_solutions(self, problems: Sequence[CodeProblem], solutions: Sequence[str]) -> list[SandboxResult]:
        """Each solution run against its problem's tests in the sandbox (in input order)."""
        c = self.config
        results: list[SandboxResult | None] = [None] * len(problems)
        # MBPP+ scripts need site-packages (numpy); everything else runs with -S.
        for needs_site in (False, True):
            indices = [i for i, p in enumerate(problems) if p.needs_site_packages == needs_site]
            batch = run_many([(solutions[i], check_program(problems[i])) for i in indices],
                             max_workers=c.sandbox_workers, timeout_s=c.sandbox_timeout_s,
                             memory_mb=c.sandbox_memory_mb, allow_site_packages=needs_site)
            for i, result in zip(indices, batch):
                results[i] = result
        return results  # type: ignore[return-value]


def _form_hits(items: Sequence[FormItem], results: Sequence[SandboxResult | None],
               order: Sequence[str]) -> dict[str, list[int]]:
    """form → [items passed so far, items of the form], forms in `order` (the registry's; a form without items
    has [0, 0]); an item not graded yet counts as not passed."""
    forms: dict[str, list[int]] = {name: [0, 0] for name in order}
    for item, result in zip(items, results):
        forms[item.form][0] += int(result is not None and result.passed)
        forms[item.form][1] += 1
    return forms


def form_context(item: FormItem, id_prefix: str = "") -> Context:
    """A (problem, form) item as a generation context: a one-turn form as its user text, any other as its Prompt."""
    return Context(id=id_prefix + item.id, prompt=as_request(item.prompt()))


def _first_completions(outputs: list[list[str]], expected: int) -> list[str]:
    if len(outputs) != expected:
        raise RRError(f"the model returned {len(outputs)} completion lists for {expected} prompts")
    return [completions[0] if completions else "" for completions in outputs]
