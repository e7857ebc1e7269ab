"""The `rr` command: reveal, release, run (both + evaluation), compare, ablate, audit, eval, export; promote and
models for the registry."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from rr.errors import RRError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="rr: make an LLM forget a behaviour without being handed the data to forget.")
console = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", "-c", help="job config (YAML); defaults to the embedded quickstart")
OutputOption = typer.Option(None, "--output", "-o", help="job directory (overrides the config's output_dir)")


def _progress(start: float):
    # Messages carry user and model text (names, paths, instructions): never markup.
    def emit(message: str) -> None:
        console.print(f"[dim]{time.time() - start:7.1f}s[/dim] {escape(message)}")
    return emit


def _show(text: str) -> None:
    """Print a report or other text rr did not write itself (model answers, names, paths) exactly as it is."""
    console.print(text, markup=False, highlight=False, emoji=False)


def _job(config: Optional[Path], output: Optional[Path]):
    import os

    from rr.config import load_config
    from rr.job import Job

    job = Job(load_config(config, output))  # validates everything before the job directory is touched
    os.umask(0o077)  # what the stages write into the job directory is the owner's only (forget data)
    console.print(f"[bold]rr[/bold] job [cyan]{escape(job.config.name)}[/cyan] → {escape(str(job.dir))}")
    return job


@contextmanager
def _tracked(job, start: float):
    """The job's MLflow run around a command: closed (and its buffered records sent) however the command ends."""
    # Unwrapped and unstyled: tracking messages carry paths, URIs and commands to copy.
    job.tracker.say = lambda message: console.print(f"[dim]{time.time() - start:7.1f}s[/dim] {escape(message)}",
                                                    soft_wrap=True)
    try:
        yield job.tracker
    except BaseException:
        job.tracker.close(failed=True)
        raise
    job.tracker.close()


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
    raise typer.Exit(2)


@app.command()
def reveal(config: Optional[Path] = ConfigOption, output: Optional[Path] = OutputOption):
    """Stage 1: search instructions with NeuralUCB and write the self-generated forget set."""
    from rr.reveal.stage import run_reveal

    start = time.time()
    try:
        job = _job(config, output)
        with _tracked(job, start) as tracker:
            manifest = run_reveal(job, _progress(start))
            tracker.reveal_finished(manifest)
    except RRError as exc:
        _fail(exc)
    _show((job.dir / "reveal" / "report.md").read_text())
    _show(f"forget set: {manifest['size']} records in {job.dir / 'reveal' / 'forget_set.jsonl'}")


@app.command()
def release(config: Optional[Path] = ConfigOption, output: Optional[Path] = OutputOption):
    """Stage 2: compose forget/retain PEMs with rule-chosen weights (needs a finished reveal)."""
    from rr.release.stage import run_release

    start = time.time()
    try:
        job = _job(config, output)
        with _tracked(job, start):
            run_release(job, _progress(start))
    except RRError as exc:
        _fail(exc)
    _print_release(job)


@app.command()
def run(config: Optional[Path] = ConfigOption, output: Optional[Path] = OutputOption):
    """Reveal, release and evaluate in one job; rerunning the same command resumes where it stopped."""
    from rr.release.stage import run_release
    from rr.reveal.stage import run_reveal

    start = time.time()
    try:
        job = _job(config, output)
        progress = _progress(start)
        with _tracked(job, start) as tracker:
            tracker.reveal_finished(run_reveal(job, progress))
            run_release(job, progress)
    except RRError as exc:
        _fail(exc)
    _show((job.dir / "reveal" / "report.md").read_text())
    _print_release(job)
    console.print(f"total {time.time() - start:.0f}s")


def _print_release(job) -> None:
    release_dir = job.dir / "release"
    _show((release_dir / "steps.md").read_text())
    _show((release_dir / "summary.md").read_text())
    _show(f"step table {release_dir / 'steps.csv'}, plot {release_dir / 'steps.png'}")


@app.command()
def ablate(config: Optional[Path] = ConfigOption, output: Optional[Path] = OutputOption):
    """pem-external vs the self-generated forget set at matched forget score (papers/002 Tables 5–6)."""
    import json

    from rr.release.ablation import run_ablation

    try:
        job = _job(config, output)
        result = run_ablation(job, _progress(time.time()))
    except RRError as exc:
        _fail(exc)
    internal, external = result["internal"]["test"], result["external"]["test"]
    console.print(f"matched validation forget score ≤ {result['target_forget_score']:.3f}")
    console.print(f"internal (self-generated, weight {result['internal']['merge_weight']:+g}): "
                  f"forget {internal['forget_score']:.3f}, utility {internal['utility_score']:.3f}")
    console.print(f"external (weight {result['external']['merge_weight']:+g}, reached target "
                  f"{result['external']['reached_target']}): forget {external['forget_score']:.3f}, "
                  f"utility {external['utility_score']:.3f}")
    print(json.dumps({k: result[k] for k in ("target_forget_score", "internal_keeps_more_utility")}))


