"""CI's Ray job, run as README "On Ray" says: a token-authenticated head on loopback, then `ray job submit` of
ray_jobs/release.py, evaluate.py and reveal.py on configs/ci.yaml unchanged but for --output. Each SUCCEEDED; the
job wrote its ledger, one MLflow run and a registered model in its sqlite store; it decided and scored as the
in-process job's golden record; and the finished job, resubmitted with MLFLOW_TRACKING_URI in its runtime env,
records to an `mlflow server`; ray_jobs/audit.py attacks the finished job."""

import json
import os
import secrets
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

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/ci.yaml"  # the shipped file, as a user passes it from the checkout (--working-dir .)
pytestmark = pytest.mark.slow
TOLERANCE = 1e-9  # scores are counts over the same greedy answers: no batching differences are expected
TOKEN = secrets.token_hex(16)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def auth_env() -> dict:
    # README: `export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...` for the head and every client. A user's fresh shell has
    # no MLFLOW_* variables; earlier tests in this process may have left some (MLflow's set_tracking_uri exports
    # MLFLOW_TRACKING_URI), and the head would hand them to the job, which would then record elsewhere.
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    return dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)


def _json(path: Path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def ray_head():
    """README's `ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --num-cpus 2`, with its
    own ports and temp dir (other Ray heads and local Rays, which take the job agent's default port 52365, may run
    on this machine) and --block, so SIGTERM stops exactly it."""
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rr-ray-", dir="/tmp")
    head = subprocess.Popen(["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host",
                             "127.0.0.1", "--num-cpus", "2", "--block", "--port", str(port), "--dashboard-port",
                             str(dashboard), "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port",
                             str(free_port()), "--temp-dir", temp_dir, "--disable-usage-stats"],
                            env=auth_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{address}/api/version",
                                                          headers={"Authorization": f"Bearer {TOKEN}"}), timeout=5)
            break
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                head.kill()
                pytest.fail(f"ray head did not start: {head.stderr.read().decode()[-3000:]}")
            time.sleep(1)
    try:
        yield address
    finally:
        # `ray start --block` stops its processes on SIGTERM (2 s when idle; after jobs it waited 30 s on them) and
        # leaves some dashboard processes behind: whatever of the head's own session is left after 10 s is killed.
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, script: str, job_dir: Path, *extra: str, runtime_env: dict | None = None,
           config: str = CONFIG) -> dict:
    """`ray job submit --address … --working-dir . -- python ray_jobs/SCRIPT --config configs/ci.yaml --output
    DIR`, then `ray job status` of that submission."""
    submission = f"rr-ci-{Path(script).stem}-{secrets.token_hex(4)}"
    command = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--submission-id", submission]
    if runtime_env:
        command += ["--runtime-env-json", json.dumps(runtime_env)]
    command += ["--", "python", script, "--config", config, "--output", str(job_dir), *extra]
    for _ in range(60):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=2400, env=auth_env())
        # A fresh head answers before its job agent is up; nothing was submitted then: submit again.
        if "No available agent to submit job" not in result.stderr:
            break
        time.sleep(2)
    status = subprocess.run(["ray", "job", "status", "--address", address, submission],
                            capture_output=True, text=True, timeout=120, env=auth_env())
    return {"submit": result, "status": status, "log": (result.stdout + result.stderr)[-6000:]}


def assert_succeeded(run: dict) -> None:
    assert run["submit"].returncode == 0, run["log"]
    # Ray 2.60's CLI prints "Job '<id>' succeeded" (older ones printed the SUCCEEDED state name)
    assert "succeeded" in run["status"].stdout.lower(), run["status"].stdout + run["status"].stderr


