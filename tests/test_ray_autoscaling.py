"""Autoscaling with ray.cluster_utils.AutoscalingCluster (fake multi-node provider): a larger forget set makes the
job size more trainer workers and request them; the autoscaler adds worker nodes, and removes them after the job."""

import json
import os
import shutil
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

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        # Ray's wheel does not ship fake_multi_node/example.yaml, which the parent reads: the same base here.
        config = {"cluster_name": "rr-fake", "max_workers": 8, "head_node_type": "ray.head.default",
                  "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                               "disable_launch_config_check": True},
                  "available_node_types": {**worker_node_types, "ray.head.default": {
                      "resources": head_resources, "node_config": {}, "max_workers": 0}},
                  "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
                  "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
                  "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
                  "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
                  "rsync_exclude": [], "rsync_filter": []}
        config.update(config_kwargs)
        return config

    def start(self, _system_config=None, override_env=None):
        self.port = free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="rr-ray-as-", dir="/tmp")
        # The fake provider starts each worker node in the head's autoscaler process and joins it to
        # provider.gcs_address, else to <this machine's IP>:6379 (the default port, not this head's).
        self._config["provider"]["gcs_address"] = f"127.0.0.1:{self.port}"
        fd, config_path = tempfile.mkstemp(suffix=".json", dir=self.temp_dir)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(self._config))
        cpus = self._head_resources.pop("CPU", 0)
        # Token auth the same on both sides. With RAY_AUTH_MODE unset, `ray start` turns token auth on whenever
        # ~/.ray/auth_token exists (any local ray.init() writes one), while ray.init(address=...) never does: the
        # driver would be refused (InvalidAuthToken). So the head takes this process's mode: "disabled" when unset,
        # "token" when an earlier local ray.init() in this process set it (then both read the same token). The
        # worker nodes are started by the head's autoscaler and inherit this environment.
        env = dict(os.environ, AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1", RAY_worker_niceness="0",
                   RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"), **(override_env or {}))
        self.log_path = Path(self.temp_dir) / "head.log"
        with open(self.log_path, "wb") as log:
            # Own ports for what `ray start --head` would otherwise put on fixed defaults (the Ray client server on
            # 10001, the dashboard agent on 52365): other Ray heads may run on this machine.
            self.process = subprocess.Popen(
                ["ray", "start", "--head", "--block", f"--autoscaling-config={config_path}", "--num-cpus", str(cpus),
                 "--node-ip-address", "127.0.0.1", "--port", str(self.port), "--include-dashboard", "false",
                 "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                 "--temp-dir", self.temp_dir, "--disable-usage-stats"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return f"127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def shutdown(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        # Worker nodes still up (a failed test) were started by the head's autoscaler, in this head's own
        # process group (start_new_session): end what is left of that group, nothing else.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


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
            except (ConnectionError, RuntimeError) as error:
                if time.time() > deadline or cluster.process.poll() is not None:
                    raise AssertionError(f"cannot join the test's Ray head ({error}); its log:\n"
                                         f"{cluster.log_tail()}") from error
                time.sleep(2)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_larger_forget_set_requests_more_workers_and_they_are_added(cluster, tmp_path):
    from rr.job import Job

    data = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    data["output_dir"] = str(tmp_path / "job")  # tracking as ci.yaml has it: on, a sqlite store in the job dir
    data["compute"] = {"executor": "ray", "generator_replicas": 1, "trainer_workers": 1, "max_trainer_workers": 3,
                       "examples_per_trainer": 10, "replica_num_cpus": 1, "threads_per_replica": 1, "threads": 1}
    job = Job(JobConfig.model_validate(data))
    executor = job.executor
    assert worker_nodes() == 0  # the cluster starts as its head alone (no CPUs): every worker node is added
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
        # Added by the autoscaler's (fake multi-node) provider, whose node ids count up from ffff...00001.
        added = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        assert all(node_id.startswith("f" * 51) for node_id in added), added
    finally:
        job.close()  # releases the replica and withdraws the request
    wait_for(lambda: worker_nodes() == 0, 300, "the idle worker nodes to be removed")
