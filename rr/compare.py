"""`rr compare`: release methods side by side on one task, the same forget set, retain data and test split.

Each method (rr/methods) starts from the job's base model and writes compare/<method>/result.json when it
finishes, so a rerun resumes with the next method. The table and trade-off plot (the form of papers/002
Tables 2–4) are rebuilt from those results every time.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from dataclasses import asdict
from typing import Callable

from rr.config import CompareConfig, ReleaseConfig
from rr.core.prompt import prompt_to_json
from rr.methods import Method, MethodRun, ReleaseData, get_method


def base_scores(job, split: str) -> dict:
    """The base model's scores on `split`: the release stage's step 0 when it ran, else scored once here."""
    from rr.release.loop import evaluation_dict

    state = job.read_json("release/state.json")
    if state and state["steps"]:
        return state["steps"][0][split]
    cached = job.read_json(f"compare/base_{split}.json")
    if cached is None:
        cached = evaluation_dict(job.executor.evaluate(job.task, split))
        job.write_json(f"compare/base_{split}.json", cached)
    return cached


def comparison_data(job, config: CompareConfig, progress: Callable[[str], None]) -> ReleaseData:
    """The forget set every method gets (running Reveal first when it is self-generated and missing)."""
    from rr.release.ablation import external_examples
    from rr.release.stage import load_forget_examples
    from rr.reveal.stage import run_reveal

    if config.forget_data == "external":
        forget = external_examples(job)
    else:
        job.tracker.reveal_finished(run_reveal(job, progress))
        forget = load_forget_examples(job)
    return ReleaseData(forget=forget, retain=job.task.retain_examples(), source=config.forget_data)


def data_fingerprint(data: ReleaseData) -> dict:
    digest = hashlib.sha256()
    for example in data.forget:
        digest.update(json.dumps([prompt_to_json(example.prompt), example.response]).encode())
    return {"source": data.source, "forget_examples": len(data.forget), "forget_sha256": digest.hexdigest(),
            "retain_examples": len(data.retain)}


def method_settings(job, config: CompareConfig, method: Method) -> dict:
    """The config a method's result depends on (its spec's `settings`, dotted paths under `compare` or
    `release`): a result made with other settings is redone."""
    return _settings_under({"compare": config, "release": job.config.release}, method)


def _with_defaults(saved, defaults):
    """`saved` with the keys it lacks taken from `defaults`, at every depth: settings an older rr wrote, before a
    key with a default was added, read as that default (a new key left at its default redoes nothing)."""
    if not isinstance(saved, dict) or not isinstance(defaults, dict):
        return saved
    return {**{k: v for k, v in defaults.items() if k not in saved},
            **{k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}}


def same_inputs(saved: dict | None, inputs: dict, method: Method) -> bool:
    """Whether a method's saved {data, settings} are `inputs`, keys added since read as their defaults."""
    if not isinstance(saved, dict):
        return False
    defaults = _settings_under({"compare": CompareConfig(), "release": ReleaseConfig()}, method)
    settings = saved.get("settings")
    settings = {path: _with_defaults(value, defaults.get(path)) for path, value in settings.items()} \
        if isinstance(settings, dict) else settings
    return saved.get("data") == inputs["data"] and settings == inputs["settings"]


def _settings_under(roots: dict, method: Method) -> dict:
    values = {}
    for path in method.settings:
        root, *keys = path.split(".")
        if root not in roots:
            raise ValueError(f"release method {method.name!r}: setting {path!r} is not under compare or release")
        value = roots[root]
        for key in keys:
            value = getattr(value, key)
        values[path] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    return values


def start_method_dir(job, name: str, inputs: dict) -> None:
    """compare/<method>/ before a method (re)starts: what a killed run of it left (a trained PEM, scored
    candidates) is resumed only when it was made from the same data and settings; otherwise it is removed,
    so a method never reuses a PEM trained on another forget set. inputs.json says what the folder is for."""
    out_dir = job.dir / "compare" / name
    if not same_inputs(job.read_json(f"compare/{name}/inputs.json"), inputs, get_method(name)) and out_dir.exists():
        shutil.rmtree(out_dir)  # rr made it (compare/<method>/ of this job)
    job.write_json(f"compare/{name}/inputs.json", inputs)


def run_compare(job, progress: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) every configured method; returns the summary written to compare/summary.json."""
    from rr.evaluation.report import plot_tradeoff, write_compare_table

    config = job.config.compare or CompareConfig()
    data = comparison_data(job, config, progress)
    fingerprint = data_fingerprint(data)
    if any(get_method(name).family == "rmu" for name in config.methods):
        from rr.methods.rmu import check_layers

        check_layers(job.model, config.rmu)  # at the start: RMU may run last, after hours of other methods
    rows = []
    for name in config.methods:
        method = get_method(name)
        out_dir = job.dir / "compare" / name
        settings = method_settings(job, config, method)
        done = job.read_json(f"compare/{name}/result.json")
        if not same_inputs(done, {"data": fingerprint, "settings": settings}, method):
            start_method_dir(job, name, {"data": fingerprint, "settings": settings})
            progress(f"compare: {name} — {method.summary}")
            module = importlib.import_module(f"rr.methods.{method.family}")
            run: MethodRun = module.run_method(job, method, data, out_dir, progress)
            done = {**asdict(run), "data": fingerprint, "settings": settings}
            job.write_json(f"compare/{name}/result.json", done)
        else:
            progress(f"compare: {name} finished before (reusing {out_dir / 'result.json'})")
        rows.append(done)
        took = "time not recorded" if done["wall_time_s"] is None else f"{done['wall_time_s']:.0f}s"
        progress(f"compare: {name}: test forget {done['test']['forget_score']:.3f}, utility "
                 f"{done['test']['utility_score']:.3f} ({took})")
    # After the methods: reveal-release's step 0 scored the base model already when it is among them.
    rows.insert(0, {"method": "base", "test": base_scores(job, "test"), "wall_time_s": None, "details": {}})
    compare_dir = job.dir / "compare"
    title = f"{job.config.task.name}: {job.config.model.name_or_path}"
    write_compare_table(rows, compare_dir, title, fingerprint, getattr(job.task, "held_out_forms", ()),
                        getattr(job.task, "form_metric", "hit rate"))
    plot_tradeoff(rows, compare_dir / "tradeoff.png", title)
    summary = {"data": fingerprint, "methods": [r["method"] for r in rows[1:]],
               "rows": [{k: r[k] for k in ("method", "test", "wall_time_s", "details")} for r in rows]}
    job.write_json("compare/summary.json", summary)
    job.tracker.compare_finished(summary)
    return summary