@pytest.fixture(scope="module")
def ray_job(ray_head, tmp_path_factory):
    job_dir = tmp_path_factory.mktemp("submit") / "ci-ray"
    # README "On Ray": release.py runs the whole job (Reveal, then Release) in one driver, then evaluate.py scores
    # its ledger; reveal.py (Reveal only) is submitted last, on the finished Reveal, which it must keep as it is.
    runs = {"release": submit(ray_head, "ray_jobs/release.py", job_dir)}
    assert_succeeded(runs["release"])
    manifest = (job_dir / "reveal" / "manifest.json").read_bytes()
    runs["evaluate"] = submit(ray_head, "ray_jobs/evaluate.py", job_dir, "--split", "test")
    runs["reveal"] = submit(ray_head, "ray_jobs/reveal.py", job_dir)
    return {"dir": job_dir, "address": ray_head, "manifest": manifest, **runs}


def test_submitted_stages_on_the_shipped_config_succeed_and_write_the_ledger(ray_job):
    job_dir = ray_job["dir"]
    assert_succeeded(ray_job["evaluate"])
    assert_succeeded(ray_job["reveal"])
    assert "reveal already finished" in ray_job["reveal"]["log"]
    assert (job_dir / "reveal" / "manifest.json").read_bytes() == ray_job["manifest"]
    assert all("executor: ray" in ray_job[stage]["submit"].stdout for stage in ("reveal", "release", "evaluate"))
    assert _json(job_dir / "reveal" / "manifest.json")["size"] > 0
    state = _json(job_dir / "release" / "state.json")
    assert state["finished"] and [s["kind"] for s in state["steps"]][:2] == ["base", "forget"]
    ledger = _json(job_dir / "release" / "ledger.json")
    assert [e["merge_weight"] for e in ledger["entries"]] == [s["merge_weight"] for s in state["steps"][1:]]
    assert (job_dir / "release" / "summary.md").exists()
    assert list((job_dir / "ray" / "tune").iterdir()), "the weight search did not run as a Tune experiment"
    assert list((job_dir / "ray" / "train").iterdir()), "no PEM was trained on Ray Train"
    evaluation = _json(job_dir / "evaluation" / "test.json")
    assert evaluation["ledger_entries"] == len(ledger["entries"])
    final = state["steps"][-1]["test"]
    for score in ("forget_score", "utility_score"):
        assert abs(evaluation[score] - final[score]) <= TOLERANCE


def test_submitted_job_records_one_mlflow_run_and_a_registered_model_in_its_sqlite_store(ray_job):
    from mlflow import MlflowClient

    job_dir = ray_job["dir"]
    uri = f"sqlite:///{job_dir / 'mlflow.db'}"
    assert all(not p.read_text() for p in (job_dir / "tracking").glob("store-*/outbox.jsonl")), "records left unsent"
    client = MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("rr").experiment_id])
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 1 and top[0].info.status == "FINISHED", "reveal.py and release.py must make one run"
    steps = _json(job_dir / "release" / "state.json")["steps"]
    curve = sorted((m.step, m.value) for m in client.get_metric_history(top[0].info.run_id, "test/forget_score"))
    assert curve == [(s["step"], s["test"]["forget_score"]) for s in steps]
    assert top[0].data.params["compute.executor"] == "ray"
    version = client.get_model_version_by_alias("ci-code", "candidate")
    assert float(version.tags["rr.forget_score"]) == steps[-1]["test"]["forget_score"]


def test_the_submitted_job_decides_and_scores_as_the_in_process_golden_record(ray_job):
    """Placement changes no result: the job submitted to Ray (replicas, Tune trials, Ray Train) takes every
    decision and measures every score of tests/golden/ci_release.json, which tests/test_end_to_end.py holds the
    in-process `rr run` of the same config to (its evaluation of the ledger on Ray equals its own final test
    score: the first test here)."""
    from test_end_to_end import GOLDEN, release_decisions

    assert release_decisions(ray_job["dir"]) == json.loads(GOLDEN.read_text())


