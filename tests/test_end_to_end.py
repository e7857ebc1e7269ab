"""The whole job on the real embedded model with configs/ci.yaml, killed twice (in a Reveal round, inside the first
weight search) and resumed (CLI, subprocesses)."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI_CONFIG = ROOT / "configs" / "ci.yaml"
pytestmark = pytest.mark.slow


def rr(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "rr.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800, **kwargs)


def run_until(job_dir: Path, condition, timeout_s: float = 2400) -> None:
    """Start `rr run` and SIGKILL it as soon as `condition(job_dir)` holds (a kill mid-job)."""
    process = subprocess.Popen([sys.executable, "-m", "rr.cli", "run", "--config", str(CI_CONFIG), "--output",
                                str(job_dir)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            if condition(job_dir):
                return
            if process.poll() is not None:
                raise AssertionError(f"rr run ended before the kill point: {process.stderr.read().decode()[-3000:]}")
            time.sleep(0.5)
        raise AssertionError("kill point not reached in time")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def reveal_round_done(job_dir: Path) -> bool:
    state = _json(job_dir / "reveal" / "state.json")
    return bool(state) and len(state["evaluations"]) > 0


def inside_first_weight_search(job_dir: Path) -> bool:
    """Step 1's PEM is saved and at least one of its candidate weights is scored, not all."""
    state = _json(job_dir / "release" / "state.json")
    return bool(state) and len(state["steps"]) == 1 and len(state["pending_candidates"].get("1", {})) >= 1


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    job_dir = tmp_path_factory.mktemp("job") / "ci"
    run_until(job_dir, reveal_round_done)
    reveal_before = _json(job_dir / "reveal" / "state.json")
    run_until(job_dir, inside_first_weight_search)
    release_before = _json(job_dir / "release" / "state.json")
    pem_dir = job_dir / "release" / "pems" / "step1-forget"
    pem_mtime = (pem_dir / "adapter_model.safetensors").stat().st_mtime
    result = rr("run", "--config", str(CI_CONFIG), "--output", str(job_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    return {"dir": job_dir, "reveal_before": reveal_before, "release_before": release_before,
            "pem_mtime": pem_mtime, "pem_dir": pem_dir, "stdout": result.stdout, "stderr": result.stderr}


def test_reveal_resumed_and_wrote_forget_set(finished_job):
    job_dir = finished_job["dir"]
    state = _json(job_dir / "reveal" / "state.json")
    before = finished_job["reveal_before"]["evaluations"]
    assert state["evaluations"][:len(before)] == before, "rounds finished before the kill were recomputed or lost"
    manifest = _json(job_dir / "reveal" / "manifest.json")
    assert manifest["size"] == len((job_dir / "reveal" / "forget_set.jsonl").read_text().splitlines()) > 0
    assert len(manifest["instructions"]) == 2 and all(i.startswith("The instruction was to") for i in manifest["instructions"])
    assert 0 <= manifest["mean_relevance"] <= 1 and manifest["vendi_score"] >= 1
    comparison = manifest["comparison"]
    assert {"best_instruction_mean_relevance", "plain_answers_mean_relevance", "forget_set_vendi_subsampled",
            "fixed_instruction_vendi"} <= set(comparison)
    # ci.yaml asks for 2 finalists per loop: each scored on every context, the best of each loop is P*.
    finals = manifest["finalists"]
    per_loop = [sum(f["outer_loop"] == loop for f in finals) for loop in range(2)]
    assert per_loop[0] == 2 and per_loop[1] in (1, 2), per_loop  # the second loop may have one candidate left
    for loop, p_star in enumerate(manifest["instructions"]):
        assert p_star == max((f for f in finals if f["outer_loop"] == loop), key=lambda f: f["score"])["instruction"]
    assert "## Finalists, scored on every reveal context" in (job_dir / "reveal" / "report.md").read_text()
    # Forget data is sensitive: owner-only, and never printed in full.
    assert stat.S_IMODE(os.stat(job_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(job_dir / "reveal" / "forget_set.jsonl").st_mode) == 0o600
    some_response = json.loads((job_dir / "reveal" / "forget_set.jsonl").read_text().splitlines()[0])["response"]
    if len(some_response) > 40:
        assert some_response not in finished_job["stdout"] + finished_job["stderr"]


def test_release_resumed_inside_the_weight_search_without_rescoring(finished_job):
    job_dir = finished_job["dir"]
    state = _json(job_dir / "release" / "state.json")
    before = finished_job["release_before"]
    assert state["steps"][:len(before["steps"])] == before["steps"], "a step finished before the kill changed"
    # The PEM saved before the kill is reused, and the candidates scored before it keep their scores.
    assert (finished_job["pem_dir"] / "adapter_model.safetensors").stat().st_mtime == finished_job["pem_mtime"]
    scored = {c["weight"]: {"stopped_early": c["stopped_early"]} if "stopped_early" in c else
              [c["forget_score"], c["utility_score"], c["perplexity"], c["general_check"]]
              for c in state["steps"][1]["candidates"]}
    for weight, scores in before["pending_candidates"]["1"].items():
        assert scored[abs(float(weight))] == scores
    assert state["pending_candidates"] == {}


def test_release_took_the_quickstarts_control_flow(finished_job):
    """ci.yaml's forget grid is too small to forget anything, so step 1 widened it (the quickstart's
    on_no_candidate: widen), and the loop ended on met targets (stop_when_forget_below) before its last step."""
    import yaml

    job_dir = finished_job["dir"]
    grid = yaml.safe_load(CI_CONFIG.read_text())["release"]["forget_weights"]
    state = _json(job_dir / "release" / "state.json")
    steps = state["steps"]
    widened = [c["weight"] for c in steps[1]["candidates"] if c["weight"] not in grid]
    assert widened and abs(steps[1]["merge_weight"]) in widened, steps[1]["candidates"]
    summary = _json(job_dir / "release" / "summary.json")
    assert summary["stopped_reason"].startswith("targets met"), summary["stopped_reason"]
    assert len(steps) - 1 < 3  # the plan has 3 steps (forget, retain, forget): the last was not needed
    rows = (job_dir / "release" / "steps.csv").read_text().splitlines()
    assert len(rows) == 1 + len(steps)
    assert state["finished"]
    kinds = [s["kind"] for s in state["steps"]]
    assert kinds[0] == "base" and kinds[1] == "forget"
    for step in state["steps"][1:]:
        assert (step["merge_weight"] < 0) == (step["kind"] == "forget")
    ledger = _json(job_dir / "release" / "ledger.json")
    assert [e["merge_weight"] for e in ledger["entries"]] == [s["merge_weight"] for s in state["steps"][1:]]


GOLDEN = Path(__file__).resolve().parent / "golden" / "ci_release.json"


def release_decisions(job_dir: Path) -> dict:
    """What the ci job decided and measured: every step's weight, rule and scores (validation and test, every
    metric), the candidates it scored, the stop reason and the single negation. Floats are rounded to 4 places,
    so the golden file survives last-digit noise but not a changed decision or score."""
    def rounded(value):
        if isinstance(value, float):
            return round(value, 4)
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return value

    def scores(evaluation: dict) -> dict:
        return {k: evaluation[k] for k in ("forget_score", "utility_score", "metrics", "counts") if k in evaluation}

    state, summary = _json(job_dir / "release" / "state.json"), _json(job_dir / "release" / "summary.json")
    steps = [{"step": s["step"], "kind": s["kind"], "merge_weight": s["merge_weight"], "rule": s["rule"],
              "passed": s["passed"], "validation": scores(s["validation"]), "test": scores(s["test"]),
              "candidates": s["candidates"]} for s in state["steps"]]
    baseline = summary.get("baseline") or {}
    return rounded({"steps": steps, "ledger": summary["ledger"], "stopped_reason": summary["stopped_reason"],
                    "single_negation": {"merge_weight": baseline.get("merge_weight"),
                                        "test": scores(baseline["test"]) if "test" in baseline else None}})


def test_the_ci_job_decides_and_scores_as_its_golden_record(finished_job):
    """The same config and seed give the same ledger and scores, killed and resumed or not, before and after a
    refactor. tests/golden/ci_release.json was written by an unkilled `rr run --config configs/ci.yaml`; a change
    that moves a result on purpose rewrites it (RR_WRITE_GOLDEN=1 with this test) and says why in its commit."""
    found = release_decisions(finished_job["dir"])
    if os.environ.get("RR_WRITE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    assert found == json.loads(GOLDEN.read_text())


def test_reports_written(finished_job):
    release_dir = finished_job["dir"] / "release"
    rows = (release_dir / "steps.csv").read_text().splitlines()
    state = _json(release_dir / "state.json")
    assert rows[0].startswith("step,weight_applied,forget_score,utility_score")
    assert len(rows) == 1 + len(state["steps"])
    assert "pass@1" in rows[0] and "arithmetic_accuracy" in rows[0] and "perplexity" in rows[0]
    assert (release_dir / "steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = _json(release_dir / "summary.json")
    assert summary["base"]["forget_score"] == state["steps"][0]["test"]["forget_score"]
    assert "baseline" in summary and "merge_weight" in summary["baseline"]
    assert "Wilson" in (release_dir / "summary.md").read_text()


def test_release_summary_writes_the_per_form_table(finished_job):
    """Every form of the test split (ci.yaml's two: mbpp and the held-out casual) has a row for base, rr and
    the single negation; the per-form rates add up to the test items the task graded."""
    import yaml

    from rr.tasks.code_forms import HELD_OUT_FORMS

    release_dir = finished_job["dir"] / "release"
    summary = _json(release_dir / "summary.json")
    forms = summary["forms"]
    assert [row["form"] for row in forms["rows"]] == yaml.safe_load(CI_CONFIG.read_text())["task"]["forms"]
    assert forms["models"] == ["base", "rr", "single negation"] and forms["held_out_forms"] == list(HELD_OUT_FORMS)
    for name, evaluation in (("base", summary["base"]), ("rr", summary["final"])):
        assert sum(row[name]["items"] for row in forms["rows"]) == evaluation["counts"]["code_items"]
        assert sum(row[name]["hits"] for row in forms["rows"]) == evaluation["counts"]["code_passed"]
        for row in forms["rows"]:
            assert row[name]["rate"] == evaluation["metrics"][f"pass@1/{row['form']}"]
    markdown = (release_dir / "summary.md").read_text()
    assert "## Per form" in markdown
    assert "| casual | yes |" in markdown and "| mbpp |  |" in markdown
    assert "pass@1/" not in (release_dir / "steps.csv").read_text().splitlines()[0]  # forms: their own table
    assert "general_check" in summary["final"]["metrics"] and "general_check" in markdown


def test_eval_of_the_ledger_reproduces_the_jobs_own_test_scores(finished_job):
    """`rr eval --ledger` (through the job's executor, as ray_jobs/evaluate.py) scores rr's model as the release
    summary did: the same composition, split and greedy decoding; its form report is against the base model."""
    job_dir = finished_job["dir"]
    last = _json(job_dir / "release" / "state.json")["steps"][-1]
    # --step names the ledger's last step here: the whole ledger, as the job's own final test score
    result = rr("eval", "--config", str(CI_CONFIG), "--output", str(job_dir), "--ledger",
                str(job_dir / "release" / "ledger.json"), "--step", str(last["step"]), "--split", "test")
    assert result.returncode == 0, result.stderr[-3000:]
    scored, summary = json.loads(result.stdout), _json(job_dir / "release" / "summary.json")
    final, base = summary["final"], summary["base"]
    assert (final["forget_score"], final["utility_score"]) == (last["test"]["forget_score"],
                                                               last["test"]["utility_score"])
    assert (scored["forget_score"], scored["utility_score"]) == (final["forget_score"], final["utility_score"])
    assert scored["metrics"]["perplexity"] == pytest.approx(final["metrics"]["perplexity"], rel=1e-4)
    rows = {row["form"]: row for row in scored["form_report"]["rows"]}
    for form, (hits, items) in base["forms"].items():
        assert (rows[form]["base"]["hits"], rows[form]["base"]["items"]) == (hits, items)


def test_the_profile_records_every_phase_with_its_work(finished_job):
    """profile.jsonl (rr/core/profile.py): Reveal's rounds and finalists, the base model's scoring, each step's PEM,
    candidates and test split, with the tokens each generated, scored and trained; bench/bench_profile.py's table
    reads it."""
    import importlib.util

    from rr.core.profile import read_profile

    records = read_profile(finished_job["dir"] / "profile.jsonl")
    phases = {r["phase"] for r in records}
    assert {"reveal", "reveal/outer 1 round 1", "reveal/outer 1 finalists", "release", "release/step 0 (base)",
            "release/step 1 (forget)/pem", "release/step 1 (forget)/search"} <= phases, sorted(phases)
    assert any(p.startswith("release/step 1 (forget)/search/candidate ") for p in phases)
    def most(phase: str, counter: str) -> int:  # a rerun that reuses a phase's result records it again, with no work
        return max(r[counter] for r in records if r["phase"] == phase)

    assert most("release/step 1 (forget)/pem", "trained_tokens") > 0
    assert most("release/step 0 (base)", "generated_tokens") > 0 < most("release/step 0 (base)", "prefill_tokens")
    assert all(r["wall_s"] >= 0 for r in records)
    spec = importlib.util.spec_from_file_location("bench_profile", Path(__file__).resolve().parents[1] / "bench" /
                                                  "bench_profile.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.table(records, peak=1e11, body=100_000_000, head=28_000_000, depth=2)
    assert {"reveal", "release"} <= {r["phase"] for r in rows} and all(0 <= r["of_limit"] for r in rows if r["of_limit"])


def test_export_adapter_loads_in_peft(finished_job, tmp_path):
    result = rr("export", "--run", str(finished_job["dir"]), "--adapter", str(tmp_path / "adapter"))
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    ledger = _json(finished_job["dir"] / "release" / "ledger.json")
    assert config["r"] == sum(json.loads((finished_job["dir"] / "release" / e["adapter_dir"] / "adapter_config.json")
                                         .read_text())["r"] for e in ledger["entries"])


def test_compare_runs_methods_on_the_same_forget_set(finished_job, tmp_path):
    """`rr compare` on the finished job: reveal-release is the job's own release (not run again), the others
    start from the base model; a table row and a plot point per method; a rerun reuses every result."""
    config = tmp_path / "compare.yaml"
    config.write_text(CI_CONFIG.read_text() + "\ncompare:\n  methods: [reveal-release, pem-negation, ga+gd, me+gd]\n"
                      "  finetune: {max_steps: 2, batch_size: 4, max_length: 192}\n")
    job_dir = finished_job["dir"]
    result = rr("compare", "--config", str(config), "--output", str(job_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    compare_dir = job_dir / "compare"
    summary = _json(compare_dir / "summary.json")
    assert summary["methods"] == ["reveal-release", "pem-negation", "ga+gd", "me+gd"]
    manifest = _json(job_dir / "reveal" / "manifest.json")
    assert summary["data"]["forget_examples"] == manifest["size"] and summary["data"]["source"] == "self-generated"
    rows = {r["method"]: r for r in summary["rows"]}
    release = _json(job_dir / "release" / "summary.json")
    assert rows["base"]["test"] == release["base"] and rows["reveal-release"]["test"] == release["final"]
    negation = rows["pem-negation"]["details"]
    assert negation["merge_weight"] < 0 and abs(negation["merge_weight"]) in [c["weight"] for c in negation["candidates"]]
    for name in ("ga+gd", "me+gd"):
        assert rows[name]["details"]["steps"] == 2
        assert len(_json(compare_dir / name / "losses.json")) == 2
        assert rows[name]["wall_time_s"] > 0
    table = (compare_dir / "table.md").read_text()
    for name in rows:
        assert f"| {name} |" in table
    assert "Wilson" in table and "pass@1" in table
    assert "## Per form" in table and "| casual | yes |" in table
    assert len((compare_dir / "table.csv").read_text().splitlines()) == 1 + len(rows)
    assert (compare_dir / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = {name: (compare_dir / name / "result.json").stat().st_mtime for name in summary["methods"]}
    again = rr("compare", "--config", str(config), "--output", str(job_dir))
    assert again.returncode == 0, again.stderr[-4000:]
    assert "finished before" in again.stderr
    assert {name: (compare_dir / name / "result.json").stat().st_mtime for name in results} == results


def test_job_recorded_and_registered_in_mlflow(finished_job):
    """Three processes (two killed) make one MLflow run in the job dir's sqlite store, and a registered model
    version that loads and generates."""
    from mlflow import MlflowClient

    from rr.tracking import load_registered

    job_dir = finished_job["dir"]
    uri = f"sqlite:///{job_dir / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in finished_job["stderr"]
    assert all(not p.read_text() for p in (job_dir / "tracking").glob("store-*/outbox.jsonl")), "records left unsent"
    client = MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("rr").experiment_id])
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 1 and top[0].info.status == "FINISHED", "a resumed job must continue its run"
    run_id = top[0].info.run_id
    steps = _json(job_dir / "release" / "state.json")["steps"]
    curve = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "test/forget_score"))
    assert curve == [(s["step"], s["test"]["forget_score"]) for s in steps]
    assert top[0].data.params["reveal.outer_loops"] == "2"
    assert top[0].data.tags["rr.forget_set_sha256"] == _json(job_dir / "reveal" / "manifest.json")["sha256"]
    version = client.get_model_version_by_alias("ci-code", "candidate")
    assert float(version.tags["rr.forget_score"]) == steps[-1]["test"]["forget_score"]
    model = load_registered("models:/ci-code@candidate", tracking_uri=uri)
    answer = model.predict(["Write a Python function that reverses a string."], params={"max_new_tokens": 16})
    assert isinstance(answer[0], str) and answer[0].strip()


def test_audit_attacks_the_finished_job_resumes_and_tags_its_version(finished_job):
    """`rr audit` with ci.yaml's own audit block on the finished job: killed after its first part and rerun, it
    reuses that part; every model gets every attack; the exit code is the verdict's; the verdict is tagged on
    the registered version, where `require_audit` reads it."""
    from mlflow import MlflowClient

    from rr.tracking.registry import check_gates

    job_dir = finished_job["dir"]
    first_part = job_dir / "audit" / "membership-base.json"
    process = subprocess.Popen([sys.executable, "-m", "rr.cli", "audit", "--config", str(CI_CONFIG), "--output",
                                str(job_dir)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while not first_part.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert first_part.exists(), "the audit ended or stalled before its first part"
    kept = first_part.stat().st_mtime
    result = rr("audit", "--config", str(CI_CONFIG), "--output", str(job_dir))
    audit = _json(job_dir / "audit" / "audit.json")
    assert audit is not None, result.stderr[-4000:]
    assert result.returncode == (0 if audit["verdict"]["passed"] else 1), result.stderr[-4000:]
    assert first_part.stat().st_mtime == kept, "the rerun recomputed a finished part"
    assert set(audit["models"]) == {"base", "rr", "single-negation"}
    for name, model in audit["models"].items():
        assert set(model["relearn"]["scores"]) == {"0", "2"}
        assert set(model["membership"]["auc"]) == {"loss", "zlib", "mink", "minkpp"}
        assert all(0 <= v <= 1 for v in model["membership"]["auc"].values())
        assert len(model["probes"]["rates"]) == 5
    names = [c["name"] for c in audit["verdict"]["checks"]]
    assert names[0] == "relearn_recovery" and names[-1] == "utility_kept"
    assert audit["gates"]["min_utility_ratio"] == 0.9  # as applied: ci.yaml leaves it to tracking.gates
    page = (job_dir / "audit" / "report.html").read_text()
    assert "Verdict:" in page and page.count("data:image/png;base64,") == 3
    records = (job_dir / "reveal" / "forget_set.jsonl").read_text().splitlines()
    for record in records:  # numbers only: no forget answer reaches the report
        answer = json.loads(record)["response"].strip()
        assert len(answer) < 20 or answer not in page
    uri = f"sqlite:///{job_dir / 'mlflow.db'}"
    version = MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("ci-code", "candidate")
    assert version.tags["audit.passed"] == ("true" if audit["verdict"]["passed"] else "false")
    gate = check_gates(version.tags, {"require_audit": True})
    assert gate.passed == audit["verdict"]["passed"] and "require_audit" in gate.lines[0]

    # audit.never_knew_model: the control relearns the model before it learned its target through a job of its
    # own. Differs from ci.yaml because the code task's model never learned its target first: the base model
    # stands in, so the control must reproduce the base model's own relearning, and every other part is reused.
    import yaml

    data = yaml.safe_load(CI_CONFIG.read_text())
    data["audit"]["never_knew_model"] = "embedded:smollm2"
    control_config = job_dir.parent / "ci-never-knew.yaml"
    control_config.write_text(yaml.safe_dump(data))
    parts = {path: path.stat().st_mtime for path in (job_dir / "audit").glob("*-*.json")}
    result = rr("audit", "--config", str(control_config), "--output", str(job_dir))
    audit = _json(job_dir / "audit" / "audit.json")
    assert result.returncode in (0, 1), result.stderr[-4000:]
    control = audit["models"]["never-knew"]
    assert set(control["relearn"]["scores"]) == {"0", "2"}
    assert control["relearn"]["scores"] == audit["models"]["base"]["relearn"]["scores"]
    import torch

    from rr.release.ledger import Pem

    relearned = {name: Pem.load(job_dir / "audit" / "relearn" / name / "step-2") for name in ("base", "never-knew")}
    for module, (a, b) in relearned["base"].tensors.items():  # the same training, in a job of its own
        torch.testing.assert_close(relearned["never-knew"].tensors[module][0], a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(relearned["never-knew"].tensors[module][1], b, rtol=1e-4, atol=1e-6)
    assert list((job_dir / "audit").glob("never-knew-*/config.yaml"))
    assert all(path.stat().st_mtime == mtime for path, mtime in parts.items()), "a finished part was recomputed"
    assert "never knew" in (job_dir / "audit" / "report.md").read_text()


def test_bad_config_is_refused_with_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("reveal:\n  outer_loopz: 2\n")
    result = rr("run", "--config", str(bad), "--output", str(tmp_path / "job"))
    assert result.returncode == 2
    assert "reveal.outer_loopz" in result.stderr
    result = rr("release", "--config", str(CI_CONFIG), "--output", str(tmp_path / "empty"))
    assert result.returncode == 2 and "rr reveal" in result.stderr
