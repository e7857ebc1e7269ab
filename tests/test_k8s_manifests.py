"""k8s/ kustomize overlays: render, validate (Kubernetes schemas, KubeRay CRDs), agree with `rr submit`, stay secure."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rr.config import JobConfig
from rr.deploy.profile import ClusterProfile, parse_profile
from rr.deploy.rayjob import MAPPING, build_rayjob, mapped_value
from rr.deploy.validation import crd_errors, find_one, pod_specs, secret_leaks

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT.parent / "shared" / "kuberay-crds"
OVERLAYS = sorted(p.name for p in (ROOT / "k8s" / "overlays").iterdir() if p.is_dir())
K8S_VERSION = "1.33.0"
needs_crds = pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRD schemas not found at {CRDS}")
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not on PATH")


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_secret_leak_check_finds_planted_secrets():
    planted = "uri: postgresql+psycopg2://mlflow:hunter2@db:5432/mlflow\ntoken: hf_abcdefghijklmnopqrstuvwx\n"
    assert len(secret_leaks(planted)) == 2
    assert secret_leaks("mlflow_tracking_uri: http://rr-mlflow:5000\nhf_token_key: token\n") == []


one = find_one


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_builtin_objects_validate(overlay):
    import kubernetes_validate

    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"RayJob", "Deployment", "Service", "NetworkPolicy", "Role", "RoleBinding", "ServiceAccount",
            "PersistentVolumeClaim", "ConfigMap"} <= kinds
    for obj in objects:
        assert obj["metadata"].get("namespace") == "rr", obj["metadata"]["name"]
        if not obj["apiVersion"].startswith("ray.io/"):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@needs_kubectl
@needs_crds
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_rayjob_passes_kuberay_crd_schema(overlay):
    rayjob = one(render(overlay), "RayJob")
    assert crd_errors(rayjob, CRDS) == []


@needs_crds
def test_crd_validation_catches_a_misspelt_field_and_a_wrong_type():
    from rr.config import JobConfig

    rayjob = build_rayjob(JobConfig(), ClusterProfile(), "rr")
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    rayjob["spec"]["backoffLimit"] = "twice"
    errors = crd_errors(rayjob, CRDS)
    assert any("maxReplica" in e for e in errors) and any("backoffLimit" in e for e in errors)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_rayjob_is_what_rr_submit_builds_from_its_configmaps(overlay):
    """The overlay's own rr-profile and job config, fed to rr's mapping, give the overlay's RayJob."""
    objects = render(overlay)
    profile = parse_profile(one(objects, "ConfigMap", "rr-profile")["data"]["profile.yaml"], overlay)
    config = JobConfig.model_validate(yaml.safe_load(one(objects, "ConfigMap", "rr-job-config")["data"]["config.yaml"]))
    rendered = one(objects, "RayJob")
    built = build_rayjob(config, profile, "rr")
    for field in MAPPING:
        assert mapped_value(rendered, field.path) == mapped_value(built, field.path), field.path
    assert rendered["spec"] == built["spec"]  # not just the mapped fields: the whole spec
    assert mapped_value(rendered, "spec.rayClusterSpec.autoscalerOptions.version") == "v2"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_profile_image_is_the_image_the_overlay_deploys(overlay):
    objects = render(overlay)
    profile = parse_profile(one(objects, "ConfigMap", "rr-profile")["data"]["profile.yaml"], overlay)
    images = {c["image"] for o in objects for spec in pod_specs(o) for c in spec["containers"]}
    assert images == {profile.image}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_without_privilege_escalation(overlay):
    specs = [spec for o in render(overlay) for spec in pod_specs(o)]
    assert len(specs) >= 5  # mlflow, submitter, head, two worker groups
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


@needs_kubectl
def test_gpu_overlay_puts_workers_on_gpu_pools_and_cpu_dev_requests_no_gpu():
    gpu_groups = one(render("gpu"), "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in gpu_groups] == ["generation", "training"]
    for group in gpu_groups:
        pod = group["template"]["spec"]
        assert pod["nodeSelector"] == {"rr.dev/pool": group["groupName"]}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cpu = render("cpu-dev")
    assert "nvidia.com/gpu" not in yaml.safe_dump(cpu)
    assert "entrypointNumGpus" not in one(cpu, "RayJob")["spec"]
    head = one(cpu, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_in_rendered_manifests(overlay):
    objects = render(overlay)
    assert not [o for o in objects if o["kind"] == "Secret"]
    assert secret_leaks(yaml.safe_dump(objects)) == []
    mlflow = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert all("value" not in e or "uri" not in e["name"].lower() for e in mlflow.get("env", []))
