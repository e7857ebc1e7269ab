"""`rr audit`: attack a finished job's models (the base model, rr's result, the single negation) and decide
whether rr's forgetting holds up: relearning, membership inference on the forget set, adversarial probes, and
the utility kept beside them. Writes JOB/audit/; each part is saved as it finishes, so a rerun resumes.

Everything runs through the job's executor (in this process or on Ray), on compositions of saved PEMs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

from rr.audit.membership import ATTACKS, auc, roc_curve
from rr.audit.verdict import audit_checks, counted_probe_families, recovery, verdict, verdict_tags
from rr.config import AuditConfig
from rr.core.files import atomic_write_text
from rr.core.profile import phase, profiling
from rr.core.prompt import prompt_from_json
from rr.errors import RRError
from rr.generation.base import request_seed
from rr.release.ledger import Ledger, Pem, WeightedPem, pem_digest
from rr.reveal.search import instruction_prompt
from rr.tasks.base import SamplingParams

SUMMARY_NAMES = {"base": "base", "rr": "rr", "single-negation": "single negation"}  # summary.json's model names
ROC_POINTS = 60  # per curve in audit.json and the plot


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class AuditDir:
    """JOB/audit/: one JSON file per finished part, with the key of what it was computed from (a part whose
    inputs changed is computed again)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def load(self, name: str, key: str):
        path = self.root / f"{name}.json"
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        return saved["result"] if saved.get("key") == key else None

    def save(self, name: str, key: str, result) -> None:
        path = self.root / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"key": key, "result": result}, indent=1))


def _compositions(job, summary: dict, wanted) -> dict[str, list[WeightedPem]]:
    release = job.dir / "release"
    out = {"base": []}
    out["rr"] = list(Ledger.load(release / "ledger.json").resolve(release))
    baseline = summary.get("baseline")
    if "single-negation" in wanted:
        if not baseline or not baseline.get("pem"):
            raise RRError("audit.models lists single-negation, but this job has no single-negation baseline "
                          "(release.single_negation_baseline is off); remove it from audit.models")
        out["single-negation"] = [WeightedPem(Pem.load(release / "pems" / baseline["pem"]), baseline["merge_weight"])]
    return out


def _composition_key(composition) -> str:
    """What a composition is: each PEM's weights (its tensors' bytes) and merge weight. A job whose release was
    redone gets new keys, so no audit part of the old models is reused."""
    return _key([(pem_digest(weighted.pem), repr(weighted.merge_weight)) for weighted in composition])


def _members_and_non_members(job, material, cfg: AuditConfig, store: AuditDir, progress) -> tuple[list, list]:
    """(prompt, answer) pairs. Members: the forget records, as the forget PEM was trained on them. Non-members:
    the base model's answers, under the same instructions and decoding, to contexts the job never used."""
    path = job.dir / "reveal" / "forget_set.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise RRError(f"{path}: the forget set is empty; nothing to attack")
    members = [(prompt_from_json(r["prompt"]), r["response"]) for r in records]
    instructions = sorted({r["instruction"] for r in records})
    contexts = material.non_member_contexts()
    reveal = job.config.reveal
    params = SamplingParams(max_new_tokens=reveal.max_new_tokens, temperature=reveal.temperature, top_p=reveal.top_p,
                            n=1, stop=job.task.answer_stop)
    key = _key("non-members", [c.id for c in contexts], instructions, params.__dict__, job.config.seed)
    answers = store.load("non_members", key)
    if answers is None:
        progress(f"audit: the base model answers {len(contexts)} contexts the job never used (membership non-members)")
        prompts = [instruction_prompt(instructions[i % len(instructions)], c) for i, c in enumerate(contexts)]
        seeds = [request_seed(job.config.seed, "audit-non-member", c.id) for c in contexts]
        answers = [texts[0] if texts else "" for texts in job.executor.generate(prompts, params, seeds)]
        store.save("non_members", key, answers)
    non_members = [(c.prompt, a) for c, a in zip(contexts, answers) if a.strip()]
    if not non_members:
        raise RRError(f"rr audit: the base model gave no answer to any of the {len(contexts)} non-member contexts; "
                      "membership inference needs some (raise audit.n_non_member_problems or reveal.max_new_tokens)")
    return members, non_members


