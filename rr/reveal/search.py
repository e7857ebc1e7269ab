"""Algorithm 1: NeuralUCB instruction search that grows the self-generated forget set, resumable per round.

For each of m outer loops: warm-start NeuralUCB with the top-k arms so far; for n inner rounds pick a
batch of arms, answer a sample of the contexts under each arm's instruction, score
(α/v + (1−α)/τ)^−1 with τ the mean relevance and v the Vendi diversity against D_self-gen; the loop's
best instruction then answers every reveal context and its answers join D_self-gen. With
reveal.finalists F > 1, the loop's top F instructions each answer every reveal context and are scored
again there (the inner rounds see only a sample); the best of them is P*, its answers the records.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rr.core.files import atomic_write, atomic_write_text
from rr.core.profile import phase
from rr.core.prompt import Prompt, prompt_to_json
from rr.errors import RRError
from rr.generation.base import request_seed
from rr.reveal.bandit import NeuralUCB
from rr.reveal.diversity import RunningGram, vendi_score
from rr.tasks.base import Context, SamplingParams


def harmonic_score(relevance: float, diversity: float, diversity_weight: float) -> float:
    """(α/v + (1−α)/τ)^−1 with α = diversity_weight; 0 when either term is 0."""
    if relevance <= 0 or diversity <= 0:
        return 0.0
    return 1.0 / (diversity_weight / diversity + (1 - diversity_weight) / relevance)


def largest_generate_call(config, n_contexts: int) -> int:
    """Requests in Reveal's biggest generate call, for sizing replicas: a round's arms on their context
    sample, or the loop's finalists (P* alone when finalists = 1) on every context."""
    per_round = config.arms_per_round * min(config.context_sample, n_contexts)
    return max(per_round, config.finalists * n_contexts) * config.samples_per_context


def instruction_prompt(instruction: str, context: Context) -> "str | Prompt":
    """How an instruction and a context make the prompt: the instruction goes before the context's user turn
    (a chat context keeps its system turn and few-shot turns)."""
    if not instruction:
        return context.prompt
    if isinstance(context.prompt, Prompt):
        return context.prompt.with_user(f"{instruction}\n\n{context.prompt.user}")
    return f"{instruction}\n\n{context.prompt}"


@dataclass
class ArmEvaluation:
    arm: int
    instruction: str
    relevance: float
    diversity: float
    score: float
    outer_loop: int
    round: int


@dataclass
class RevealState:
    """Everything needed to resume: finished rounds, observations and D_self-gen's Gram matrix."""

    outer_loop: int = 0
    round: int = 0
    evaluations: list[ArmEvaluation] = field(default_factory=list)
    best_instructions: list[str] = field(default_factory=list)
    finished: bool = False
    finals: list[ArmEvaluation] = field(default_factory=list)  # finalists scored on every context (finalists > 1)
    n_records: int | None = None  # how many forget_set.jsonl lines this state covers (None: a job saved before it)


