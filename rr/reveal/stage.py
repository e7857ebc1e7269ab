"""The Reveal stage of a job: decode the arm pool, run Algorithm 1, write the forget set, its manifest and report."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Callable

import numpy as np

from rr.core.files import atomic_write_text
from rr.core.profile import phase, profiling
from rr.errors import RRError
from rr.generation.base import request_seed
from rr.reveal.arms import ArmPool, decode_arm_pool
from rr.reveal.diversity import vendi_score
from rr.reveal.search import (RevealCheckpoint, RevealSearch, forget_set_manifest, instruction_label,
                              instruction_prompt, largest_generate_call)


def load_or_decode_arms(job, progress: Callable[[str], None]) -> ArmPool:
    """Arms depend only on (model, exemplars, seed, sizes): decode once, cache in the job dir."""
    path = job.dir / "reveal" / "arms.npz"
    if path.exists():
        return ArmPool.from_npz(path)
    cfg = job.config.reveal
    path.parent.mkdir(parents=True, exist_ok=True)
    progress(f"decoding {cfg.n_arms} soft-prompt arms into instructions")
    # Soft prompts are input embeddings: transformers decodes them, whatever generation.backend is.
    from rr.generation.hf import job_generator

    if job.config.model.instruction_model:
        from rr.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(job.config.model.instruction_model, device=job.device)
        generator = job_generator(job, model, tokenizer)
    else:  # the job's own transformers generator, or one beside a vLLM generator (which takes no embeddings)
        model, tokenizer = job.model, job.tokenizer
        generator = job.generator if job.config.generation.backend == "hf" else job_generator(job)
    pool = decode_arm_pool(model, tokenizer, generator, job.task.exemplars()[:cfg.n_exemplars], cfg.n_arms,
                           cfg.soft_prompt_dim, cfg.n_prompt_tokens, cfg.max_instruction_tokens, job.config.seed,
                           batch_size=max(job.config.generation.batch_size, 16), n_views=cfg.exemplar_views,
                           progress=lambda done, total: progress(f"arms decoded {done}/{total}"))
    tmp = path.with_name("arms.tmp.npz")
    pool.to_npz(tmp)
    tmp.replace(path)
    progress(f"{len(set(pool.instructions))} distinct instructions among {cfg.n_arms} arms")
    return pool


def forget_set_hash(records) -> str:
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r["context_id"], r["instruction"], r["response"]]).encode())
    return digest.hexdigest()


def run_reveal(job, progress: Callable[[str], None] = print) -> dict:
    """Stage 1. Returns the manifest; resumes from the last finished round when rerun."""
    manifest = job.read_json("reveal/manifest.json")
    if manifest is not None:
        progress(f"reveal already finished: {manifest['size']} forget records (reusing {job.dir / 'reveal'})")
        return manifest
    with profiling(job.dir / "profile.jsonl"), phase("reveal"):
        return _reveal(job, progress)


def _reveal(job, progress: Callable[[str], None]) -> dict:
    cfg = job.config.reveal
    # Sized first: on Ray the replicas load their model while this process decodes the arms.
    job.executor.prepare("reveal", largest_generate_call(cfg, len(job.task.contexts("reveal"))))
    with phase("arms"):
        arms = load_or_decode_arms(job, progress)
    checkpoint = RevealCheckpoint(job.dir / "reveal")
    search = RevealSearch(cfg, job.task, arms, job.executor.generate, job.embed, checkpoint, job.config.seed, progress,
                          log_forget_examples=job.config.log_forget_examples)
    state, records = search.run()
    if not records:
        raise RRError(f"reveal.min_relevance {job.config.reveal.min_relevance}: every answer Reveal produced fell "
                      "below it, so there is no forget set; lower it or remove it (no filtering)")
    embeddings = job.embed([r["response"] for r in records])
    manifest = forget_set_manifest(records, state, embeddings, job.config.reveal.min_relevance)
    manifest["sha256"] = forget_set_hash(records)
    with phase("baselines"):
        manifest["comparison"] = compare_with_baselines(job, search, state, records, embeddings)
    # The manifest marks Reveal finished for a resume, so it is written last.
    (job.dir / "reveal" / "report.md").write_text(reveal_report(manifest))
    job.write_json("reveal/manifest.json", manifest)
    return manifest


def compare_with_baselines(job, search: RevealSearch, state, records, embeddings) -> dict:
    """The two checks of the reveal report, on the same contexts with the same sample counts.

    1. Relevance of the best instruction's answers vs the base model's plain answers (no instruction).
    2. Vendi of the forget set vs answers to one fixed instruction (loop 1's P*), at equal n per context.
    """
    contexts = search.contexts
    params = search.params
    seeds = [request_seed(job.config.seed, "plain", c.id) for c in contexts]
    plain = job.executor.generate([instruction_prompt("", c) for c in contexts], params, seeds)
    plain_rows = [(c, t) for c, texts in zip(contexts, plain) for t in texts]
    plain_relevance = float(np.mean(job.task.relevance([c for c, _ in plain_rows], [t for _, t in plain_rows])))
    loop_best = {}
    for e in state.evaluations:
        loop_best[e.outer_loop] = max(loop_best.get(e.outer_loop, 0.0), e.score)
    best_loop = max(loop_best, key=loop_best.get)
    best = [r for r in records if r["outer_loop"] == best_loop]
    best_relevance = float(np.mean([r["relevance"] for r in best]))

    # One fixed instruction (loop 1's P*) answered on the same contexts with the forget set's own sampling
    # parameters, against the forget set subsampled to the same contexts and counts (per context, the
    # forget set's answers come from instructions of different outer loops): does the search's spread of
    # instructions beat one instruction at equal n?
    fixed = _loop_one_answers(records, contexts, params)
    if fixed is None:
        fixed_seeds = [request_seed(job.config.seed, "fixed", c.id) for c in contexts]
        fixed = job.executor.generate([instruction_prompt(state.best_instructions[0], c) for c in contexts],
                                      params, fixed_seeds)
    by_context: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_context.setdefault(r["context_id"], []).append(i)
    rng = random.Random(job.config.seed)
    subsample, fixed_texts = [], []
    for c, texts in zip(contexts, fixed):
        mine = by_context.get(c.id, [])
        k = min(len(mine), len(texts))
        subsample += rng.sample(mine, k)
        fixed_texts += texts[:k]
    n = len(subsample)
    return {
        "contexts": len(contexts),
        "samples_per_context": params.n,
        "best_instruction": best[0]["instruction"] if best else "",
        "best_instruction_mean_relevance": best_relevance,
        "plain_answers_mean_relevance": plain_relevance,
        "relevance_at_least_plain": best_relevance >= plain_relevance,
        "n_for_vendi": n,
        "fixed_instruction": state.best_instructions[0],
        "fixed_instruction_temperature": params.temperature,
        "forget_set_vendi_subsampled": float(vendi_score(embeddings[sorted(subsample)])),
        "fixed_instruction_vendi": float(vendi_score(job.embed(fixed_texts))),
        "plain_answers_vendi": float(vendi_score(job.embed([t for _, t in plain_rows]))),
    }


def _loop_one_answers(records: list[dict], contexts, params) -> list[list[str]] | None:
    """Greedy answers do not depend on the seed, so loop 1's P* already answered every context exactly as
    the fixed-instruction baseline would: its records are reused. None when sampling, or when a context
    has no loop-1 record (reveal.min_relevance dropped it); the baseline is then generated."""
    if params.temperature > 0:
        return None
    first = {r["context_id"]: r["response"] for r in records if r["outer_loop"] == 0}
    if any(c.id not in first for c in contexts):
        return None
    return [[first[c.id]] * params.n for c in contexts]


def redacted(manifest: dict) -> dict:
    """The manifest with every instruction's text replaced by its hash and length (rr/reveal/search.py:
    instruction_label): what leaves the job directory unless tracking.log_forget_data asks for the text."""
    hidden = json.loads(json.dumps(manifest))
    hidden["instructions"] = [instruction_label(text) for text in hidden["instructions"]]
    for row in hidden.get("finalists", []) + hidden.get("records", []):
        row["instruction"] = instruction_label(row["instruction"])
    for key in ("best_instruction", "fixed_instruction"):
        if key in hidden.get("comparison", {}):
            hidden["comparison"][key] = instruction_label(hidden["comparison"][key])
    return hidden


def write_redacted(job_dir: Path, manifest: dict) -> list[Path]:
    """reveal/redacted/manifest.json and report.md: the reveal stage's outputs without instruction texts. The
    report is rendered from the redacted manifest (so no text can slip through); a manifest an older rr wrote,
    without every field the report shows, gets the manifest alone, and a warning says so."""
    hidden, folder = redacted(manifest), Path(job_dir) / "reveal" / "redacted"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "manifest.json", json.dumps(hidden, indent=2))
    try:
        report = reveal_report(hidden)
    except KeyError as missing:
        logging.getLogger("rr").warning("reveal/report.md not shared: the manifest (written by an older rr) lacks "
                                        "%s; the redacted manifest is shared alone", missing)
        return [folder / "manifest.json"]
    atomic_write_text(folder / "report.md", report)
    return [folder / "manifest.json", folder / "report.md"]


def reveal_report(manifest: dict) -> str:
    c = manifest["comparison"]
    lines = [
        "# Reveal report", "",
        f"- forget records: {manifest['size']} (sha256 {manifest['sha256'][:16]}…), arms scored: {manifest['arms_scored']}",
        f"- mean relevance: {manifest['mean_relevance']:.3f}; Vendi score: {manifest['vendi_score']:.2f}",
        f"- filtered by relevance: {manifest['filtered_by_relevance']}", "",
        "## Instructions found (one per outer loop)", "",
        *[f"{i + 1}. {text}" for i, text in enumerate(manifest["instructions"])], "",
        *_finalists_table(manifest.get("finalists", [])),
        f"## Against baselines ({c['contexts']} reveal contexts × {c['samples_per_context']} samples)", "",
        "| check | rr | baseline | holds |", "|---|---|---|---|",
        f"| mean relevance: best instruction vs plain answers | {c['best_instruction_mean_relevance']:.3f} | "
        f"{c['plain_answers_mean_relevance']:.3f} | {c['relevance_at_least_plain']} |",
        f"| Vendi at n={c['n_for_vendi']}: forget set vs one fixed instruction "
        f"(same contexts, counts and sampling, T={c['fixed_instruction_temperature']:g}) | "
        f"{c['forget_set_vendi_subsampled']:.2f} | {c['fixed_instruction_vendi']:.2f} | "
        f"{c['forget_set_vendi_subsampled'] > c['fixed_instruction_vendi']} |",
        f"| Vendi of plain answers (no instruction), for reference | | {c['plain_answers_vendi']:.2f} | |",
    ]
    return "\n".join(lines) + "\n"


def _finalists_table(finals: list[dict]) -> list[str]:
    """reveal.finalists > 1: every finalist's scores on all reveal contexts, the best of each loop is P*."""
    if not finals:
        return []
    rows = [f"| {f['outer_loop'] + 1} | {f['relevance']:.3f} | {f['diversity']:.3f} | {f['score']:.3f} | "
            + f['instruction'][:200].replace("|", "\\|") + " |" for f in finals]
    return ["## Finalists, scored on every reveal context", "",
            "| loop | relevance | diversity | score | instruction |", "|---|---|---|---|---|", *rows, ""]
