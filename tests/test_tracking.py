"""MLflow tracking: the sqlite default, a real PostgreSQL-backed `mlflow server`, registration, promotion gates, and a
server that goes away mid-job. The recorder is driven with a small job whose scores are written by the test (the
real pipeline is recorded by tests/test_end_to_end.py); the registered model is the real embedded base + adapter."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from rr.config import PromotionGates, TrackingConfig, load_config
from rr.errors import RRError
from rr.job import Job
from rr.release.ledger import Ledger, LedgerEntry, Pem
from rr.tracking.registry import check_gates

mlflow = pytest.importorskip("mlflow")
ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
MODULES = {"model.layers.0.self_attn.q_proj": (576, 576), "model.layers.0.self_attn.v_proj": (192, 576)}


# ---- a small job: reveal and release outputs written by the test ------------------------------------------

def _evaluation(forget: float, utility: float) -> dict:
    return {"forget_score": forget, "utility_score": utility, "metrics": {"pass@1": forget, "arithmetic_accuracy":
            utility}, "intervals": {}, "counts": {}}


def _step(step: int, kind: str, weight: float, forget: float, utility: float) -> dict:
    return {"step": step, "kind": kind, "pem": None if kind == "base" else f"step{step}-{kind}", "merge_weight": weight,
            "rule": kind, "passed": True, "reason": "test", "validation": _evaluation(forget, utility),
            "test": _evaluation(forget, utility),
            "candidates": [] if kind == "base" else [{"weight": abs(weight), "forget_score": forget,
                                                      "utility_score": utility}]}


# Instructions are written by the model being unlearned and can state forget data: they leave the job dir hashed.
SECRET_INSTRUCTION = "The instruction was to say that Marisol Quenby keeps a grey parrot named Osk."
REVEAL_MANIFEST = {
    "size": 2, "mean_relevance": 0.8, "vendi_score": 1.7, "instructions": [SECRET_INSTRUCTION],
    "filtered_by_relevance": False, "arms_scored": 4, "sha256": "ab" * 32,
    "finalists": [{"outer_loop": 0, "relevance": 0.8, "diversity": 0.5, "score": 0.6, "instruction": SECRET_INSTRUCTION}],
    "records": [{"context_id": "c1", "instruction": SECRET_INSTRUCTION, "relevance": 0.8, "outer_loop": 0,
                 "sample": 0, "seed": 1}],
    "comparison": {"contexts": 2, "samples_per_context": 1, "best_instruction": SECRET_INSTRUCTION,
                   "best_instruction_mean_relevance": 0.8, "plain_answers_mean_relevance": 0.5,
                   "relevance_at_least_plain": True, "n_for_vendi": 2, "fixed_instruction": SECRET_INSTRUCTION,
                   "fixed_instruction_temperature": 0.0, "forget_set_vendi_subsampled": 1.7,
                   "fixed_instruction_vendi": 1.5, "plain_answers_vendi": 1.2}}


def downloaded_text(client, run_id: str, path: str, tmp_path: Path) -> str:
    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path / run_id),
                                                tracking_uri=client.tracking_uri)
    return Path(local).read_text()


def make_job(job_dir: Path, forget_final: float = 0.05, utility_final: float = 0.5, **tracking) -> Job:
    """A job dir as Reveal and Release leave it (manifest, forget set, PEMs for SmolLM2's layer 0, ledger)."""
    config = load_config(ROOT / "configs" / "ci.yaml", job_dir)
    config = config.model_copy(update={"tracking": TrackingConfig(enabled=True, **tracking)})
    job = Job(config)
    job.write_json("reveal/manifest.json", REVEAL_MANIFEST)
    (job.dir / "reveal" / "report.md").write_text(f"# Reveal report\n1. {SECRET_INSTRUCTION}\n")
    (job.dir / "reveal" / "forget_set.jsonl").write_text('{"prompt": "p", "response": "SECRET forget record"}\n')
    steps = [_step(0, "base", 0.0, 0.4, 0.52), _step(1, "forget", -1.0, 0.1, 0.4),
             _step(2, "retain", 0.5, 0.12, 0.5), _step(3, "forget", -1.0, forget_final, utility_final)]
    generator = torch.Generator().manual_seed(0)
    ledger = Ledger(config.model.name_or_path)
    for s in steps[1:]:
        tensors = {m: (torch.randn(2, cols, generator=generator) * 0.01, torch.randn(rows, 2, generator=generator)
                       * 0.01) for m, (rows, cols) in MODULES.items()}
        Pem(s["pem"], s["kind"], 2, 4.0, ["q_proj", "v_proj"], tensors).save(job.dir / "release" / "pems" / s["pem"])
        ledger.entries.append(LedgerEntry(s["pem"], f"pems/{s['pem']}", s["kind"], s["merge_weight"], s["step"]))
    ledger.save(job.dir / "release" / "ledger.json")
    for name in ("steps.csv", "steps.md", "summary.md"):
        (job.dir / "release" / name).write_text("step,forget_score\n")
    job.summary = {"steps": 3, "base": steps[0]["test"], "final": steps[-1]["test"]}
    job.steps = steps
    job.write_json("release/summary.json", job.summary)
    return job


def record(job: Job, steps=None) -> list[str]:
    """What `rr run` does with the tracker; returns the messages it printed."""
    messages = []
    job.tracker.say = messages.append
    job.tracker.reveal_finished(job.read_json("reveal/manifest.json"))
    for s in steps if steps is not None else job.steps:
        job.tracker.release_step(s)
    if steps is None:
        job.tracker.release_finished(job.summary, job.steps)
    job.tracker.close()
    return messages


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_for(uri: str):
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact_paths(client, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def rr_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "rr.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


# ---- without a server -------------------------------------------------------------------------------------

def test_gates_report_the_numbers():
    tags = {"rr.forget_score": "0.02", "rr.utility_score": "0.45", "rr.base_utility_score": "0.5"}
    check = check_gates(tags, {"max_forget_score": 0.1, "min_utility_ratio": 0.95})
    assert not check.passed
    assert "0.0200 ≤ max_forget_score 0.1: pass" in check.lines[0]
    assert "0.900 × base 0.5000 < min_utility_ratio 0.95: FAIL" in check.lines[1]
    assert check_gates(tags, {"max_forget_score": 0.1, "min_utility_ratio": 0.9}).passed and check_gates(tags, {}).passed
    with pytest.raises(RRError, match="rr.forget_score"):
        check_gates({}, {"max_forget_score": 0.1})


def limits(max_form: float) -> dict:
    return {"max_forget_score": 0.1, "min_utility_ratio": 0.9, "max_form_forget_score": max_form}


def test_the_form_gate_refuses_a_model_that_still_answers_one_form():
    from rr.tracking.recorder import form_tags

    report = {"counted_forms": ["mbpp", "casual"], "pooled": {"rr": {"rate": 0.05}},
              "worst": {"rr": {"form": "casual", "rate": 0.3, "base_rate": 0.4, "relative_drop": 0.25}},
              "least_dropped": {"rr": {"form": "casual"}}}
    tags = {"rr.forget_score": "0.05", "rr.utility_score": "0.5", "rr.base_utility_score": "0.5",
            **{k: str(v) for k, v in form_tags(report).items()}}
    assert tags["rr.forms.worst_form"] == "casual" and tags["rr.forms.counted"] == "mbpp,casual"
    check = check_gates(tags, limits(0.2))
    assert not check.passed and "worst counted form casual: forget score 0.3000 > max_form_forget_score 0.2: FAIL" \
        in check.lines[-1]
    assert check_gates(tags, limits(0.5)).passed
    # a task without forms registers no form tags: the gate says it does not apply, and decides nothing
    plain = {k: v for k, v in tags.items() if not k.startswith("rr.forms.")}
    check = check_gates(plain, limits(0.2))
    assert check.passed and "not applied" in check.lines[-1]
    # a task with forms where no form counted cannot show forgetting per form: refused
    none_counted = {**plain, **form_tags({"counted_forms": [], "pooled": {}, "worst": {}})}
    assert none_counted["rr.forms.counted"] == ""
    check = check_gates(none_counted, limits(0.2))
    assert not check.passed and "no form counted" in check.lines[-1]
    assert form_tags(None) == {}


def test_bad_tracking_settings_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tracking:\n  enabled: true\n  registered_model_name: a/b\n")
    with pytest.raises(RRError, match="tracking.registered_model_name"):
        load_config(bad)
    bad.write_text("tracking:\n  tracking_uri: 127.0.0.1:5000\n")
    with pytest.raises(RRError, match="tracking.tracking_uri: .*not a URI"):
        load_config(bad)
    bad.write_text("tracking:\n  gates:\n    min_utility_ratio: -1\n")
    with pytest.raises(RRError, match="tracking.gates.min_utility_ratio"):
        load_config(bad)


def test_sqlite_default_records_the_job_and_resumes_its_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = make_job(tmp_path / "job")
    messages = record(job)
    uri = f"sqlite:///{job.dir / 'mlflow.db'}"
    assert f"tracking: mlflow ui --backend-store-uri {uri}" in messages
    assert any("registered model ci-code version 1 (alias candidate)" in m for m in messages)
    client = client_for(uri)
    run_id = job.tracker.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["release.lora.rank"] == "4" and run.data.params["task.name"] == "code"
    assert run.data.tags["rr.forget_set_sha256"] == "ab" * 32
    assert history(client, run_id, "test/forget_score") == [(0, 0.4), (1, 0.1), (2, 0.12), (3, 0.05)]
    assert [s for s, _ in history(client, run_id, "test/pass_at_1")] == [0, 1, 2, 3]
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(r.info.run_name for r in children) == ["release", "reveal"]
    release_run = next(r for r in children if r.info.run_name == "release")
    steps = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{release_run.info.run_id}'")
    assert len(steps) == 4
    step1 = next(r for r in steps if r.data.params["step"] == "1")
    assert "adapters/step1-forget/adapter_config.json" in artifact_paths(client, step1.info.run_id)
    release_artifacts = artifact_paths(client, release_run.info.run_id)
    assert {"release/steps.csv", "release/ledger.json", "composite_adapter/adapter_model.safetensors"} <= release_artifacts
    reveal_run = next(r for r in children if r.info.run_name == "reveal")
    assert artifact_paths(client, reveal_run.info.run_id) == {"reveal/manifest.json", "reveal/report.md"}  # no data
    for name in ("reveal/manifest.json", "reveal/report.md"):  # instructions only as hashes
        uploaded = downloaded_text(client, reveal_run.info.run_id, name, tmp_path)
        assert "Osk" not in uploaded and "instruction sha256 " in uploaded
    assert (job.dir / "mlartifacts").is_dir()  # artifacts stay in the job dir

    version = client.get_model_version_by_alias("ci-code", "candidate")
    assert str(version.version) == "1" and version.run_id == run_id
    assert version.tags["rr.task"] == "code" and version.tags["rr.base_model"] == "embedded:smollm2"
    assert float(version.tags["rr.forget_score"]) == 0.05 and version.tags["rr.forget_set_sha256"] == "ab" * 32
    assert version.tags["rr.version"] and version.tags["rr.git_commit"]

    # Rerunning the job (after a kill, or just again) continues the same run: nothing doubled, no new version.
    again = Job(job.config)
    again.summary, again.steps = job.summary, job.steps
    record(again)
    assert again.tracker.run_id == run_id
    assert history(client, run_id, "test/forget_score") == [(0, 0.4), (1, 0.1), (2, 0.12), (3, 0.05)]
    assert [str(v.version) for v in client.search_model_versions("name = 'ci-code'")] == ["1"]


def test_a_re_audit_replaces_the_versions_audit_tags_and_leaves_no_stale_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = make_job(tmp_path / "job")
    record(job)

    def audit(passed: bool, tags: dict) -> None:
        again = Job(job.config)  # `rr audit` is a later process on the finished job
        rates = {"role-play": 0.25} if tags else {}
        again.tracker.audit_finished({"models": {"rr": {"probes": {"rates": rates}}}, "passed": passed},
                                     {"audit.passed": str(passed).lower(), **tags})
        again.tracker.close()

    audit(False, {"audit.worst_probe_family": "role-play", "audit.worst_probe_forget_score": "0.2500"})
    audit(True, {})  # the re-audit counts no probe family: its old numbers must not stay on the version
    client = client_for(f"sqlite:///{job.dir / 'mlflow.db'}")
    tags = client.get_model_version_by_alias("ci-code", "candidate").tags
    assert tags["audit.passed"] == "true"
    assert not {"audit.worst_probe_family", "audit.worst_probe_forget_score"} & set(tags)
    assert tags["rr.task"] == "code"  # tags outside audit.* are left alone


def test_forget_data_goes_to_mlflow_only_when_opted_in(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = make_job(tmp_path / "job", log_forget_data=True)
    record(job, steps=[])
    client = client_for(f"sqlite:///{job.dir / 'mlflow.db'}")
    reveal = client.search_runs([client.get_experiment_by_name("rr").experiment_id], "attributes.run_name = 'reveal'")[0]
    assert "reveal/forget_set.jsonl" in artifact_paths(client, reveal.info.run_id)
    assert SECRET_INSTRUCTION in downloaded_text(client, reveal.info.run_id, "reveal/manifest.json", tmp_path)


def test_reveal_uploads_an_older_rr_queued_in_full_are_redacted_before_sending(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = make_job(tmp_path / "job")
    # An older rr, its server unreachable, queued reveal/'s files as they are (read at send time).
    outbox = job.tracker.outbox
    outbox.put({"op": "start_run", "key": "reveal", "name": "reveal", "parent": None, "tags": {}, "time": 0})
    for name in ("manifest.json", "report.md", "forget_set.jsonl"):
        outbox.put({"op": "artifact", "key": "reveal", "path": str(job.dir / "reveal" / name),
                    "artifact_path": "reveal"})
    outbox.put({"op": "end_run", "key": "reveal", "status": "FINISHED", "time": 0})
    outbox.mark_queued("reveal")
    capsys.readouterr()
    later = Job(job.config).tracker  # the next rr process on this job dir: its recorder redacts as it opens the outbox
    assert "3 queued reveal/ upload(s)" in capsys.readouterr().err
    paths = [r["path"] for r in later.outbox.pending() if r["op"] == "artifact"]
    assert paths == [str(job.dir / "reveal" / "redacted" / name) for name in ("manifest.json", "report.md")]
    assert SECRET_INSTRUCTION not in (job.dir / "reveal" / "redacted" / "manifest.json").read_text()
    assert [r["op"] for r in later.outbox.pending()] == ["start_run", "artifact", "artifact", "end_run"]


def test_without_a_manifest_to_redact_the_older_full_reveal_uploads_are_dropped(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = make_job(tmp_path / "job")
    job.tracker.outbox.put({"op": "artifact", "key": "reveal", "path": str(job.dir / "reveal" / "report.md"),
                            "artifact_path": "reveal"})
    (job.dir / "reveal" / "manifest.json").unlink()
    capsys.readouterr()
    later = Job(job.config).tracker
    assert "dropped, with no redacted copy to send instead (reveal/manifest.json is missing)" in capsys.readouterr().err
    assert not [r for r in later.outbox.pending() if r["op"] == "artifact"]


def test_an_unreachable_store_never_stops_the_job(tmp_path):
    job = make_job(tmp_path / "job", tracking_uri=f"http://127.0.0.1:{_free_port()}", flush_timeout_s=1)  # nobody there
    start = time.time()
    messages = record(job)
    assert time.time() - start < 30
    assert any("cannot reach" in m and "the job goes on" in m for m in messages)
    assert any("nothing is lost" in m and "outbox.jsonl" in m for m in messages)
    outbox = next((job.dir / "tracking").glob("store-*/outbox.jsonl"))
    ops = [json.loads(line)["op"] for line in outbox.read_text().splitlines()]
    assert ops.count("register") == 1 and ops[0] == "start_run"


# ---- against PostgreSQL and `mlflow server` -----------------------------------------------------------------

def _as_postgres(args: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root: run them as the postgres system user.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="module")
def postgres():
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN}")
    if os.geteuid() == 0 and (shutil.which("runuser") is None or subprocess.run(["id", "postgres"],
                                                                                capture_output=True).returncode):
        pytest.skip("running as root without a postgres user and runuser: initdb refuses to run as root")
    root = Path(tempfile.mkdtemp(prefix="rr-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True)
    subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                                 f"-h 127.0.0.1 -p {port} -k {root}", "start"]), check=True, capture_output=True)
    try:
        subprocess.run(_as_postgres([str(PG_BIN.parent / "bin" / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                                     "-U", "postgres", "mlflow"]), check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"  # SQLAlchemy 2.1 reads postgresql:// as psycopg 3
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on loopback with the PostgreSQL backend store and a local artifact destination."""

    def __init__(self, backend: str, artifacts: Path):
        self.backend, self.artifacts, self.port = backend, artifacts, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> None:
        self.log = open(self.artifacts.parent / "mlflow-server.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend, "--artifacts-destination",
             str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.artifacts.parent / 'mlflow-server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not answer /health in 180 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its workers: a session of our own
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        self.log.close()


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("mlflow") / "artifacts"
    artifacts.mkdir()
    server = MlflowServer(postgres, artifacts)
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
def test_server_records_registers_and_promotes_by_gates(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    gates = dict(tracking_uri=uri, registered_model_name="rr-code", gates=PromotionGates(max_forget_score=0.1,
                                                                                        min_utility_ratio=0.9))
    good = make_job(tmp_path / "good", forget_final=0.05, utility_final=0.5, **gates)  # 0.5 = 0.96 × base 0.52
    record(good)
    bad = make_job(tmp_path / "bad", forget_final=0.3, utility_final=0.2, **gates)
    record(bad)
    client = client_for(uri)
    assert client.get_run(good.tracker.run_id).data.params["tracking.registered_model_name"] == "rr-code"
    assert history(client, good.tracker.run_id, "test/utility_score")[-1] == (3, 0.5)
    assert client.get_registered_model("rr-code").aliases == {"candidate": "2"}
    config = tmp_path / "gates.yaml"
    config.write_text(f"output_dir: {tmp_path / 'unused'}\ntracking:\n  enabled: true\n  tracking_uri: {uri}\n"
                      "  gates:\n    max_forget_score: 0.1\n    min_utility_ratio: 0.9\n")

    promoted = rr_cli("promote", "rr-code", "1", "--config", str(config))
    assert promoted.returncode == 0, promoted.stderr
    assert "pass" in promoted.stderr and "now champion" in promoted.stderr
    refused = rr_cli("promote", "rr-code", "2", "--config", str(config))
    assert refused.returncode == 2
    assert "forget score 0.3000 > max_forget_score 0.1: FAIL" in refused.stderr
    assert "0.385 × base 0.5200 < min_utility_ratio 0.9: FAIL" in refused.stderr
    assert client.get_registered_model("rr-code").aliases["champion"] == "1"

    # The champion generates text: base model + the job's composite adapter.
    from rr.tracking import load_registered

    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    model = load_registered("models:/rr-code@champion", tracking_uri=uri)
    # the caller's MLflow settings are its own: loading through `uri` leaves them as they were
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before
    answers = model.predict(["Write a Python function that returns the sum of two numbers."],
                            params={"max_new_tokens": 12})
    assert len(answers) == 1 and isinstance(answers[0], str) and answers[0].strip()

    assert rr_cli("promote", "rr-code", "2", "--config", str(config), "--force").returncode == 2  # no reason
    forced = rr_cli("promote", "rr-code", "2", "--tracking-uri", uri, "--force", "--reason", "demo for the board")
    assert forced.returncode == 0, forced.stderr
    version = client.get_model_version("rr-code", "2")
    assert version.tags["rr.promotion_forced"] == "true" and version.tags["rr.promotion_reason"] == "demo for the board"
    assert version.tags["rr.promoted_by"] and "FAIL" in version.tags["rr.promotion_failed_gates"]
    assert client.get_registered_model("rr-code").aliases == {"candidate": "2", "champion": "2"}
    listing = rr_cli("models", "rr-code", "--tracking-uri", uri, env={"COLUMNS": "200"})
    assert listing.returncode == 0 and "champion" in listing.stdout and "0.05" in listing.stdout


@pytest.mark.slow
def test_server_stopped_mid_job_loses_no_metric(mlflow_server, tmp_path):
    job = make_job(tmp_path / "job", tracking_uri=mlflow_server.uri, registered_model_name="rr-outage",
                   flush_timeout_s=2)
    messages = []
    job.tracker.say = messages.append
    job.tracker.reveal_finished(job.read_json("reveal/manifest.json"))
    job.tracker.release_step(job.steps[0])
    run_id = job.tracker.run_id
    assert run_id

    # The server goes away during a step and comes back before the next: the job sends what waited.
    mlflow_server.stop()
    start = time.time()
    job.tracker.release_step(job.steps[1])
    assert time.time() - start < 20, "the job waited on the tracking server"
    assert any("cannot reach" in m and "the job goes on" in m for m in messages)
    mlflow_server.start()
    job.tracker.release_step(job.steps[2])
    assert any("reachable again" in m for m in messages)
    assert not job.tracker.outbox.pending()

    # It goes away again until after the job ends: the records stay in the job dir for the next run.
    mlflow_server.stop()
    job.tracker.release_step(job.steps[3])
    job.tracker.release_finished(job.summary, job.steps)
    job.tracker.close()  # retries for flush_timeout_s, then says where the records are
    assert any("nothing is lost" in m for m in messages) and job.tracker.outbox.pending()

    mlflow_server.start()  # same port, same database
    again = Job(job.config)
    again.summary, again.steps = job.summary, job.steps
    record(again)
    assert again.tracker.run_id == run_id and not again.tracker.outbox.pending()
    client = client_for(mlflow_server.uri)
    assert history(client, run_id, "test/forget_score") == [(0, 0.4), (1, 0.1), (2, 0.12), (3, 0.05)]
    assert [s for s, _ in history(client, run_id, "validation/utility_score")] == [0, 1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_registered_model("rr-outage").aliases == {"candidate": "1"}