class RevealCheckpoint:
    """The reveal/ folder of a job: state.json, forget_set.jsonl, the Gram matrix and the bandit (owner-only).

    state.json is the marker a resume trusts, written last. The records it covers are its first
    `n_records` lines of forget_set.jsonl; the Gram matrix and the bandit it goes with are named by what
    they hold (gram-<records>.npz, bandit-<loop>-<round>.json), so a kill after they are written but before
    the state leaves the state's own files in place, not newer ones it would mix with an older state."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self.state_path = self.directory / "state.json"
        self.records_path = self.directory / "forget_set.jsonl"
        # A job saved before the files were named by content: one Gram and one bandit file, trusted as they are.
        self.legacy_gram_path = self.directory / "gram.npz"
        self.legacy_bandit_path = self.directory / "bandit.json"

    def gram_path(self, n_records: int) -> Path:
        return self.directory / f"gram-{n_records}.npz"

    def bandit_path(self, outer_loop: int, round_index: int) -> Path:
        return self.directory / f"bandit-{outer_loop}-{round_index}.json"

    def load_bandit(self, outer_loop: int, round_index: int) -> dict | None:
        """The bandit's state (observations and U) after `round_index` rounds of this outer loop, if saved."""
        path = self.bandit_path(outer_loop, round_index)
        if path.exists():
            saved = json.loads(path.read_text())
        elif self.legacy_bandit_path.exists():
            saved = json.loads(self.legacy_bandit_path.read_text())
            if saved["outer_loop"] != outer_loop:
                return None
        else:
            return None
        saved["state"]["design_diagonal"] = np.asarray(saved["state"]["design_diagonal"])
        return saved["state"]

    def load(self, dim: int) -> tuple[RevealState, RunningGram, list[dict]]:
        if not self.state_path.exists():
            return RevealState(), RunningGram(dim), []
        raw = json.loads(self.state_path.read_text())
        state = RevealState(raw["outer_loop"], raw["round"], [ArmEvaluation(**e) for e in raw["evaluations"]],
                            raw["best_instructions"], raw["finished"],
                            [ArmEvaluation(**e) for e in raw.get("finals", [])], raw.get("n_records"))
        records = [json.loads(line) for line in self.records_path.read_text().splitlines()] \
            if self.records_path.exists() else []
        if state.n_records is None:  # saved before n_records existed: its files were trusted as they are
            gram_path = self.legacy_gram_path
        else:
            if len(records) < state.n_records:
                raise RRError(f"{self.records_path} has {len(records)} records but {self.state_path} covers "
                              f"{state.n_records}: the reveal checkpoint was edited; delete {self.directory} to redo Reveal")
            records = records[:state.n_records]  # lines a killed save wrote after its state are redone
            gram_path = self.gram_path(state.n_records)
        if gram_path.exists():
            gram = RunningGram.from_state_dict(dict(np.load(gram_path)))
        elif not records:
            gram = RunningGram(dim)
        else:
            raise RRError(f"{gram_path} is missing for the {len(records)} forget records of {self.state_path}: "
                          f"delete {self.directory} to redo Reveal")
        return state, gram, records

    def save(self, state: RevealState, gram: RunningGram, records: list[dict], bandit: NeuralUCB | None = None) -> None:
        """Records, Gram and bandit first, state last, each atomically: a kill leaves the last saved state
        with the files it names (see the class docstring)."""
        state.n_records = len(records)
        atomic_write_text(self.records_path, "".join(json.dumps(r) + "\n" for r in records))
        keep = {self.state_path, self.records_path, self.gram_path(len(records))}
        if bandit is not None:
            bandit_state = bandit.state_dict()
            bandit_state["design_diagonal"] = bandit_state["design_diagonal"].tolist()
            bandit_path = self.bandit_path(state.outer_loop, state.round)
            atomic_write_text(bandit_path, json.dumps({"outer_loop": state.outer_loop, "round": state.round,
                                                   "state": bandit_state}))
            keep.add(bandit_path)
        gram_path = self.gram_path(len(records))
        atomic_write(gram_path, lambda tmp: _savez(tmp, gram.state_dict()))
        atomic_write_text(self.state_path, json.dumps(asdict(state), indent=1))
        # Only now are older Gram and bandit files unreachable from the state.
        for stale in [*self.directory.glob("gram-*.npz"), *self.directory.glob("bandit-*.json"),
                      self.legacy_gram_path, self.legacy_bandit_path]:
            if stale not in keep and stale.exists():
                stale.unlink()


def _savez(path: str, arrays: dict) -> None:
    with open(path, "wb") as handle:  # a handle: np.savez would append ".npz" to a path
        np.savez(handle, **arrays)