class MlflowServer:
    """`mlflow server --host 127.0.0.1 --port P --backend-store-uri sqlite:///…` in a session of its own."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "mlflow-server.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
             str(root / "artifacts"), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"mlflow server: {(root / 'mlflow-server.log').read_text()[-3000:]}")
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its workers
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def test_finished_job_resubmitted_with_a_tracking_server_records_its_run_there(ray_job, tmp_path):
    from mlflow import MlflowClient

    server = MlflowServer(tmp_path)
    try:
        # README: the driver of `ray job submit` gets its environment from the runtime env, not the client's shell.
        run = submit(ray_job["address"], "ray_jobs/release.py", ray_job["dir"],
                     runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": server.uri}})
        assert_succeeded(run)
        from rr.tracking.store import store_dirname

        store = ray_job["dir"] / "tracking" / store_dirname(server.uri)

        def left(name: str) -> str:
            return (store / name).read_text() if (store / name).exists() else ""

        if left("outbox.jsonl"):
            # A slow server (this machine runs the head, the job and the server on 2 cores): the job must say
            # that nothing is lost, and the README's remedy, running the job again, must send the rest.
            assert "nothing is lost" in run["log"], run["log"]
            run = submit(ray_job["address"], "ray_jobs/release.py", ray_job["dir"],
                         runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": server.uri}})
            assert_succeeded(run)
        for name in ("outbox.jsonl", "rejected.jsonl"):  # every record reached the server and none was refused
            assert not left(name), f"{name}: {left(name)[-2000:]}\njob log: {run['log']}"
        client = MlflowClient(server.uri, registry_uri=server.uri)  # else MLflow 3 reads ./mlflow.db for the registry
        runs = client.search_runs([client.get_experiment_by_name("rr").experiment_id])
        top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(top) == 1 and top[0].info.status == "FINISHED"
        steps = _json(ray_job["dir"] / "release" / "state.json")["steps"]
        curve = sorted((m.step, m.value) for m in client.get_metric_history(top[0].info.run_id, "test/forget_score"))
        assert curve == [(s["step"], s["test"]["forget_score"]) for s in steps]
        version = client.get_model_version_by_alias("ci-code", "candidate")
        assert float(version.tags["rr.forget_score"]) == steps[-1]["test"]["forget_score"]
    finally:
        server.stop()


def test_submitted_audit_attacks_the_job_on_the_replicas_and_ray_train(ray_job, tmp_path):
    """`ray job submit -- python ray_jobs/audit.py` (README): every attack runs through the Ray executor
    (relearning on Ray Train); the job's exit code is the verdict's (1, a failed Ray job, on FAIL).

    ci.yaml's audit block with `models: [rr]` (the base model is still scored, as the reference): each audited
    model runs the same code, which tests/test_end_to_end.py runs on all three in-process; on Ray each one more
    costs a Ray Train start and a pass of every attack, about two minutes here, and tests nothing new."""
    import yaml

    config = yaml.safe_load((ROOT / CONFIG).read_text())
    config["audit"]["models"] = ["rr"]
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump(config))
    run = submit(ray_job["address"], "ray_jobs/audit.py", ray_job["dir"], config=str(tmp_path / "audit.yaml"))
    audit = _json(ray_job["dir"] / "audit" / "audit.json")
    assert audit is not None, run["log"]
    assert "executor: ray" in run["submit"].stdout
    assert ("succeeded" in run["status"].stdout.lower()) == audit["verdict"]["passed"], run["log"]
    assert set(audit["models"]) == {"base", "rr"}
    assert set(audit["models"]["base"]["relearn"]["scores"]) == {"0"}  # the reference, not relearned
    rr_model = audit["models"]["rr"]
    assert set(rr_model["membership"]["auc"]) == {"loss", "zlib", "mink", "minkpp"}
    assert len(rr_model["probes"]["rates"]) == 5 and set(rr_model["relearn"]["scores"]) == {"0", "2"}
    assert (ray_job["dir"] / "audit" / "relearn" / "rr" / "step-2").is_dir()
    assert list((ray_job["dir"] / "ray" / "train").glob("relearn-*")), "relearning did not run on Ray Train"
