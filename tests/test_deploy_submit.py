"""`rr submit`, `rr status`, `rr logs`: dry-run output, and the real kubernetes client against a stand-in API server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rr.cli import app
from rr.config import JobConfig
from rr.deploy.profile import ClusterProfile
from rr.deploy.rayjob import build_rayjob, kube_name
from rr.deploy.validation import crd_errors, find_one

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT.parent / "shared" / "kuberay-crds"
runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, list(args), env=env)


def test_dry_run_prints_a_configmap_and_a_rayjob_that_pass_the_crd(tmp_path):
    result = invoke("submit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--dry-run", "-n", "ml")
    assert result.exit_code == 0, result.output
    objects = list(yaml.safe_load_all(result.stdout))
    config_map, rayjob = find_one(objects, "ConfigMap"), find_one(objects, "RayJob")
    assert rayjob["metadata"] == {**rayjob["metadata"], "name": "quickstart-code", "namespace": "ml"}
    assert rayjob["spec"]["entrypoint"] == "python ray_jobs/release.py --config /etc/rr/config.yaml"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    job_config = JobConfig.model_validate(yaml.safe_load(config_map["data"]["config.yaml"]))
    assert str(job_config.output_dir) == "/rr/jobs/runs/quickstart"  # on the shared volume: resubmits resume
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS}")
    assert crd_errors(rayjob, CRDS) == []


def test_dry_run_stage_and_profile(tmp_path):
    profile = tmp_path / "profile.yaml"
    profile.write_text("image: reg/rr:1\nhf_token_secret: hf\nmlflow_tracking_uri: null\ntraining: {gpus: 2}\n")
    result = invoke("submit", "-c", str(ROOT / "configs" / "ci.yaml"), "--dry-run", "--stage", "reveal",
                    "--profile", str(profile))
    assert result.exit_code == 0, result.output
    rayjob = find_one(list(yaml.safe_load_all(result.stdout)), "RayJob")
    assert rayjob["spec"]["entrypoint"].startswith("python ray_jobs/reveal.py")
    assert rayjob["spec"]["entrypointNumGpus"] == 2  # executor local: the driver runs on a training GPU
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]) == {"env_vars": {}}
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "reg/rr:1"
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in head["env"]
    assert "hf_" not in result.stdout.replace("hf_token_env", "")


def test_refusals_name_the_problem(tmp_path):
    outside = tmp_path / "job.yaml"
    outside.write_text("output_dir: /data/elsewhere\n")
    result = invoke("submit", "-c", str(outside), "--dry-run")
    assert result.exit_code == 2 and "shared job volume" in result.output
    bad_profile = tmp_path / "p.yaml"
    bad_profile.write_text("generation: {min_replicas: 3, max_replicas: 1}\n")
    result = invoke("submit", "-c", str(ROOT / "configs" / "ci.yaml"), "--dry-run", "--profile", str(bad_profile))
    assert result.exit_code == 2 and "min_replicas 3 > max_replicas 1" in result.output
    result = invoke("submit", "-c", str(ROOT / "configs" / "ci.yaml"), "--dry-run", "--stage", "train")
    assert result.exit_code == 2 and "reveal, release, evaluate" in result.output


def test_kube_name_is_a_dns_label_within_kuberays_limit():
    assert kube_name("Quickstart_Code v2") == "quickstart-code-v2"
    assert len(kube_name("x" * 80)) == 47
    cpu = build_rayjob(JobConfig(compute={"device": "cpu"}), ClusterProfile(), "ns")
    from rr.deploy.validation import pod_specs

    limits = [c["resources"]["limits"] for spec in pod_specs(cpu) for c in spec["containers"]]
    assert len(limits) == 4 and not [lim for lim in limits if "nvidia.com/gpu" in lim]
    assert "entrypointNumGpus" not in cpu["spec"]


# ---- against a stand-in API server -------------------------------------------------------------------------------

class FakeApiServer:
    """Answers the few API calls rr makes the way kube-apiserver does (status codes and Status bodies)."""

    def __init__(self, crds: bool = True, forbidden: bool = False):
        self.crds, self.forbidden = crds, forbidden
        self.objects: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body, raw=False):
                data = body.encode() if raw else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if raw else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                path = self.path.split("?")[0]
                server.requests.append((method, path))
                if "/apis/ray.io/" in path and not server.crds:
                    return self._send(404, "404 page not found", raw=True)
                if server.forbidden:
                    return self._send(403, {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
                                            "message": f'rayjobs.ray.io is forbidden: User "dev" cannot {method.lower()} '
                                                       'resource "rayjobs" in the namespace "prod"'})
                kind = "rayjobs" if "/rayjobs" in path else "configmaps" if "/configmaps" in path else "pods"
                if method == "GET" and path.endswith(("/rayjobs", "/pods")):
                    items = [o for p, o in server.objects.items() if f"/{kind}/" in p]
                    return self._send(200, {"kind": "List", "metadata": {}, "items": items})
                if method == "POST":
                    body.setdefault("metadata", {})["uid"] = f"uid-{len(server.objects)}"
                    server.objects[f"{path}/{body['metadata']['name']}"] = body
                    return self._send(201, body)
                if path in server.objects:
                    if method == "PATCH":
                        server.objects[path]["metadata"].update(body["metadata"])
                    return self._send(200, server.objects[path])
                name = path.rsplit("/", 1)[-1]
                return self._send(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                                        "message": f'{kind} "{name}" not found',
                                        "details": {"name": name, "kind": kind}})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PATCH(self):
                self._handle("PATCH")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def kubeconfig(tmp_path: Path, server: str, namespace: str = "ml") -> dict:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u", "namespace": namespace}}]}))
    return {"KUBECONFIG": str(path), "KUBERNETES_SERVICE_HOST": ""}


@pytest.fixture
def api():
    servers = []

    def start(**kwargs):
        servers.append(FakeApiServer(**kwargs))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def submit(env, *extra):
    return invoke("submit", "-c", str(ROOT / "configs" / "ci.yaml"), "--profile",
                  str(ROOT / "k8s" / "base" / "profile.yaml"), *extra, env=env)


def test_submit_creates_the_configmap_then_the_rayjob_that_owns_it(tmp_path, api):
    server = api()
    result = submit(kubeconfig(tmp_path, server.url))
    assert result.exit_code == 0, result.output
    assert "submitted RayJob ci-code in namespace ml" in result.output
    posts = [path for method, path in server.requests if method == "POST"]
    assert posts == ["/api/v1/namespaces/ml/configmaps", "/apis/ray.io/v1/namespaces/ml/rayjobs"]
    config_map = server.objects["/api/v1/namespaces/ml/configmaps/ci-code-config"]
    assert config_map["metadata"]["ownerReferences"][0] == {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "name": "ci-code", "uid": "uid-1", "blockOwnerDeletion": False}
    status = invoke("status", "ci-code", env=kubeconfig(tmp_path, server.url))
    assert status.exit_code == 0 and "deployment       Pending" in status.output
    again = submit(kubeconfig(tmp_path, server.url))
    assert again.exit_code == 2 and "already exists" in again.output and "kubectl delete rayjob ci-code" in again.output
    logs = invoke("logs", "ci-code", env=kubeconfig(tmp_path, server.url))
    assert logs.exit_code == 2 and "no pods yet" in logs.output


def test_missing_crds_say_install_kuberay(tmp_path, api):
    server = api(crds=False)
    result = submit(kubeconfig(tmp_path, server.url))
    assert result.exit_code == 2 and "KubeRay CRDs are missing" in result.output
    assert not [1 for method, _ in server.requests if method == "POST"]  # nothing half-created


def test_forbidden_namespace_says_which_and_what_to_do(tmp_path, api):
    server = api(forbidden=True)
    result = submit(kubeconfig(tmp_path, server.url), "-n", "prod")
    assert result.exit_code == 2
    assert "forbidden to list RayJobs in namespace 'prod'" in result.output and "--namespace" in result.output


def test_no_cluster_and_unreachable_cluster(tmp_path):
    result = submit({"KUBECONFIG": str(tmp_path / "absent"), "KUBERNETES_SERVICE_HOST": ""})
    assert result.exit_code == 2 and "no Kubernetes cluster configured" in result.output and "--dry-run" in result.output
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = submit(kubeconfig(tmp_path, f"http://127.0.0.1:{port}"))
    assert result.exit_code == 2 and "cannot reach the Kubernetes API server" in result.output


def test_without_profile_submit_reads_the_installed_one_or_says_to_install(tmp_path, api):
    server = api()
    result = invoke("submit", "-c", str(ROOT / "configs" / "ci.yaml"), env=kubeconfig(tmp_path, server.url))
    assert result.exit_code == 2 and "no ConfigMap rr-profile in namespace 'ml'" in result.output
    profile_text = (ROOT / "k8s" / "base" / "profile.yaml").read_text()
    server.objects["/api/v1/namespaces/ml/configmaps/rr-profile"] = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "rr-profile"}, "data": {"profile.yaml": profile_text}}
    result = invoke("submit", "-c", str(ROOT / "configs" / "ci.yaml"), env=kubeconfig(tmp_path, server.url))
    assert result.exit_code == 0, result.output
    rayjob = server.objects["/apis/ray.io/v1/namespaces/ml/rayjobs/ci-code"]
    assert rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0] == {
        "name": "jobs", "persistentVolumeClaim": {"claimName": "rr-jobs"}}


def test_ray_executor_bounds_become_worker_group_bounds():
    config = JobConfig(generation={"backend": "vllm"}, compute={
        "executor": "ray", "device": "cuda", "generator_replicas": 2, "max_generator_replicas": 6,
        "replica_num_gpus": 1, "trainer_workers": 1, "max_trainer_workers": 3, "trainer_use_gpu": True})
    rayjob = build_rayjob(config, ClusterProfile(), "ml")
    groups = {g["groupName"]: g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert (groups["generation"]["minReplicas"], groups["generation"]["maxReplicas"]) == (0, 6)  # scale from zero
    assert groups["training"]["maxReplicas"] == 3
    assert "entrypointNumGpus" not in rayjob["spec"]  # the driver stays on the head; replicas and trainers use GPUs