class RevealSearch:
    """Runs Algorithm 1 against a generator, a task's oracle and an embedder."""

    def __init__(self, config, task, arms, generate: Callable, embed: Callable[[Sequence[str]], np.ndarray],
                 checkpoint: RevealCheckpoint, seed: int, progress: Callable[[str], None] = lambda _: None,
                 log_forget_examples: bool = False):
        self.config = config
        self.log_forget_examples = log_forget_examples  # the job's opt-in to print P* and its records in full
        self.task = task
        self.arms = arms
        self.generate = generate
        self.embed = embed
        self.checkpoint = checkpoint
        self.seed = seed
        self.progress = progress
        self.contexts = task.contexts("reveal")
        self.params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                     top_p=config.top_p, n=config.samples_per_context, stop=task.answer_stop)

    # ---- one batch of arms ---------------------------------------------------------------
    def answer(self, instructions: Sequence[str], contexts: Sequence[Context], tag: str):
        """Answers of every (instruction, context, sample): one generate call, so replicas can share it."""
        prompts = [instruction_prompt(ins, c) for ins in instructions for c in contexts]
        seeds = [request_seed(self.seed, tag, ins, c.id) for ins in instructions for c in contexts]
        answers = self.generate(prompts, self.params, seeds)
        per_instruction, k = [], len(contexts)
        for i in range(len(instructions)):
            rows = answers[i * k:(i + 1) * k]
            per_instruction.append([(c, j, text, seeds[i * k + ci]) for ci, (c, texts) in enumerate(zip(contexts, rows))
                                    for j, text in enumerate(texts)])
        return per_instruction

    def evaluate_arms(self, arm_indices: Sequence[int], contexts: Sequence[Context], gram: RunningGram,
                      state: RevealState) -> list[ArmEvaluation]:
        instructions = [self.arms.instructions[a] for a in arm_indices]
        answered = self.answer(instructions, contexts, f"round-{state.outer_loop}-{state.round}")
        return [self._scored(int(arm), instruction, rows, self._relevance(rows), gram, state.outer_loop, state.round)
                for arm, instruction, rows in zip(arm_indices, instructions, answered)]

    def _relevance(self, rows) -> list[float]:
        return self.task.relevance([c for c, _, _, _ in rows], [t for _, _, t, _ in rows])

    def _scored(self, arm: int, instruction: str, rows, relevance: Sequence[float], gram: RunningGram,
                outer_loop: int, round_index: int) -> ArmEvaluation:
        """The harmonic score of one instruction's answers: mean relevance, Vendi diversity against D_self-gen."""
        mean_relevance = float(np.mean(relevance))
        diversity = gram.normalized_diversity_with(self.embed([t for _, _, t, _ in rows]))
        return ArmEvaluation(arm, instruction, mean_relevance, diversity,
                             harmonic_score(mean_relevance, diversity, self.config.diversity_weight),
                             outer_loop, round_index)

    # ---- Algorithm 1 ---------------------------------------------------------------------
    def run(self) -> tuple[RevealState, list[dict]]:
        cfg = self.config
        dim = self.embed(["dimension probe"]).shape[1]
        state, gram, records = self.checkpoint.load(dim)
        while state.outer_loop < cfg.outer_loops:
            loop = state.outer_loop
            bandit = self._bandit_for_loop(state)
            while state.round < cfg.inner_rounds:
                chosen = self._choose_arms(bandit, state)
                if not chosen:
                    self.progress(f"outer {loop + 1}: every distinct instruction already scored; ending the loop early")
                    break
                contexts = self._context_sample(loop, state.round)
                with phase(f"outer {loop + 1} round {state.round + 1}"):
                    evaluations = self.evaluate_arms(chosen, contexts, gram, state)
                for e in evaluations:
                    bandit.observe(e.arm, e.score)
                state.evaluations += evaluations
                best = max(evaluations, key=lambda e: e.score)
                self.progress(f"outer {loop + 1}/{cfg.outer_loops} round {state.round + 1}/{cfg.inner_rounds}: "
                              f"best score {best.score:.3f} (relevance {best.relevance:.2f}, diversity {best.diversity:.2f})")
                state.round += 1
                self.checkpoint.save(state, gram, records, bandit)
            candidates = [e for e in state.evaluations if e.outer_loop == loop]
            if not candidates:
                self.progress(f"outer {loop + 1}: no instruction left that an earlier loop has not used; stopping")
                break
            with phase(f"outer {loop + 1} finalists"):
                best, new_records = self._collect(candidates, gram, state)
            records += new_records
            gram.add(self.embed([r["response"] for r in new_records]))
            state.best_instructions.append(best.instruction)
            state.outer_loop, state.round = loop + 1, 0
            # The instruction itself stays in the job directory (reveal/report.md): the model being unlearned
            # wrote it, and it can state forget data (an entity run's P* named a forget fact).
            self.progress(f"outer {loop + 1}: P* = {instruction_label(best.instruction)} → {len(new_records)} records")
            if self.log_forget_examples:  # log_forget_examples: true asked for the sensitive text
                self.progress(f"outer {loop + 1}: P* in full: {best.instruction!r}")
                for record in new_records:
                    self.progress(f"  forget record {record['context_id']}: {record['response']!r}")
            self.checkpoint.save(state, gram, records)
        state.finished = True
        self.checkpoint.save(state, gram, records)
        return state, records

    def _bandit_for_loop(self, state: RevealState) -> NeuralUCB:
        """A fresh network per outer loop, warm-started with the top-k arms of earlier loops.

        Scores of earlier loops were measured against a smaller D_self-gen; they seed the network's
        prior, and this loop's own observations refine it.
        """
        cfg = self.config
        bandit = NeuralUCB(self.arms.features, hidden=cfg.ucb_hidden, reg_lambda=cfg.ucb_lambda, nu=cfg.ucb_nu,
                           train_steps=cfg.ucb_train_steps, seed=self.seed + state.outer_loop)
        saved = self.checkpoint.load_bandit(state.outer_loop, state.round)
        if saved is not None:  # resume: observations and the exploration matrix U exactly as they were
            bandit.load_state_dict(saved)
            return bandit
        earlier = sorted((e for e in state.evaluations if e.outer_loop < state.outer_loop), key=lambda e: -e.score)
        top = earlier[:cfg.warm_start_top_k]
        if top:
            bandit.warm_start([e.arm for e in top], [e.score for e in top])
        return bandit

    def _choose_arms(self, bandit: NeuralUCB, state: RevealState) -> list[int]:
        cfg = self.config
        # An earlier loop's P* is not a candidate again: its answers are already in D_self-gen.
        scored = {e.instruction for e in state.evaluations if e.outer_loop == state.outer_loop}
        scored |= set(state.best_instructions)
        keys = self.arms.instructions
        open_arms = [a for a in range(len(keys)) if keys[a] not in scored]
        if not open_arms:
            return []
        this_loop = [e for e in state.evaluations if e.outer_loop == state.outer_loop]
        if state.outer_loop == 0 and len(this_loop) < cfg.initial_random_arms:
            rng = random.Random(request_seed(self.seed, "initial", state.outer_loop, state.round))
            picks, seen = [], set()
            for a in rng.sample(open_arms, len(open_arms)):
                if keys[a] not in seen:
                    picks.append(a)
                    seen.add(keys[a])
                if len(picks) == min(cfg.arms_per_round, cfg.initial_random_arms):
                    break
            return picks
        bandit.fit()
        exclude = {a for a in range(len(keys)) if keys[a] in scored}
        return bandit.select_batch(cfg.arms_per_round, exclude=exclude, distinct_key=keys)

    def _context_sample(self, loop: int, round_index: int) -> list[Context]:
        rng = random.Random(request_seed(self.seed, "contexts", loop, round_index))
        k = min(self.config.context_sample, len(self.contexts))
        return rng.sample(self.contexts, k)

    def _collect(self, candidates: list[ArmEvaluation], gram: RunningGram,
                 state: RevealState) -> tuple[ArmEvaluation, list[dict]]:
        """P* answers every reveal context; each answer becomes a forget record.

        With finalists F > 1, the loop's F best distinct instructions all answer every context in one
        generate call and are scored again on those answers (relevance and diversity against D_self-gen, as
        in the rounds); the best is P*. A score from a small sample of contexts cannot tell an instruction
        whose answers degenerate on one context in twenty from one whose answers never do; every context can.
        """
        loop = state.outer_loop
        # A loop never scores one instruction text twice, so the candidates are distinct instructions.
        finalists = sorted(candidates, key=lambda e: -e.score)[:self.config.finalists]
        answered = self.answer([e.instruction for e in finalists], self.contexts, f"collect-{loop}")
        relevances = [self._relevance(rows) for rows in answered]
        if self.config.finalists == 1:  # Algorithm 1 as written: the inner rounds' best is P*
            best_index = 0
        else:
            finals = [self._scored(e.arm, e.instruction, rows, relevance, gram, loop, self.config.inner_rounds)
                      for e, rows, relevance in zip(finalists, answered, relevances)]
            state.finals += finals
            best_index = max(range(len(finals)), key=lambda i: finals[i].score)
            self.progress(f"outer {loop + 1}: finalists on all {len(self.contexts)} contexts: " + ", ".join(
                f"{f.score:.3f} (relevance {f.relevance:.3f})" for f in finals))
        best, rows = finalists[best_index], answered[best_index]
        records = []
        for (context, sample, text, seed), rel in zip(rows, relevances[best_index]):
            if self.config.min_relevance is not None and rel < self.config.min_relevance:
                continue
            records.append({"context_id": context.id, "prompt": prompt_to_json(context.prompt),
                            "instruction": best.instruction,
                            "response": text, "relevance": float(rel), "outer_loop": loop, "sample": sample,
                            "seed": seed})
        return best, records


def instruction_label(instruction: str) -> str:
    """What logs and shared reports show of an instruction: its hash and length, never its text."""
    return f"instruction sha256 {hashlib.sha256(instruction.encode()).hexdigest()[:12]} ({len(instruction)} chars)"


def forget_set_manifest(records: Sequence[dict], state: RevealState, embeddings: np.ndarray,
                        min_relevance: float | None) -> dict:
    """Totals for the forget set: size, mean relevance, Vendi score, instructions found, filtering."""
    return {
        "size": len(records),
        "mean_relevance": float(np.mean([r["relevance"] for r in records])) if records else 0.0,
        "vendi_score": float(vendi_score(embeddings)) if len(records) else 0.0,
        "instructions": state.best_instructions,
        "filtered_by_relevance": min_relevance is not None,
        "min_relevance": min_relevance,
        "arms_scored": len(state.evaluations),
        "finalists": [asdict(e) for e in state.finals],
        "records": [{k: r[k] for k in ("context_id", "instruction", "relevance", "outer_loop", "sample", "seed")}
                    for r in records],
    }
