"""The Helm chart: values and their schema, template references, and Helm's own lint and render (binary or Go SDK)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from rr.config import JobConfig
from rr.deploy.profile import ClusterProfile, parse_profile
from rr.deploy.rayjob import MAPPING, build_rayjob, kube_name, mapped_value
from rr.deploy.validation import crd_errors, find_one as one, pod_specs, secret_leaks

CRDS = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
K8S_VERSION = "1.33.0"

CHART = Path(__file__).resolve().parents[1] / "helm"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


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


# ---- rendered and linted by Helm ------------------------------------------------------------------------------
# With the `helm` binary on PATH these tests run it; elsewhere (the project's machines, CI) they call Helm's Go SDK
# through helm-python-sdk (Helm v4.2.3 behind a C ABI; a dev extra). Either way Helm's own code renders the
# templates, lints and applies values.schema.json. render_chart and lint_chart are the only places that choose.

HELM = shutil.which("helm")
SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
PAPER_CONFIGS = sorted((CHART.parent / "configs" / "paper").glob("*.yaml"))


class ChartRefused(Exception):
    """Helm refused the values (values.schema.json) or a template failed; the message is Helm's."""


def _helm_cli(args: list[str], values: dict | None) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:
        if values:
            values_file = Path(tmp) / "values.json"  # JSON is YAML: `-f` reads it as a values file
            values_file.write_text(json.dumps(values))
            args = [*args, "-f", str(values_file)]
        return subprocess.run([HELM, *args], capture_output=True, text=True)


def render_chart(chart: Path, values: dict | None = None, namespace: str = "ml") -> list[dict]:
    """The objects `helm template rr CHART --namespace NAMESPACE -f VALUES` prints (NOTES.txt is not one)."""
    if HELM:
        result = _helm_cli(["template", "rr", str(chart), "--namespace", namespace], values)
        if result.returncode != 0:
            raise ChartRefused(result.stderr)
        texts = [result.stdout]
    else:
        import helm_python

        try:
            with helm_python.Chart.load(chart) as loaded:
                manifests = loaded.render(values or {}, name="rr", namespace=namespace, is_install=True)
        except helm_python.HelmError as exc:
            raise ChartRefused(str(exc)) from exc
        texts = [text for path, text in sorted(manifests.items()) if not path.endswith("NOTES.txt")]
    return [doc for text in texts for doc in yaml.safe_load_all(text) if doc]


def lint_chart(chart: Path, values: dict | None = None) -> list[tuple[str, str]]:
    """`helm lint CHART -f VALUES`: every finding as (severity, message), the message without its file."""
    if HELM:
        result = _helm_cli(["lint", str(chart)], values)
        return re.findall(r"^\[(INFO|WARNING|ERROR)\] (?:[^:\n]*: )?(.*)$", result.stdout + result.stderr, re.M)
    import helm_python

    report = helm_python.lint(chart, values)
    return ([(SEVERITY[m["severity"]], m["error"]) for m in report["messages"]]
            + [("ERROR", error) for error in report["errors"]])


@pytest.fixture(scope="module")
def built_chart(tmp_path_factory):
    """The chart as `helm dependency build ./helm` leaves it, the KubeRay operator chart packed in charts/.

    The real operator chart comes from KubeRay's chart repository, which these machines cannot reach, so a stand-in
    of the same name and version takes its place: one ServiceAccount, enough to see whether Helm renders it.
    (The helm binary refuses to template a chart whose declared dependency is missing, even a disabled one.)"""
    root = tmp_path_factory.mktemp("chart")
    chart, operator = root / "rr", root / "kuberay-operator"
    shutil.copytree(CHART, chart)
    (operator / "templates").mkdir(parents=True)
    (operator / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "kuberay-operator", "version": "1.6.2", "description": "stand-in (tests only)"}))
    (operator / "templates" / "serviceaccount.yaml").write_text(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: kuberay-operator\n")
    (chart / "charts").mkdir(exist_ok=True)
    with tarfile.open(chart / "charts" / "kuberay-operator-1.6.2.tgz", "w:gz") as archive:
        archive.add(operator, arcname="kuberay-operator")
    return chart


def validate_objects(objects: list[dict]) -> None:
    """Built-in kinds against the Kubernetes schemas (strict), ray.io kinds against KubeRay's CRDs."""
    import kubernetes_validate

    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS}")
    for obj in objects:
        if obj["apiVersion"].startswith("ray.io/"):
            assert crd_errors(obj, CRDS) == [], obj["kind"]
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# Each message lint may still give, and why it stays.
EXPLAINED_LINT = {
    # Until `helm dependency build ./helm` has fetched the operator chart (README, "On Kubernetes"), which needs
    # KubeRay's chart repository; built_chart shows the warning gone once the chart is in charts/.
    ("WARNING", "chart directory is missing these dependencies: kuberay-operator"),
    # rr has no logo; an icon only decorates chart repository listings.
    ("INFO", "icon is recommended"),
}
SECRET_VALUES = {"mlflow": {"backendStore": {"existingSecret": "mlflow-db"},
                            "artifacts": {"destination": "s3://bucket/mlflow", "s3": {"credentialsSecret": "s3-creds"}}},
                 "hfToken": {"existingSecret": "hf"}, "job": {"enabled": True}}