@app.command()
def compare(config: Optional[Path] = ConfigOption, output: Optional[Path] = OutputOption):
    """Release methods side by side (compare.methods) on the same forget set: a table and a trade-off plot."""
    from rr.compare import run_compare

    start = time.time()
    try:
        job = _job(config, output)
        with _tracked(job, start):
            run_compare(job, _progress(start))
    except RRError as exc:
        _fail(exc)
    compare_dir = job.dir / "compare"
    _show((compare_dir / "table.md").read_text())
    _show(f"table {compare_dir / 'table.csv'}, plot {compare_dir / 'tradeoff.png'}; total {time.time() - start:.0f}s")


@app.command()
def audit(config: Optional[Path] = ConfigOption, output: Optional[Path] = OutputOption):
    """Attack a finished job's models (relearning, membership inference, probes); verdict and report in JOB/audit/."""
    from rr.audit.stage import run_audit

    start = time.time()
    try:
        job = _job(config, output)
        with _tracked(job, start):
            result = run_audit(job, _progress(start))
    except RRError as exc:
        _fail(exc)
    _show((job.dir / "audit" / "report.md").read_text())
    _show(f"report {job.dir / 'audit' / 'report.html'}; total {time.time() - start:.0f}s")
    raise typer.Exit(0 if result["verdict"]["passed"] else 1)


@app.command("eval")
def evaluate(config: Optional[Path] = ConfigOption, output: Optional[Path] = OutputOption,
             ledger: Optional[Path] = typer.Option(None, help="a job's release/ledger.json to compose on the base"),
             step: Optional[int] = typer.Option(None, help="compose the ledger's entries up to this release step only "
                                                "(a step the job did not score on the test split: release.test_each_step)"),
             split: str = typer.Option("test", help="reveal, validation or test")):
    """Score the base model, or base + a ledger (up to --step), on the config's task."""
    import json

    from rr.evaluation.forms import evaluate_with_forms
    from rr.release.ledger import Ledger
    from rr.tasks.base import SPLITS

    try:
        if split not in SPLITS:
            raise RRError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
        job = _job(config, output)
        composition = []
        if ledger is not None:
            if not ledger.is_file():
                raise RRError(f"--ledger {ledger}: no such file; pass JOB_DIR/release/ledger.json")
            loaded = Ledger.load(ledger)
            if step is not None:
                steps = [entry.step for entry in loaded.entries]
                if step not in steps:
                    raise RRError(f"--step {step}: the ledger {ledger} applied steps {steps}; choose one of them")
                loaded.entries = [entry for entry in loaded.entries if entry.step <= step]
            composition = loaded.resolve(ledger.parent)
        elif step is not None:
            raise RRError("--step needs --ledger JOB_DIR/release/ledger.json: it names a step of that ledger")
        # through the job's executor, so a vLLM generator serves the ledger as one adapter, as the stages do
        result, table = evaluate_with_forms(job.executor, job.task, split, composition)
    except RRError as exc:
        _fail(exc)
    if table:
        _show(table)  # stderr: stdout is the JSON
    print(json.dumps(result, indent=2))


@app.command()
def export(run_dir: Path = typer.Option(..., "--run", help="a job directory with a finished release"),
           merged: Optional[Path] = typer.Option(None, help="write a merged HF model directory here"),
           adapter: Optional[Path] = typer.Option(None, help="write the rank-sum PEFT adapter here")):
    """Export the unlearned model as merged weights or as one standard PEFT adapter."""
    from rr.config import load_config
    from rr.job import Job
    from rr.release.ledger import Ledger, export_adapter, export_merged

    try:
        if not merged and not adapter:
            raise RRError("export: pass --merged OUT_DIR and/or --adapter OUT_DIR")
        ledger_path = run_dir / "release" / "ledger.json"
        if not ledger_path.is_file():
            raise RRError(f"--run {run_dir}: no release/ledger.json; run `rr release` first")
        job = Job(load_config(run_dir / "config.yaml", run_dir))
        pems = Ledger.load(ledger_path).resolve(ledger_path.parent)
        if adapter:
            export_adapter(pems, adapter, job.config.model.name_or_path)
            _show(f"adapter → {adapter}")
        if merged:
            export_merged(job.model, pems, merged, tokenizer=job.tokenizer)
            _show(f"merged model → {merged}")
    except RRError as exc:
        _fail(exc)


