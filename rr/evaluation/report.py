"""The release report: the per-step table (CSV and Markdown, the form of papers/002 Tables 7–9) and a plot."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence


def _weight_label(step: dict) -> str:
    if step["kind"] == "base":
        return "base model"
    return f"{step['merge_weight']:+g} ({step['kind']})"


def step_rows(steps: Sequence[dict]) -> tuple[list[str], list[list]]:
    """Header and rows: step, weight applied, s, u and every test metric, with Wilson intervals."""
    metric_names = sorted({m for s in steps for m in s["test"]["metrics"]})
    header = ["step", "weight_applied", "forget_score", "utility_score", *metric_names, "rule", "passed"]
    rows = []
    for s in steps:
        test = s["test"]
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
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_steps(steps: Sequence[dict], path: Path, title: str) -> Path:
    """Every test metric across steps (the form of the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_names = sorted({m for s in steps for m in s["test"]["metrics"]})
    labels = [f"{s['step']}\n{_weight_label(s)}" for s in steps]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in metric_names:
        values = [s["test"]["metrics"].get(m) for s in steps]
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