def _membership(model, members, non_members, k: float) -> dict:
    stats_in = model.token_stats([p for p, _ in members], [a for _, a in members])
    stats_out = model.token_stats([p for p, _ in non_members], [a for _, a in non_members])
    result = {"members": len(members), "non_members": len(non_members), "auc": {}, "roc": {}}
    for name, attack in ATTACKS.items():
        score = (lambda s, a=attack: a(s, k)) if name in ("mink", "minkpp") else attack
        inside = [score(s) for s in stats_in if s.logprobs]
        outside = [score(s) for s in stats_out if s.logprobs]
        result["auc"][name] = auc(inside, outside)
        curve = roc_curve(inside, outside)
        stride = max(1, len(curve) // ROC_POINTS)
        result["roc"][name] = curve[::stride] + ([curve[-1]] if (len(curve) - 1) % stride else [])
    return result


def _relearn(job, name: str, composition, material, cfg: AuditConfig, items, store: AuditDir, key: str,
             progress, train: bool = True) -> dict:
    """Scores of one relearning run on the evaluation items: before it ("0") and after each checkpoint (with
    `train`; without, the score before relearning only)."""
    saved = store.load(f"relearn-{name}", key) or {"scores": {}}
    scores = saved["scores"]
    if "0" not in scores:
        progress(f"audit: {name}: scoring {len(items)} forget items before relearning")
        hits = material.hits(job.executor.model(composition), items)
        scores["0"] = sum(hits) / len(hits)
        store.save(f"relearn-{name}", key, saved)
    out_dir = store.root / "relearn" / name
    missing = [s for s in cfg.relearn_steps if str(s) not in scores] if train else []
    stamp = out_dir / "key"  # what the checkpoints were trained from: others are never scored
    if missing and (not stamp.exists() or stamp.read_text() != key):
        shutil.rmtree(out_dir, ignore_errors=True)  # audit/relearn/NAME is the audit's own
    if missing and not all(Pem.is_saved(out_dir / f"step-{s}") for s in cfg.relearn_steps):
        progress(f"audit: {name}: relearning on {len(material.relearn_examples())} relearn-split examples for "
                 f"{max(cfg.relearn_steps)} updates")
        job.executor.train_pem(composition, material.relearn_examples(), cfg.relearn_lora, f"relearn-{name}",
                               "relearn", out_dir, seed=job.config.seed + 7, checkpoints=cfg.relearn_steps)
        atomic_write_text(stamp, key)
    for step in missing:
        pem = Pem.load(out_dir / f"step-{step}")
        hits = material.hits(job.executor.model([*composition, WeightedPem(pem, 1.0)]), items)
        scores[str(step)] = sum(hits) / len(hits)
        progress(f"audit: {name}: forget score {scores[str(step)]:.3f} after {step} relearning updates")
        store.save(f"relearn-{name}", key, saved)
    return saved


def _never_knew(job, material, cfg: AuditConfig, items, store: AuditDir, key: str, progress) -> dict:
    """The relearning attack on the model before it learned the target (audit.never_knew_model), through a job
    of its own in JOB/audit/never-knew-<model key> (the job's config with that model; the same kind of
    executor). Nothing is loaded when its scores are saved."""
    from rr.job import Job

    saved = store.load("relearn-never-knew", key)
    if saved and all(str(s) in saved["scores"] for s in ["0", *cfg.relearn_steps]):
        return saved
    config = job.config.model_copy(deep=True)
    config.model.name_or_path = cfg.never_knew_model
    config.model.gguf_file = config.model.revision = None  # the learned model's file and revision are not its
    config.output_dir = store.root / f"never-knew-{_key(cfg.never_knew_model)[:8]}"
    control = Job(config)
    try:
        control.executor.prepare("release", len(material.relearn_examples()))
        return _relearn(control, "never-knew", [], material, cfg, items, store, key, progress)
    finally:
        control.close()


def _probes(job, name: str, composition, material, items, store: AuditDir, key: str, progress) -> dict:
    cached = store.load(f"probes-{name}", key)
    if cached is not None:
        return cached
    progress(f"audit: {name}: {len(items)} probe prompts")
    hits = material.hits(job.executor.model(composition), items)
    rates: dict[str, list[int]] = {}
    for item, hit in zip(items, hits):
        rates.setdefault(item.family, [0, 0])
        rates[item.family][0] += int(hit)
        rates[item.family][1] += 1
    result = {"hits": {f: h for f, (h, _) in rates.items()}, "items": {f: n for f, (_, n) in rates.items()},
              "rates": {f: h / n for f, (h, n) in rates.items()}}
    store.save(f"probes-{name}", key, result)
    return result


def _utility(summary: dict, name: str) -> dict:
    """The test split's utility numbers of a model, as the release summary measured them."""
    evaluation = {"base": summary["base"], "rr": summary["final"],
                  "single-negation": (summary.get("baseline") or {}).get("test")}[name]
    if not evaluation:
        return {}
    keep = ("general_check", "general_check_instructions", "general_check_arithmetic", "perplexity")
    return {"utility_score": evaluation["utility_score"],
            **{k: v for k, v in evaluation.get("metrics", {}).items() if k in keep}}


def _form_rates(summary: dict, name: str) -> dict:
    forms = summary.get("forms") or {}
    model = SUMMARY_NAMES[name]
    return {row["form"]: row[model]["rate"] for row in forms.get("rows", []) if row.get("counted") and model in row}


def _audit_model(job, name: str, composition, material, cfg, summary: dict, store, model_keys: dict, forget_key: str,
                 relearn_key: str, probe_key: str, members, non_members, eval_items, probe_items, progress) -> dict:
    """One audited model's membership inference, relearning and probes (each loaded from the audit's checkpoint
    when it was made before)."""
    membership_key = _key(model_keys[name], forget_key, [a for _, a in non_members], cfg.mink_k)
    membership = store.load(f"membership-{name}", membership_key)
    if membership is None:
        progress(f"audit: {name}: membership inference on {len(members)} forget records vs "
                 f"{len(non_members)} non-members")
        with phase("membership"):
            membership = _membership(job.executor.model(composition), members, non_members, cfg.mink_k)
        store.save(f"membership-{name}", membership_key, membership)
    with phase("relearn"):
        relearned = _relearn(job, name, composition, material, cfg, eval_items, store,
                             _key(relearn_key, model_keys[name]), progress)
    with phase("probes"):
        probes = _probes(job, name, composition, material, probe_items, store, _key(probe_key, model_keys[name]),
                         progress)
    return {"ledger": [f"{w.merge_weight:+g}·{w.pem.name}" for w in composition], "membership": membership,
            "relearn": relearned, "probes": probes, "forms": _form_rates(summary, name),
            "utility": _utility(summary, name)}


def run_audit(job, progress: Callable[[str], None] = print) -> dict:
    """The audit of a finished job; returns audit.json's content."""
    with profiling(job.dir / "profile.jsonl"), phase("audit"):
        return _audit(job, progress)


def _audit(job, progress: Callable[[str], None]) -> dict:
    from rr.audit.report import write_reports
    from rr.tasks.registry import TASKS

    cfg = job.config.audit or AuditConfig()
    summary = job.read_json("release/summary.json")
    if summary is None:
        raise RRError(f"{job.dir / 'release' / 'summary.json'}: no finished release; run `rr run` (or `rr release`) "
                      "with this config first")
    spec = TASKS[job.config.task.name]
    if spec.audit is None:
        have = ", ".join(name for name, task_spec in TASKS.items() if task_spec.audit)
        raise RRError(f"rr audit: the {job.config.task.name} task has no audit material yet (a relearn split, "
                      f"membership non-members and probes); these tasks have: {have}")
    material = spec.audit(job.task, cfg)
    store = AuditDir(job.dir / "audit")
    compositions = _compositions(job, summary, cfg.models)
    model_keys = {name: _composition_key(composition) for name, composition in compositions.items()}
    job.executor.prepare("release", len(material.relearn_examples()))  # generation and training, as Release

    members, non_members = _members_and_non_members(job, material, cfg, store, progress)
    forms = summary.get("forms") or {}
    counted = forms.get("counted_forms") or []
    # Relearning is scored where the base model shows the skill (the counted forms); with none counted (a tiny
    # config), on every test form, and the report says so.
    relearn_forms = counted or [row["form"] for row in forms.get("rows", [])]
    eval_items = material.forget_items(relearn_forms, cfg.relearn_eval_items)
    if not eval_items:
        raise RRError("rr audit: the release summary lists no test-split form to score relearning on; rerun "
                      "`rr release` with this version of rr")
    families = cfg.probe_families or list(material.probe_families)
    probe_items = material.probe_items(families, cfg.probe_items_per_family)
    # the checkpoints are one run: a score at step N does not depend on which other steps are asked for
    relearn_key = _key([i.id for i in eval_items], cfg.relearn_lora.model_dump(),
                       [(e.prompt, e.response) for e in material.relearn_examples()], job.config.seed)
    probe_key = _key([(i.id, i.prompt().to_json()) for i in probe_items])
    forget_key = _key([(str(p), a) for p, a in members])
    set_aside = None
    if hasattr(material, "set_aside_checks"):  # a task whose relearn split and non-members are facts set aside
        set_aside_key = _key("set-aside", model_keys["base"], forget_key, relearn_key,
                             [c.id for c in material.non_member_contexts()])
        set_aside = store.load("set_aside", set_aside_key)
        if set_aside is None:
            set_aside = material.set_aside_checks(job.executor.model([]), [a for _, a in members])
            store.save("set_aside", set_aside_key, set_aside)
        known = set_aside["known_by_model"]
        progress("audit: the job's model answers " + ", ".join(f"{v['known']}/{v['asked']} {use}" for use, v in
                 known.items()) + " set-aside facts; " + ", ".join(f"{n} of {set_aside['forget_records']} forget "
                 f"records state a {use} fact" for use, n in set_aside["forget_records_stating"].items()))
    models: dict[str, dict] = {}
    if "base" not in cfg.models:  # the recovery's reference: the base model's score before relearning, only
        models["base"] = {"relearn": _relearn(job, "base", [], material, cfg, eval_items, store,
                                              _key(relearn_key, model_keys["base"]), progress, train=False)}
    for name in cfg.models:  # the base model first: the others' recovery is measured against it
        with phase(name):
            models[name] = _audit_model(job, name, compositions[name], material, cfg, summary, store, model_keys,
                                        forget_key, relearn_key, probe_key, members, non_members, eval_items,
                                        probe_items, progress)
    if cfg.never_knew_model:
        job.close(release_model=True)  # the job's replicas and model make room for the control's
        models["never-knew"] = {"model": cfg.never_knew_model,
                                "relearn": _never_knew(job, material, cfg, eval_items, store,
                                                       _key(relearn_key, "never-knew", cfg.never_knew_model), progress)}
    base_before = models["base"]["relearn"]["scores"]["0"]
    for name, result in models.items():
        scores = result["relearn"]["scores"]
        result["relearn"]["recovery"] = {str(s): recovery(scores[str(s)], scores["0"], base_before)
                                         for s in cfg.relearn_steps if name != "base" and str(s) in scores}
    counted_families = counted_probe_families(models.get("base", {}).get("probes"), cfg.min_probe_base_hits) \
        if "base" in cfg.models else families
    gates = cfg.gates.applied(job.config.tracking.gates)
    checks = audit_checks(models["rr"], gates, cfg.gate_step(), counted_families,
                          _utility(summary, "base").get("utility_score")) if "rr" in models else []
    audit = {"task": job.config.task.name, "models": models, "verdict": verdict(checks),
             "relearn_steps": cfg.relearn_steps, "relearn_eval_items": len(eval_items), "counted_forms": counted,
             "relearn_forms": relearn_forms,
             "relearn_examples": len(material.relearn_examples()), "probe_families": families,
             "counted_probe_families": counted_families, "min_probe_base_hits": cfg.min_probe_base_hits,
             "probe_summaries": {f: material.probe_families[f].summary for f in families},
             "membership": {"members": len(members), "non_members": len(non_members), "mink_k": cfg.mink_k},
             **({"set_aside": set_aside} if set_aside else {}),
             "gates": {**gates.model_dump(), "relearn_gate_step": cfg.gate_step()}}
    atomic_write_text(store.root / "audit.json", json.dumps(audit, indent=1))
    write_reports(audit, store.root, f"{job.config.task.name} ({job.config.model.name_or_path})")
    job.tracker.audit_finished(audit, verdict_tags(audit))
    return audit