TrackingUriOption = typer.Option(None, "--tracking-uri", help="the registry (default: the --config job's store, "
                                  "else MLFLOW_TRACKING_URI)")


def _registry(config: Optional[Path], tracking_uri: Optional[str]):
    """(MLflow client, gates) for promote/models: the URI from the flag, else the config's job store."""
    import os

    from rr.config import TrackingConfig, check_tracking_uri, load_config, quote
    from rr.errors import RegistryError
    from rr.tracking.store import client_for, resolve_tracking_uri

    if tracking_uri is not None:  # before any client exists: MLflow would make a directory of a bare word
        try:
            check_tracking_uri(tracking_uri)
        except ValueError as exc:
            raise RegistryError(f"--tracking-uri {quote(tracking_uri)}: {exc}") from None
    job_config = load_config(config) if config else None
    tracking = job_config.tracking if job_config else TrackingConfig()
    if tracking_uri is None and job_config is not None:
        tracking_uri, _ = resolve_tracking_uri(tracking.tracking_uri, job_config.output_dir.resolve())
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise RRError("which registry? pass --config JOB.yaml (its tracking store), --tracking-uri URI, or set "
                      "MLFLOW_TRACKING_URI")
    try:
        check_tracking_uri(tracking_uri)
    except ValueError as exc:
        raise RegistryError(f"MLFLOW_TRACKING_URI {quote(tracking_uri)}: {exc}") from None
    return client_for(tracking_uri), tracking.gates


@app.command()
def promote(name: str = typer.Argument(..., help="registered model name"),
            version: str = typer.Argument(..., help="the version to make champion"),
            config: Optional[Path] = typer.Option(None, "--config", "-c", help="job config whose tracking.gates apply "
                                                  "(and whose store is the registry); default gates otherwise"),
            tracking_uri: Optional[str] = TrackingUriOption,
            force: bool = typer.Option(False, "--force", help="promote even if a gate fails (needs --reason)"),
            reason: Optional[str] = typer.Option(None, "--reason", help="why the gates are bypassed (recorded)")):
    """Move the alias `champion` to a version whose recorded test scores pass the promotion gates."""
    from rr.config import quote
    from rr.tracking.registry import CHAMPION, bounded_http, promote as promote_version

    try:
        if not version.isdigit():
            raise RRError(f"VERSION {quote(version)}: a version number such as 3 (see `rr models NAME`)")
        with bounded_http():
            client, gates = _registry(config, tracking_uri)
            lines = promote_version(client, name, version, gates.model_dump(), force, reason)
    except RRError as exc:
        _fail(exc)
    for line in lines:
        _show(f"  {line}")
    forced = any("FAIL" in line for line in lines)
    _show(f"{name} version {version} is now {CHAMPION}" + (f" (FORCED: {reason})" if forced else ""))


@app.command()
def models(name: str = typer.Argument(..., help="registered model name"),
           config: Optional[Path] = typer.Option(None, "--config", "-c", help="job config whose store is the registry"),
           tracking_uri: Optional[str] = TrackingUriOption):
    """List a registered model's versions with their aliases and recorded scores."""
    from rich.table import Table

    from rr.tracking.registry import bounded_http, list_versions

    try:
        with bounded_http():
            client, _ = _registry(config, tracking_uri)
            rows = list_versions(client, name)
    except RRError as exc:
        _fail(exc)
    table = Table(title=escape(f"{name} ({client.tracking_uri})"))
    for column in ("version", "aliases", "forget", "utility", "utility / base", "run"):
        table.add_column(column)
    for row in rows:
        ratio = (f"{float(row['utility_score']) / float(row['base_utility_score']):.3f}"
                 if row["utility_score"] and row["base_utility_score"] and float(row["base_utility_score"]) else "–")
        cells = (row["version"], ", ".join(row["aliases"]) + (" (forced)" if row["forced"] else ""),
                 row["forget_score"] or "–", row["utility_score"] or "–", ratio, row["run_id"] or "–")
        table.add_row(*(escape(str(cell)) for cell in cells))  # tags and aliases are anyone's text
    Console().print(table)


from rr.deploy.cli import register as _register_deploy  # noqa: E402 - submit, status, logs (rr/deploy)

_register_deploy(app)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":
    main()
