"""Reports: the release's per-step table and plot (papers/002 Tables 7–9), and `rr compare`'s method table and
forget-vs-utility trade-off plot (papers/002 Tables 2–4)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from rr.evaluation.forms import form_markdown, form_report, is_form_metric


def _weight_label(step: dict) -> str:
    if step["kind"] == "base":
        return "base model"
    return f"{step['merge_weight']:+g} ({step['kind']})"


def _tested(steps: Sequence[dict]) -> list[dict]:
    """The steps scored on the test split (release.test_each_step off: the base and the final model only)."""
    return [s for s in steps if s["test"] is not None]


def step_rows(steps: Sequence[dict]) -> tuple[list[str], list[list]]:
    """Header and rows: step, weight applied, s, u and every test metric, with Wilson intervals; a step not
    scored on the test split (release.test_each_step off) has empty scores and says so in its rule column."""
    metric_names = sorted({m for s in _tested(steps) for m in s["test"]["metrics"] if not is_form_metric(m)})
    header = ["step", "weight_applied", "forget_score", "utility_score", *metric_names, "rule", "passed"]
    rows = []
    for s in steps:
        test = s["test"]
        if test is None:
            rows.append([s["step"], _weight_label(s), "", "", *[""] * len(metric_names),
                         f"{s['rule']} (test split not scored)", s["passed"]])
            continue
        values = [f"{test['metrics'][m]:.4f}" if m in test["metrics"] else "" for m in metric_names]
        for i, m in enumerate(metric_names):
            if m in test.get("intervals", {}):
                low, high = test["intervals"][m]
                values[i] += f" [{low:.3f}, {high:.3f}]"
        rows.append([s["step"], _weight_label(s), f"{test['forget_score']:.4f}", f"{test['utility_score']:.4f}",
                     *values, s["rule"], s["passed"]])
    return header, rows


def write_step_table(steps: Sequence[dict], directory: Path) -> tuple[Path, Path]:
    header, rows = step_rows(steps)
    csv_path, md_path = directory / "steps.csv", directory / "steps.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    md_path.write_text("\n".join(lines + candidate_lines(steps)) + "\n")
    return csv_path, md_path


def candidate_lines(steps: Sequence[dict]) -> list[str]:
    """Each step's weight candidates on the validation split, smallest first; a candidate whose scoring stopped
    early (release.stop_early) says after how many items of each part, and why."""
    lines = ["", "## Weight candidates (validation split)", "",
             "| step | weight | forget score | utility score | perplexity | general check | stopped early |",
             "|---|---|---|---|---|---|---|"]
    for s in steps:
        sign = -1 if s["kind"] == "forget" else 1
        for c in s.get("candidates", []):
            weight = f"{sign * c['weight']:+g}" + (" (applied)" if sign * c["weight"] == s["merge_weight"] else "")
            stopped = c.get("stopped_early")
            if stopped:
                parts = ", ".join(f"{done} of {total} {part}" for part, (done, total) in stopped["scored"].items())
                lines.append(f"| {s['step']} | {weight} | | | | | after {parts} items: {stopped['reason']} |")
                continue
            values = [c.get(k) for k in ("forget_score", "utility_score", "perplexity", "general_check")]
            cells = ["" if v is None else f"{v:.4f}" for v in values]
            lines.append(f"| {s['step']} | {weight} | " + " | ".join(cells) + " | |")
    return lines


def plot_steps(steps: Sequence[dict], path: Path, title: str) -> Path:
    """Every test metric across the steps scored on the test split (the form of the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = _tested(steps)
    metric_names = sorted({m for s in steps for m in s["test"]["metrics"] if not is_form_metric(m)})
    labels = [f"{s['step']}\n{_weight_label(s)}" for s in steps]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in metric_names:
        values = [s["test"]["metrics"].get(m, float("nan")) for s in steps]
        axis = axes[1] if "perplexity" in m else axes[0]
        axis.plot(range(len(steps)), values, marker="o", label=m)
    for axis, name in zip(axes, ("rates", "perplexity")):
        axis.set_xticks(range(len(steps)), labels, fontsize=7)
        axis.set_title(f"{title}: {name}")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _with_interval(evaluation: dict, metric: str) -> str:
    value = evaluation["metrics"].get(metric)
    if value is None:
        return ""
    interval = evaluation.get("intervals", {}).get(metric)
    return f"{value:.4f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def _method_note(row: dict) -> str:
    from rr.methods import get_method

    return "" if row["method"] == "base" else get_method(row["method"]).note(row.get("details", {}))


def _wall_time(row: dict) -> str:
    if row["method"] == "base":
        return ""
    return "not recorded" if row["wall_time_s"] is None else f"{row['wall_time_s']:.0f}"


def compare_rows(rows: Sequence[dict]) -> tuple[list[str], list[list]]:
    """Header and rows: method, s, u, every test metric with its Wilson interval, wall time, what was applied."""
    metric_names = sorted({m for r in rows for m in r["test"]["metrics"] if not is_form_metric(m)})
    header = ["method", "forget_score", "utility_score", *metric_names, "wall_time_s", "applied"]
    table = []
    for r in rows:
        test = r["test"]
        table.append([r["method"], f"{test['forget_score']:.4f}", f"{test['utility_score']:.4f}",
                      *[_with_interval(test, m) for m in metric_names],
                      _wall_time(r), _method_note(r)])
    return header, table


def write_compare_table(rows: Sequence[dict], directory: Path, title: str, data: dict,
                        held_out_forms: Sequence[str] = (), form_metric: str = "hit rate") -> tuple[Path, Path]:
    """compare/table.csv and compare/table.md (the Markdown says what data every method got; a task with
    forms adds every method's rate per form, pooled over counted forms and on the worst counted form)."""
    header, table = compare_rows(rows)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = directory / "table.csv", directory / "table.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(table)
    lines = [f"# Release methods compared: {title}", "",
             f"Test split; rates with Wilson 95% intervals. Every method got the same {data['source']} forget set "
             f"({data['forget_examples']} examples, sha256 {data['forget_sha256'][:16]}…) and the same "
             f"{data['retain_examples']} retain examples; weights and stopping were chosen on the validation split. "
             "Wall time covers training and weight search, not the final test scoring.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table]
    by_method = {r["method"]: r["test"] for r in rows}
    if "base" in by_method:
        forms = form_report(by_method["base"], {m: t for m, t in by_method.items() if m != "base"}, held_out_forms)
        if forms is not None:
            lines += ["", "## Per form", "", form_markdown(forms, form_metric).rstrip()]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def score_error(evaluation: dict, score: str) -> tuple[float, float] | None:
    """The Wilson interval of the rate metric a decision score is (e.g. pass@1 for the code task's forget score)."""
    for metric, value in evaluation["metrics"].items():
        if value == evaluation[score] and metric in evaluation.get("intervals", {}):
            low, high = evaluation["intervals"][metric]
            return max(value - low, 0.0), max(high - value, 0.0)
    return None


def plot_tradeoff(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Forget score (lower: more forgotten) against utility (higher: more kept), one labelled point per method,
    with Wilson 95% error bars where the score is a rate. The best corner is bottom right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 5))
    for r in rows:
        test = r["test"]
        x, y = test["utility_score"], test["forget_score"]
        x_err, y_err = score_error(test, "utility_score"), score_error(test, "forget_score")
        axis.errorbar([x], [y], xerr=None if x_err is None else [[x_err[0]], [x_err[1]]],
                      yerr=None if y_err is None else [[y_err[0]], [y_err[1]]], fmt="s" if r["method"] == "base" else "o",
                      capsize=3, label=r["method"])
        axis.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axis.set_xlabel("utility score (test; higher keeps more)")
    axis.set_ylabel("forget score (test; lower forgets more)")
    axis.set_title(f"{title}\nforget vs utility", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
