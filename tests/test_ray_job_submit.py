"""CI's Ray job: a local Ray head, `ray job submit` of ray_jobs/release.py on configs/ci.yaml with 2 generator
replicas, SUCCEEDED, its outputs checked, and the same forget set and chosen weights as the in-process executor
(same seed, same results: per-request seeds, greedy scoring, batches identical on any replica)."""

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
import yaml

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TOLERANCE = 1e-9  # scores are counts over the same greedy answers: no batching differences are expected


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(path: Path, **compute) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    data["tracking"] = {"enabled": False}
    data["release"]["baseline_single_negation"] = False  # driver-side work, the same under both executors
    data["compute"] = {"threads": 2, **compute}
    path.write_text(yaml.safe_dump(data))
    return path


TOKEN = secrets.token_hex(16)


def auth_env() -> dict:
    return dict(os.environ, RAY_worker_niceness="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on loopback; SIGTERM to it stops exactly this head's processes."""
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rr-ray-", dir="/tmp")
    # Ray ≥ 2.59 turns token authentication on for local clusters: give this head its own token, and every
    # client below (the probe, `ray job submit`, `ray job status`) the same one.
    env = auth_env()
    head = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
                             "--temp-dir", temp_dir, "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
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
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def two_jobs(ray_head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submit")
    local_dir, ray_dir = tmp / "local", tmp / "ray"
    local = subprocess.run([sys.executable, "-m", "rr.cli", "run", "--config",
                            str(write_config(tmp / "local.yaml")), "--output", str(local_dir)],
                           cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert local.returncode == 0, local.stderr[-3000:]
    # Arms are decoded on the driver under either executor (the same code): reuse them, not the executor's work.
    (ray_dir / "reveal").mkdir(parents=True)
    shutil.copy(local_dir / "reveal" / "arms.npz", ray_dir / "reveal" / "arms.npz")
    # threads_per_replica as the in-process run's threads: CPU kernels sum in the same order
    config = write_config(tmp / "ray.yaml", executor="ray", generator_replicas=2, replica_num_cpus=0.5,
                          threads_per_replica=2, trainer_num_cpus=1)
    submission = f"rr-ci-{os.getpid()}"
    submit = subprocess.run(["ray", "job", "submit", "--address", ray_head, "--working-dir", str(ROOT),
                             "--submission-id", submission, "--", "python", "ray_jobs/release.py",
                             "--config", str(config), "--output", str(ray_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=2400, env=auth_env())
    status = subprocess.run(["ray", "job", "status", "--address", ray_head, submission],
                            capture_output=True, text=True, timeout=120, env=auth_env())
    return {"local": local_dir, "ray": ray_dir, "submit": submit, "status": status}


def _json(path: Path):
    return json.loads(path.read_text())


def test_submitted_release_job_succeeds_and_writes_its_outputs(two_jobs):
    submit, status = two_jobs["submit"], two_jobs["status"]
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
    # Ray 2.60's CLI prints "Job '<id>' succeeded" (older ones printed the SUCCEEDED state name)
    assert "succeeded" in status.stdout.lower(), status.stdout + status.stderr
    job_dir = two_jobs["ray"]
    assert _json(job_dir / "reveal" / "manifest.json")["size"] > 0
    state = _json(job_dir / "release" / "state.json")
    assert state["finished"] and [s["kind"] for s in state["steps"]][:2] == ["base", "forget"]
    assert (job_dir / "release" / "summary.md").exists() and (job_dir / "release" / "ledger.json").exists()
    assert list((job_dir / "ray" / "tune").iterdir()), "the weight search did not run as a Tune experiment"
    assert list((job_dir / "ray" / "train").iterdir()), "no PEM was trained on Ray Train"
    assert "executor: ray" in submit.stdout


def test_ray_and_in_process_executors_give_the_same_forget_set_and_weights(two_jobs):
    local, on_ray = two_jobs["local"], two_jobs["ray"]
    records = lambda d: [json.loads(line) for line in (d / "reveal" / "forget_set.jsonl").read_text().splitlines()]
    assert records(on_ray) == records(local)
    assert _json(on_ray / "reveal" / "manifest.json")["sha256"] == _json(local / "reveal" / "manifest.json")["sha256"]
    steps = lambda d: _json(d / "release" / "state.json")["steps"]
    assert [(s["kind"], s["merge_weight"], s["rule"]) for s in steps(on_ray)] == \
        [(s["kind"], s["merge_weight"], s["rule"]) for s in steps(local)]
    for mine, theirs in zip(steps(on_ray), steps(local)):
        for split in ("validation", "test"):
            for score in ("forget_score", "utility_score"):
                assert abs(mine[split][score] - theirs[split][score]) <= TOLERANCE
