"""The audit's report: audit/report.md (tables) and audit/report.html, one self-contained file a person reads
(the verdict first, then the recovery curve, the membership ROC curves and the probe bars, plots embedded as
PNG). Numbers only: no forget record, prompt or answer is written into either."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from rr.core.files import atomic_write_text

LABELS = {"base": "base model", "rr": "rr (final)", "single-negation": "single negation",
          "never-knew": "never knew (before learning)"}  # never-knew: relearning only (audit.never_knew_model)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _relearned(models: dict) -> list[str]:
    """The models with relearning scores (all; the never-knew control and a base model not attacked have only
    those)."""
    return [n for n in LABELS if n in models]


def tables(audit: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, shared by the two reports."""
    models = audit["models"]
    names = [n for n in LABELS if n in models and "probes" in models[n]]
    steps = ["0"] + [str(s) for s in audit["relearn_steps"]]
    out = []
    where = "counted forms" if audit["counted_forms"] else "forms (none counted: every form)"
    out.append((f"Relearning: forget score on the test split's {where} "
                f"({audit['relearn_eval_items']} items) after N updates on {audit['relearn_examples']} relearn-split "
                "examples; recovery = (s_N − s_0) / (s_base − s_0)",
                ["model"] + [f"score @ {s}" for s in steps] + [f"recovery @ {s}" for s in steps[1:]],
                [[LABELS[n]] + [_fmt(models[n]["relearn"]["scores"].get(s)) for s in steps]
                 + [_fmt(models[n]["relearn"].get("recovery", {}).get(s)) for s in steps[1:]]
                 for n in _relearned(models)]))
    attacks = list(next(iter(models[n]["membership"]["auc"] for n in names)))
    m = audit["membership"]
    out.append((f"Membership inference: AUC of the {m['members']} forget records (members) against "
                f"{m['non_members']} answers to contexts the job never used (0.5: indistinguishable)",
                ["model"] + [f"{a} AUC" for a in attacks] + ["max |AUC − 0.5|"],
                [[LABELS[n]] + [_fmt(models[n]["membership"]["auc"][a]) for a in attacks]
                 + [_fmt(max(abs(v - 0.5) for v in models[n]["membership"]["auc"].values()))] for n in names]))
    families = audit["probe_families"]
    worst_first = sorted(families, key=lambda f: -models.get("rr", models[names[0]])["probes"]["rates"].get(f, 0))
    counted = audit.get("counted_probe_families", families)
    out.append((f"Probes: forget score per family (test-split problems; worst family for rr first; * = not counted: "
                f"the base model passed fewer than {audit.get('min_probe_base_hits', 0)} of its items), then the "
                "counted forms from the release summary",
                ["model"] + [f if f in counted else f + " *" for f in worst_first]
                + [f"form {f}" for f in audit["counted_forms"]],
                [[LABELS[n]] + [_fmt(models[n]["probes"]["rates"].get(f)) for f in worst_first]
                 + [_fmt(models[n]["forms"].get(f)) for f in audit["counted_forms"]] for n in names]))
    keys = sorted({k for n in names for k in models[n]["utility"]})
    out.append(("Utility kept (test split, from the release summary)", ["model"] + keys,
                [[LABELS[n]] + [_fmt(models[n]["utility"].get(k)) for k in keys] for n in names]))
    if "set_aside" in audit:  # a task whose relearn split and non-members are facts set aside (the entity task)
        aside = audit["set_aside"]
        out.append((f"Set-aside facts: answered by the job's model (asked their own question), and stated by any of "
                    f"the {aside['forget_records']} forget records (then they were forget data too)",
                    ["facts", "answered", "forget records stating one"],
                    [[use, f"{v['known']} of {v['asked']}", str(aside["forget_records_stating"][use])]
                     for use, v in aside["known_by_model"].items()]))
    return out


def _markdown_table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(row) + " |" for row in rows]]