@pytest.mark.parametrize("values", [None, {"job": {"enabled": True}}, SECRET_VALUES],
                         ids=["defaults", "with-job", "with-secrets"])
def test_lint_finds_nothing_but_the_explained_messages(values):
    findings = set(lint_chart(CHART, values))
    assert findings - EXPLAINED_LINT == set()


def test_with_the_operator_chart_built_lint_is_clean_and_the_operator_renders_only_when_enabled(built_chart):
    assert lint_chart(built_chart, {"job": {"enabled": True}}) == [("INFO", "icon is recommended")]
    assert [o for o in render_chart(built_chart) if o["metadata"]["name"] == "kuberay-operator"] == []
    enabled = render_chart(built_chart, {"kuberay-operator": {"enabled": True}})
    assert one(enabled, "ServiceAccount", "kuberay-operator")


@pytest.mark.parametrize("values,key,constraint", [
    ({"ray": {"generation": {"minReplicas": -1}}}, "/ray/generation/minReplicas", "minimum"),
    ({"image": {"repository": ""}}, "/image/repository", "minLength"),
    ({"ray": {"training": {"gpus": "two"}}}, "/ray/training/gpus", "want integer"),
    ({"job": {"backoffLimit": "once"}}, "/job/backoffLimit", "want integer"),
    ({"storage": {"jobs": {"accessMode": "ReadWriteOnce"}}}, "/storage/jobs/accessMode", "value must be 'ReadWriteMany'"),
    ({"mlflow": {"backendStore": {"password": "x"}}}, "/mlflow/backendStore", "password"),
])
def test_helm_refuses_bad_values_naming_the_key(built_chart, values, key, constraint):
    with pytest.raises(ChartRefused) as refused:
        render_chart(built_chart, values)
    message = str(refused.value)
    assert "values don't meet the specifications of the schema" in message
    assert f"at '{key}'" in message and constraint in message, message


def test_a_failing_template_check_names_the_value_and_the_fix(built_chart):
    with pytest.raises(ChartRefused, match="job.config.output_dir /data/x: on a cluster the job directory must be "
                                           "on the shared job volume"):
        render_chart(built_chart, {"job": {"enabled": True, "config": {"output_dir": "/data/x"}}})


def test_rendered_objects_validate_and_the_rayjob_is_rr_submits(built_chart):
    objects = render_chart(built_chart, {"job": {"enabled": True}})
    assert {"RayCluster", "RayJob", "Deployment", "Service", "NetworkPolicy", "Role", "RoleBinding",
            "ServiceAccount", "PersistentVolumeClaim", "ConfigMap"} <= {o["kind"] for o in objects}
    validate_objects(objects)
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


def test_helm_secrets_are_references_only(built_chart):
    objects = render_chart(built_chart, SECRET_VALUES)
    validate_objects(objects)
    mlflow = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "MLFLOW_BACKEND_STORE_URI", "valueFrom": {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}} \
        in mlflow["env"]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in mlflow["args"]
    head = one(objects, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in head["env"]
    assert not [o for o in objects if o["kind"] == "Secret"]
    assert secret_leaks(yaml.safe_dump(objects)) == []


RAY_EXECUTOR_JOB = {"name": "Big Job", "output_dir": "runs/big", "generation": {"backend": "vllm"},
                    "compute": {"executor": "ray", "device": "cuda", "generator_replicas": 2,
                                "max_generator_replicas": 6, "replica_num_gpus": 1, "max_trainer_workers": 3,
                                "trainer_use_gpu": True}}


@pytest.mark.parametrize("job_config", [RAY_EXECUTOR_JOB, *PAPER_CONFIGS],
                         ids=["ray-executor", *(p.stem for p in PAPER_CONFIGS)])
def test_helm_rayjob_for_a_gpu_job_config_is_rr_submits(built_chart, job_config):
    if isinstance(job_config, Path):
        job_config = yaml.safe_load(job_config.read_text())
    objects = render_chart(built_chart, {"job": {"enabled": True, "config": job_config}})
    profile = parse_profile(one(objects, "ConfigMap", "rr-profile")["data"]["profile.yaml"], "chart")
    config_map = one(objects, "ConfigMap", f"{kube_name(job_config['name'])}-config")
    config = JobConfig.model_validate(yaml.safe_load(config_map["data"]["config.yaml"]))
    rendered = one(objects, "RayJob")
    assert rendered["metadata"]["name"] == kube_name(job_config["name"])
    assert rendered["spec"] == build_rayjob(config, profile, "ml")["spec"]
    if CRDS.is_dir():  # the schemas live beside the repository (../shared); a checkout elsewhere has none
        assert crd_errors(rendered, CRDS) == []
