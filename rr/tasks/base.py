"""The Task protocol: what an unlearning target gives rr (contexts, relevance oracle, scores, retain data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

from rr.core.prompt import Prompt
from rr.core.tokens import TokenStats
from rr.errors import RRError

SPLITS = ("reveal", "validation", "test")


@dataclass(frozen=True)
class Context:
    """One generation context: a user prompt (or a chat Prompt, whose last user turn gets the instruction)
    that Reveal answers under an instruction."""

    id: str
    prompt: str | Prompt


@dataclass(frozen=True)
class Example:
    """A (prompt, response) pair a PEM is trained on (retain data, or a forget record). A str prompt is one
    user turn; a Prompt carries a system turn, few-shot turns or a raw completion (a form's framing)."""

    prompt: str | Prompt
    response: str


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters shared by every generator backend (transformers and vLLM)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()  # generation ends once the answer contains one of these (kept in the text)


def per_prompt(params: "SamplingParams | Sequence[SamplingParams]", count: int) -> list[SamplingParams]:
    """A generate call's params, one per prompt: a generator that takes params per prompt (`per_prompt_params`) gets
    either one SamplingParams for the whole call or a list, one per prompt, whose prompts then end each at its own
    stop strings and max_new_tokens. The prompts of one call share how they sample (temperature, top_p, n)."""
    each = list(params) if isinstance(params, (list, tuple)) else [params] * count
    if len(each) != count:
        raise RRError(f"generate: {len(each)} sampling params for {count} prompts; pass one, or one per prompt")
    if len({(p.temperature, p.top_p, p.n) for p in each}) > 1:
        raise RRError("generate: the prompts of one call must share temperature, top_p and n; make one call per "
                      "sampling setting")
    return each


def generate_each(model, prompts: Sequence["str | Prompt"], params: Sequence[SamplingParams],
                  seeds: Sequence[int] | None = None) -> list[list[str]]:
    """Each prompt answered with its own params (greedy tasks: its stop strings and max_new_tokens). A model that
    takes params per prompt answers them in one call, so answers of different lengths share batches and a batch
    shrinks as its answers end; any other model gets one call per distinct params, in order of first use."""
    if len(params) != len(prompts):
        raise RRError(f"generate_each: {len(params)} sampling params for {len(prompts)} prompts")
    if getattr(model, "per_prompt_params", False):
        return model.generate(list(prompts), list(params), seeds)
    groups: dict[SamplingParams, list[int]] = {}
    for index, each in enumerate(params):
        groups.setdefault(each, []).append(index)
    out: list[list[str] | None] = [None] * len(prompts)
    for each, indices in groups.items():
        answers = model.generate([prompts[i] for i in indices], each,
                                 None if seeds is None else [seeds[i] for i in indices])
        if len(answers) != len(indices):
            raise RRError(f"the model returned {len(answers)} completion lists for {len(indices)} prompts")
        for i, answer in zip(indices, answers):
            out[i] = answer
    return out  # type: ignore[return-value]


@dataclass
class Evaluation:
    """A task's verdict on one model: the two decision scores and every reported metric.

    forget_score is higher when more of the target behaviour remains; utility_score is higher
    when more utility remains. `intervals` maps a rate metric to its Wilson 95% interval.
    """

    forget_score: float
    utility_score: float
    metrics: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    # A task with forms (the same items asked in several wordings): form → [hits, items], where a hit is an
    # item that showed the target behaviour (code: passed its tests). rr/evaluation/forms.py reports it.
    forms: dict[str, list[int]] = field(default_factory=dict)
    # Set when the scoring stopped early (StopEarly): why, and how many items of each part were scored. The two
    # scores are then the bounds that decided it (the lowest forget score, the highest utility score the
    # remaining items could have given), not the model's scores; metrics are empty.
    stopped_early: dict | None = None


@dataclass(frozen=True)
class StopEarly:
    """Limits a weight rule holds a candidate to (rr/release/weights.py): its validation scoring may stop as soon as
    the scores it would end with provably cross one, since the rule's deciding branch cannot pick it then. A
    task that cannot tell early scores in full, which is always right."""

    forget_above: float | None = None   # the candidate is out once its final forget score must exceed this
    utility_below: float | None = None  # ... or once its final utility score must fall below this

    def crossed(self, lowest_forget: float | None = None, highest_utility: float | None = None) -> str | None:
        """Why a candidate whose final forget score is at least `lowest_forget` and whose final utility score is at
        most `highest_utility` is out (None: it may still qualify)."""
        if self.forget_above is not None and lowest_forget is not None and lowest_forget > self.forget_above:
            return f"forget score at least {lowest_forget:.4f} > {self.forget_above:.4f}"
        if self.utility_below is not None and highest_utility is not None and highest_utility < self.utility_below:
            return f"utility score at most {highest_utility:.4f} < {self.utility_below:.4f}"
        return None


class ModelHandle(Protocol):
    """What a task may ask of the model under evaluation (the current composition)."""

    def generate(self, prompts: Sequence[str | Prompt], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[list[str]]:
        """Prompts (a str is one user turn; a Prompt is a chat or a raw completion) → `params.n` completions
        each. Seeds are per prompt. A handle with `per_prompt_params = True` also takes a list of params, one per
        prompt (per_prompt); tasks ask through generate_each, which works with either."""

    def perplexity(self, texts: Sequence[str]) -> float:
        """Token-level perplexity of plain texts (no chat template)."""

    def token_stats(self, prompts: Sequence[str | Prompt], answers: Sequence[str]) -> list[TokenStats]:
        """Each answer teacher-forced after its prompt: per-token log-probs and the vocabulary's log-prob mean
        and variance at each position (answer probability, membership-inference scores)."""


@runtime_checkable
class Task(Protocol):
    """An unlearning target. One file per task under rr/tasks, registered in rr/tasks/registry.py."""

    name: str
    # Where an answer to a context ends (kept in the text), e.g. a code block's closing fence: Reveal's
    # answers stop there, so the forget set holds the target behaviour and not what follows it.
    answer_stop: tuple[str, ...]

    def contexts(self, split: str) -> list[Context]:
        """Generation contexts of a split ("reveal", "validation" or "test"); the splits are disjoint."""

    def exemplars(self) -> list[Example]:
        """A few (context → answer) demonstrations for instruction induction (from the reveal split)."""

    def relevance(self, contexts: Sequence[Context], responses: Sequence[str]) -> list[float]:
        """The relevance oracle τ: one score in [0, 1] per response (higher = more of the target)."""

    def retain_examples(self) -> list[Example]:
        """Training data for retain PEMs (never drawn from validation or test)."""

    def evaluate(self, model: ModelHandle, split: str, stop_early: StopEarly | None = None) -> Evaluation:
        """Forget score, utility score and the paper's metrics of `model` on `split` (greedy). With `stop_early`, a
        task may stop once the scores provably cross its limits and return what it scored (Evaluation.stopped_early);
        one that cannot tell early ignores it."""


def check_split(split: str) -> str:
    """`split`, if it is one of SPLITS; else an error naming the choices."""
    if split not in SPLITS:
        raise RRError(f"unknown split {split!r}; choose one of {SPLITS}")
    return split


def check_forms(forms: Sequence[str] | None, known: Sequence[str], by_split: dict[str, Sequence[str]]) -> None:
    """task.forms: each a known form, listed once, and every split asking at least one of them."""
    if forms is None:
        return
    unknown = [f for f in forms if f not in known]
    if unknown or not forms or len(set(forms)) != len(forms):
        raise ValueError(f"task.forms: {unknown or list(forms)} — list each form once, from {', '.join(known)}")
    for split in SPLITS:
        if not set(by_split[split]) & set(forms):
            raise ValueError(f"task.forms: none of {list(forms)} is asked on the {split} split; add one of "
                             f"{', '.join(by_split[split])}")


def deal_across(groups: Sequence[Sequence], limit: int) -> list:
    """Up to `limit` items taken in turn from each group (first of each, then second of each, …): a sample that
    covers every group (e.g. every form) before it takes a second item of any."""
    items, index = [], 0
    while len(items) < limit and any(index < len(group) for group in groups):
        items += [group[index] for group in groups if index < len(group)][:limit - len(items)]
        index += 1
    return items


@dataclass(frozen=True)
class ProbeFamily:
    """One way `rr audit` asks for a test item adversarially (a task's audit module lists its families)."""

    name: str
    summary: str
    build: Callable[..., Prompt]             # (the item's problem or fact, the shots) → the prompt
    completion: bool = False                 # a half-written answer the model continues (no chat template)
    max_new_tokens: int | None = None        # None: the task's own budget


def check_probe_families(families: Sequence[str], known: dict[str, ProbeFamily]) -> None:
    unknown = [f for f in families if f not in known]
    if unknown:
        raise RRError(f"audit.probe_families: unknown {unknown}; choose from {sorted(known)}")