def markdown(audit: dict, title: str) -> str:
    v = audit["verdict"]
    lines = [f"# Audit: {title}", "", f"**Verdict: {'PASS' if v['passed'] else 'FAIL'}** (rr's model against the "
             "audit gates)", ""] + [f"- {c['line']}" for c in v["checks"]] + [""]
    for caption, header, rows in tables(audit):
        lines += [f"## {caption}", "", *_markdown_table(header, rows), ""]
    lines += ["Probe families:", "", *[f"- **{f}**: {s}" for f, s in audit["probe_summaries"].items()], ""]
    return "\n".join(lines)


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def plots(audit: dict) -> dict[str, str]:
    """Base64 PNGs: the recovery curve, the membership ROC curves, the probe bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = audit["models"]
    names = [n for n in LABELS if n in models and "probes" in models[n]]
    out = {}
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    steps = [0] + list(audit["relearn_steps"])
    for n in _relearned(models):
        scores = models[n]["relearn"]["scores"]
        ax.plot(steps, [scores.get(str(s)) for s in steps], marker="o", label=LABELS[n])
    ax.set_xlabel("relearning updates")
    ax.set_ylabel("forget score (test, counted forms)")
    ax.set_title("Relearning attack")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the plot: inside, it covered a curve
    out["relearn"] = _png(fig)
    plt.close(fig)
    attacks = list(models[names[0]]["membership"]["roc"])
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.2 * len(attacks), 3.2), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for n in names:
            curve = models[n]["membership"]["roc"][attack]
            ax.plot([p[0] for p in curve], [p[1] for p in curve],
                    label=f"{LABELS[n]} ({models[n]['membership']['auc'][attack]:.2f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{attack} ROC")
        ax.set_xlabel("false-positive rate")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("true-positive rate")
    out["roc"] = _png(fig)
    plt.close(fig)
    families = audit["probe_families"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        ax.bar([f + i * width for f in range(len(families))], [models[n]["probes"]["rates"].get(f, 0) for f in families],
               width, label=LABELS[n])
    ax.set_xticks([f + width * (len(names) - 1) / 2 for f in range(len(families))], families, rotation=20, fontsize=8)
    ax.set_ylabel("forget score")
    ax.set_title("Probes")
    ax.legend()
    out["probes"] = _png(fig)
    plt.close(fig)
    return out


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;"
         "text-align:right}td:first-child,th:first-child{text-align:left}.pass{color:#196c2e}.fail{color:#b00020}"
         ".verdict{font-size:1.6em;font-weight:bold}img{max-width:100%}")


def html_report(audit: dict, title: str) -> str:
    esc = html.escape
    v = audit["verdict"]
    state = "pass" if v["passed"] else "fail"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>rr audit: {esc(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>rr audit: {esc(title)}</h1>",
             f"<p class='verdict {state}'>Verdict: {'PASS' if v['passed'] else 'FAIL'}</p><ul>"]
    parts += [f"<li class='{'pass' if c['passed'] else 'fail'}'>{esc(c['line'])}</li>" for c in v["checks"]]
    parts.append("</ul>")
    images = plots(audit)
    for (caption, header, rows), image in zip(tables(audit), ["relearn", "roc", "probes", None, None]):
        parts.append(f"<h2>{esc(caption)}</h2>")
        if image:
            parts.append(f"<img alt='{image}' src='data:image/png;base64,{images[image]}'>")
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("<h2>Probe families</h2><ul>")
    parts += [f"<li><b>{esc(f)}</b>: {esc(s)}</li>" for f, s in audit["probe_summaries"].items()]
    parts.append("</ul></body></html>")
    return "\n".join(parts)


def write_reports(audit: dict, directory: Path, title: str) -> tuple[Path, Path]:
    md, page = directory / "report.md", directory / "report.html"
    atomic_write_text(md, markdown(audit, title))
    atomic_write_text(page, html_report(audit, title))
    return md, page
