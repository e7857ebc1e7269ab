"""The Helm chart: values and their schema, template references, and (where helm is on PATH) lint and render."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from rr.config import JobConfig
from rr.deploy.profile import ClusterProfile, parse_profile
from rr.deploy.rayjob import MAPPING, build_rayjob, mapped_value
from rr.deploy.validation import crd_errors, find_one as one, pod_specs, secret_leaks

CRDS = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
K8S_VERSION = "1.33.0"

CHART = Path(__file__).resolve().parents[1] / "helm"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
needs_helm = pytest.mark.skipif(shutil.which("helm") is None,
                                reason="helm is not on PATH (not installed on these machines; see README Development)")


def schema_errors(values: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(values)]


def with_value(path: str, value) -> dict:
    values = json.loads(json.dumps(VALUES))
    *parents, last = path.split(".")
    node = values
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return values


_DELETE = object()


def test_default_values_pass_the_schema():
    assert schema_errors(VALUES) == []


@pytest.mark.parametrize("path,value,expected", [
    ("ray.generation.minReplicas", -1, "ray.generation.minReplicas: -1 is less than the minimum of 0"),
    ("ray.training.maxReplicas", 0, "ray.training.maxReplicas: 0 is less than the minimum of 1"),
    ("image.repository", _DELETE, "image: 'repository' is a required property"),
    ("image.repository", "", "image.repository: '' should be non-empty"),
    ("storage.jobs.accessMode", "ReadWriteOnce", "storage.jobs.accessMode: 'ReadWriteOnce' is not one of"),
    ("ray.generation.memory", "lots", "ray.generation.memory: 'lots' is not valid"),
    ("mlflow.backendStore.password", "hunter2", "Additional properties are not allowed ('password' was unexpected)"),
])
def test_schema_rejects_bad_values_naming_the_key(path, value, expected):
    assert any(expected in error for error in schema_errors(with_value(path, value))), schema_errors(
        with_value(path, value))


def test_schema_rejects_a_missing_image_section():
    values = dict(VALUES)
    del values["image"]
    assert "(root)" not in schema_errors(values)[0] and "'image' is a required property" in schema_errors(values)[0]


def _has(values: dict, dotted: str) -> bool:
    node = values
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_templates_reference_only_values_that_exist():
    references = set()
    for template in (CHART / "templates").glob("*"):
        references |= set(re.findall(r"\.Values((?:\.[A-Za-z_][\w]*)+)", template.read_text()))
    assert len(references) > 30
    # job.config is the user's rr config (any of its keys may be absent); everything else must have a default.
    missing = [ref for ref in sorted(references) if not ref.startswith(".job.config.") and not _has(VALUES, ref[1:])]
    assert missing == []


def test_kuberay_operator_is_an_optional_dependency_disabled_by_default():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    dependency = one([dict(d, kind="dep", metadata={"name": d["name"]}) for d in chart["dependencies"]], "dep",
                     "kuberay-operator")
    assert dependency["repository"] == "https://ray-project.github.io/kuberay-helm/"
    assert dependency["condition"] == "kuberay-operator.enabled"
    assert VALUES["kuberay-operator"]["enabled"] is False


def test_notes_tell_how_to_submit_watch_and_open_mlflow():
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    for hint in ("ray job submit", "rr submit", "rr status", "rr logs", "port-forward", "-mlflow"):
        assert hint in notes


def test_chart_defaults_match_rr_submits_default_profile():
    """`rr submit --dry-run` without --profile describes what `helm install rr ./helm` installs."""
    profile, ray = ClusterProfile(), VALUES["ray"]
    assert profile.image == f"{VALUES['image']['repository']}:{VALUES['image']['tag']}"
    assert profile.ray_version == ray["version"] and profile.jobs_mount == VALUES["storage"]["jobs"]["mountPath"]
    for name in ("generation", "training"):
        group = getattr(profile, name)
        assert (group.min_replicas, group.max_replicas, group.gpus, group.node_selector) == (
            ray[name]["minReplicas"], ray[name]["maxReplicas"], ray[name]["gpus"], ray[name]["nodeSelector"])
    assert (profile.ttl_seconds_after_finished, profile.backoff_limit, profile.active_deadline_seconds) == (
        VALUES["job"]["ttlSecondsAfterFinished"], VALUES["job"]["backoffLimit"], VALUES["job"]["activeDeadlineSeconds"])


# ---- with helm ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chart_copy(tmp_path_factory):
    """The chart without its KubeRay dependency (fetching it needs the network; it is disabled by default)."""
    copy = tmp_path_factory.mktemp("chart") / "rr"
    shutil.copytree(CHART, copy)
    chart = yaml.safe_load((copy / "Chart.yaml").read_text())
    chart.pop("dependencies")
    (copy / "Chart.yaml").write_text(yaml.safe_dump(chart))
    return copy


def helm_template(chart: Path, *sets: str) -> list[dict]:
    args = ["helm", "template", "rr", str(chart), "--namespace", "ml"]
    for item in sets:
        args += ["--set", item]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@needs_helm
def test_helm_lint(chart_copy):
    result = subprocess.run(["helm", "lint", str(chart_copy), "--set", "job.enabled=true"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_helm
@pytest.mark.parametrize("bad,message", [("ray.generation.minReplicas=-1", "/ray/generation/minReplicas"),
                                         ("image.repository=", "/image/repository")])
def test_helm_refuses_bad_values(chart_copy, bad, message):
    result = subprocess.run(["helm", "template", "rr", str(chart_copy), "--set", bad], capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr


@needs_helm
def test_helm_template_validates_and_its_rayjob_is_rr_submits(chart_copy):
    import kubernetes_validate

    objects = helm_template(chart_copy, "job.enabled=true")
    for obj in objects:
        if obj["apiVersion"].startswith("ray.io/"):
            if CRDS.is_dir():
                assert crd_errors(obj, CRDS) == [], obj["kind"]
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    profile = parse_profile(one(objects, "ConfigMap", "rr-profile")["data"]["profile.yaml"], "chart")
    assert profile == ClusterProfile()
    config = JobConfig.model_validate(yaml.safe_load(one(objects, "ConfigMap", "rr-job-config")["data"]["config.yaml"]))
    assert str(config.output_dir) == "/rr/jobs/runs/rr-job"
    rendered, built = one(objects, "RayJob"), build_rayjob(config, profile, "ml")
    for field in MAPPING:
        assert mapped_value(rendered, field.path) == mapped_value(built, field.path), field.path
    assert rendered["spec"] == built["spec"]
    for spec in (s for o in objects for s in pod_specs(o)):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert all(c["securityContext"]["allowPrivilegeEscalation"] is False for c in spec["containers"])
    assert secret_leaks(yaml.safe_dump(objects)) == []


@needs_helm
def test_helm_secrets_are_references_only(chart_copy):
    objects = helm_template(chart_copy, "mlflow.backendStore.existingSecret=mlflow-db", "hfToken.existingSecret=hf",
                            "mlflow.artifacts.destination=s3://bucket/mlflow",
                            "mlflow.artifacts.s3.credentialsSecret=s3-creds", "job.enabled=true")
    mlflow = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "MLFLOW_BACKEND_STORE_URI", "valueFrom": {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}} \
        in mlflow["env"]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in mlflow["args"]
    head = one(objects, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in head["env"]
    assert not [o for o in objects if o["kind"] == "Secret"]


@needs_helm
def test_helm_rayjob_for_a_ray_executor_config_is_rr_submits(chart_copy, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"job": {"enabled": True, "config": {
        "name": "Big Job", "output_dir": "runs/big", "generation": {"backend": "vllm"},
        "compute": {"executor": "ray", "device": "cuda", "generator_replicas": 2, "max_generator_replicas": 6,
                    "replica_num_gpus": 1, "max_trainer_workers": 3, "trainer_use_gpu": True}}}}))
    out = subprocess.run(["helm", "template", "rr", str(chart_copy), "-f", str(values)], capture_output=True,
                         text=True, check=True).stdout
    objects = [doc for doc in yaml.safe_load_all(out) if doc]
    profile = parse_profile(one(objects, "ConfigMap", "rr-profile")["data"]["profile.yaml"], "chart")
    config = JobConfig.model_validate(yaml.safe_load(one(objects, "ConfigMap", "big-job-config")["data"]["config.yaml"]))
    rendered = one(objects, "RayJob")
    assert rendered["metadata"]["name"] == "big-job"
    assert rendered["spec"] == build_rayjob(config, profile, "default")["spec"]
