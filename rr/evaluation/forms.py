"""Forgetting per form (the same items asked in several wordings): each form's hit rate for the base model, rr
and the single negation, with Wilson intervals; which forms count; the pooled rate over the counted forms and
the worst counted form. A form counts when the base model hits at least MIN_BASE_HITS of its items: where the
base model barely shows the behaviour, a drop says nothing. The others are reported, not counted."""

from __future__ import annotations

from typing import Mapping, Sequence

from rr.evaluation.metrics import wilson_interval

MIN_BASE_HITS = 5


def is_form_metric(name: str) -> bool:
    """A per-form metric ("pass@1/casual"): reported in the form table, not in the metric tables."""
    return "/" in name


def _rate(hits: int, items: int) -> dict:
    low, high = wilson_interval(hits, items)
    return {"hits": hits, "items": items, "rate": hits / items if items else 0.0, "interval": [low, high]}


def _drop(rate: float, base_rate: float) -> float | None:
    """The relative fall of a hit rate from the base model's (1.0: gone; None: the base had none)."""
    return None if base_rate == 0 else 1.0 - rate / base_rate


def form_report(base: Mapping, models: Mapping[str, Mapping], held_out: Sequence[str] = (),
                min_base_hits: int = MIN_BASE_HITS) -> dict | None:
    """The per-form report of evaluation dicts (rr.release.loop.evaluation_dict) of one split: `base` and
    each of `models` (name → evaluation, e.g. {"rr": …, "single negation": …}). None when the task has no
    forms. Per model, over the counted forms: the pooled rate; the worst form, the one with the highest rate
    (what remains most; decisions and gates use the same definition); and the form whose rate fell least
    relative to the base. A model whose evaluation lacks a form (an older result) has None there and no
    pooled or worst entry: a missing form never reads as forgotten."""
    if min_base_hits < 1:
        raise ValueError(f"form_report: min_base_hits must be ≥ 1, got {min_base_hits}")
    base_forms = base.get("forms") or {}
    if not base_forms:
        return None
    counted = [form for form, (hits, _) in base_forms.items() if hits >= min_base_hits]
    evaluations = {"base": base, **models}
    rows = []
    for form in base_forms:
        row = {"form": form, "held_out": form in held_out, "counted": form in counted}
        for name, evaluation in evaluations.items():
            found = (evaluation.get("forms") or {}).get(form)
            row[name] = _rate(*found) if found is not None else None
        rows.append(row)
    by_form = {row["form"]: row for row in rows}
    pooled, worst, least_dropped = {}, {}, {}
    for name in evaluations:
        if not counted or any(by_form[f][name] is None for f in counted):
            continue
        pooled[name] = _rate(sum(by_form[f][name]["hits"] for f in counted),
                             sum(by_form[f][name]["items"] for f in counted))
        highest = max(counted, key=lambda f: (by_form[f][name]["rate"], f))
        worst[name] = _form_entry(by_form[highest], name)
        if name == "base":
            continue
        pooled[name]["relative_drop"] = _drop(pooled[name]["rate"], pooled["base"]["rate"])
        least = max(counted, key=lambda f: (by_form[f][name]["rate"] / by_form[f]["base"]["rate"], f))
        least_dropped[name] = _form_entry(by_form[least], name)
    return {"min_base_hits": min_base_hits, "counted_forms": counted, "held_out_forms": list(held_out),
            "models": list(evaluations), "rows": rows, "pooled": pooled, "worst": worst,
            "least_dropped": least_dropped}


def _form_entry(row: Mapping, name: str) -> dict:
    rate, base_rate = row[name]["rate"], row["base"]["rate"]
    return {"form": row["form"], "rate": rate, "base_rate": base_rate,
            "relative_drop": None if name == "base" else _drop(rate, base_rate)}


def _cell(entry: Mapping | None) -> str:
    if entry is None:
        return "–"
    low, high = entry["interval"]
    return f"{entry['rate']:.3f} [{low:.2f}, {high:.2f}] ({entry['hits']}/{entry['items']})"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def form_markdown(report: Mapping, metric: str = "hit rate") -> str:
    """The report as a Markdown table and the pooled and worst-form lines."""
    names = report["models"]
    lines = [f"| form | held out | counted | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for row in report["rows"]:
        lines.append(f"| {row['form']} | {'yes' if row['held_out'] else ''} | {'yes' if row['counted'] else 'no'} | "
                     + " | ".join(_cell(row[name]) for name in names) + " |")
    counted = report["counted_forms"]
    lines.append("")
    if not counted:
        lines.append(f"No form counts: the base model hit fewer than {report['min_base_hits']} items of every form, "
                     "so no drop can be shown.")
        return "\n".join(lines) + "\n"
    lines.append(f"Counted forms (the base model hits ≥ {report['min_base_hits']} of their items): "
                 f"{', '.join(counted)}. Worst form: the counted form with the highest {metric}.")
    for name in names:
        if name not in report["pooled"]:
            lines.append(f"- {name}: not scored on every counted form")
            continue
        pooled, worst = report["pooled"][name], report["worst"][name]
        text = f"- {name}: pooled {metric} over counted forms {_cell(pooled)}"
        if name == "base":
            text += f"; worst form {worst['form']} {worst['rate']:.3f}"
        else:
            least = report["least_dropped"][name]
            text += (f", down {_percent(pooled['relative_drop'])}; worst form {worst['form']} {worst['rate']:.3f} "
                     f"(base {worst['base_rate']:.3f}, down {_percent(worst['relative_drop'])}); smallest drop: "
                     f"{least['form']}, down {_percent(least['relative_drop'])}")
        lines.append(text)
    return "\n".join(lines) + "\n"


def evaluate_with_forms(executor, task, split: str, composition=()) -> tuple[dict, str | None]:
    """`rr eval`'s and ray_jobs/evaluate.py's answer: base + `composition` scored on a split through the job's
    executor (in-process or Ray, either generation backend), as an evaluation dict with its per-form report
    against the base model (scored as well when the composition is not empty) and that report in Markdown;
    the dict alone and None for a task without forms."""
    from rr.release.loop import evaluation_dict

    composition = list(composition)
    result = evaluation_dict(executor.evaluate(task, split, composition))
    if not result.get("forms"):
        return result, None
    base = evaluation_dict(executor.evaluate(task, split, [])) if composition else result
    report = form_report(base, {"rr": result} if composition else {}, getattr(task, "held_out_forms", ()))
    return {**result, "form_report": report}, form_markdown(report, getattr(task, "form_metric", "hit rate"))
