"""Autoscaling with ray.cluster_utils.AutoscalingCluster (fake multi-node provider): a larger forget set makes the
job size more trainer workers and request them; the autoscaler adds worker nodes, and removes them after the job."""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray.cluster_utils import AutoscalingCluster  # noqa: E402

from rr.config import JobConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LoopbackAutoscalingCluster(AutoscalingCluster):
    """AutoscalingCluster's config and fake node provider, but started on loopback with its own port and temp dir
    as one `ray start --block` process, and stopped by signalling that process: its start()/shutdown() run
    `ray stop --force`, which would end every Ray on the machine."""

    def start(self, _system_config=None, override_env=None):
        self.port = free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="rr-ray-as-", dir="/tmp")
        fd, config_path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(self._config))
        cpus = self._head_resources.pop("CPU", 0)
        env = dict(os.environ, AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1", RAY_worker_niceness="0")
        self.process = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--autoscaling-config={config_path}", "--num-cpus", str(cpus),
             "--node-ip-address", "127.0.0.1", "--port", str(self.port), "--include-dashboard", "false",
             "--temp-dir", self.temp_dir, "--disable-usage-stats"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        return f"127.0.0.1:{self.port}"

    def shutdown(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def worker_nodes() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; worker nodes: {worker_nodes()}")
        time.sleep(2)


@pytest.fixture
def cluster():
    cluster = LoopbackAutoscalingCluster(
        head_resources={"CPU": 0},  # the head runs the driver and the pool; every replica or trainer needs a worker
        worker_node_types={"cpu-worker": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0,
                                          "max_workers": 4}},
        idle_timeout_minutes=0.1)
    address = cluster.start()
    try:
        deadline = time.time() + 120
        while True:
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                if time.time() > deadline:
                    raise
                time.sleep(2)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_larger_forget_set_requests_more_workers_and_they_are_added(cluster, tmp_path):
    from rr.job import Job

    data = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    data.update(output_dir=str(tmp_path / "job"), tracking={"enabled": False})
    data["compute"] = {"executor": "ray", "generator_replicas": 1, "trainer_workers": 1, "max_trainer_workers": 3,
                       "examples_per_trainer": 10, "replica_num_cpus": 1, "threads_per_replica": 1, "threads": 1}
    job = Job(JobConfig.model_validate(data))
    executor = job.executor
    try:
        executor.prepare("release", 6)  # 6 forget examples: 1 trainer beside the replica
        assert (executor.replicas, executor.trainers) == (1, 1)
        wait_for(lambda: worker_nodes() >= 2, 300, "2 worker nodes (1 replica + 1 trainer)")
        small = worker_nodes()
        replica_node = ray.get(executor.pool.info.remote())[0]["node_id"]
        assert replica_node in {n["NodeID"] for n in ray.nodes() if n["Resources"].get("CPU", 0) > 0}

        executor.prepare("release", 30)  # 30 forget examples: 3 trainers
        assert executor.trainers == 3
        wait_for(lambda: worker_nodes() >= 4, 300, "4 worker nodes (1 replica + 3 trainers)")
        assert worker_nodes() > small
    finally:
        job.close()  # releases the replica and withdraws the request
    wait_for(lambda: worker_nodes() == 0, 300, "the idle worker nodes to be removed")
