"""The one mapping from a job config (and the cluster profile) to a KubeRay RayJob and its config ConfigMap.

`rr submit` builds its objects here; the Helm chart's templates/rayjob.yaml and k8s/base/rayjob.yaml set
the same fields to the same values (tests/test_k8s_manifests.py and tests/test_helm_chart.py compare them
field by field through MAPPING). Every row of MAPPING is one RayJob field and where its value comes from:

| RayJob field | from | value |
|---|---|---|
| metadata.name | `name` | lower-cased, runs of other characters → `-`, at most 47 characters (KubeRay's limit) |
| spec.entrypoint | the stage | `python ray_jobs/<stage>.py --config /etc/rr/config.yaml` (stage: release by default) |
| ConfigMap `<name>-config` | the whole config | `config.yaml`, mounted read-only at /etc/rr; `output_dir` rebased onto the job volume |
| spec.submissionMode | fixed | `K8sJobMode`: a submitter Job runs `ray job submit` once the cluster is ready |
| spec.shutdownAfterJobFinishes | fixed | `true`: the GPU workers go away with the job |
| spec.ttlSecondsAfterFinished | profile | `ttl_seconds_after_finished` |
| spec.backoffLimit | profile | `backoff_limit`: a retried job resumes from the job directory |
| spec.activeDeadlineSeconds | profile | `active_deadline_seconds` |
| spec.runtimeEnvYAML | profile | `env_vars.MLFLOW_TRACKING_URI` = `mlflow_tracking_uri` (a config's own tracking.tracking_uri wins) |
| spec.entrypointNumGpus | `compute.executor`, `compute.device` | executor local on a GPU device: the training group's GPUs (the whole job runs in the driver, on a GPU worker); otherwise absent |
| rayClusterSpec.enableInTreeAutoscaling | fixed | `true`, autoscalerOptions.version `v2` |
| workerGroupSpecs[generation].maxReplicas | `compute.max_generator_replicas` | the upper replica bound (else `generator_replicas`): the autoscaler adds GPU workers as the Ray executor sizes replicas to the forget set; minReplicas the profile's, at most that |
| workerGroupSpecs[training].maxReplicas | `compute.max_trainer_workers`, profile | executor ray: the upper trainer bound (else `trainer_workers`); executor local: `training.max_replicas` |
| workerGroupSpecs[*] GPUs | `compute.device`, profile | `cpu`: no GPU requested; otherwise the group's `gpus` as nvidia.com/gpu |
| container env `<model.hf_token_env>` | `model.hf_token_env`, profile | from Secret `hf_token_secret`, key `hf_token_key` (only a reference, never the token) |

Relative output dirs are placed under the job volume (`runs/x` → `/rr/jobs/runs/x`), so a resubmitted job
finds its checkpoint wherever its pods land; an absolute one must already be on that volume.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import yaml

from rr.config import JobConfig, dump_config
from rr.deploy.profile import ClusterProfile, HeadGroup, WorkerGroup
from rr.errors import RRError

API_VERSION = "ray.io/v1"
CONFIG_DIR = "/etc/rr"
CONFIG_KEY = "config.yaml"
WORKDIR = "/app"
STAGES = ("reveal", "release", "evaluate")
NAME_LIMIT = 47  # KubeRay derives RayCluster and Job names from the RayJob's
UID = 1000


@dataclass(frozen=True)
class Mapped:
    """One RayJob field the chart, the k8s/ manifests and `rr submit` must agree on."""

    path: str  # dotted; [group] selects a worker group by groupName
    source: str


MAPPING = (
    Mapped("metadata.name", "name"),
    Mapped("spec.entrypoint", "stage"),
    Mapped("spec.submissionMode", "fixed"),
    Mapped("spec.shutdownAfterJobFinishes", "fixed"),
    Mapped("spec.ttlSecondsAfterFinished", "profile.ttl_seconds_after_finished"),
    Mapped("spec.backoffLimit", "profile.backoff_limit"),
    Mapped("spec.activeDeadlineSeconds", "profile.active_deadline_seconds"),
    Mapped("spec.runtimeEnvYAML", "profile.mlflow_tracking_uri"),
    Mapped("spec.entrypointNumGpus", "compute.executor, compute.device"),
    Mapped("spec.rayClusterSpec.enableInTreeAutoscaling", "fixed"),
    Mapped("spec.rayClusterSpec.autoscalerOptions.version", "fixed"),
    Mapped("spec.rayClusterSpec.workerGroupSpecs[generation].maxReplicas", "compute.max_generator_replicas"),
    Mapped("spec.rayClusterSpec.workerGroupSpecs[generation].minReplicas", "profile.generation.min_replicas"),
    Mapped("spec.rayClusterSpec.workerGroupSpecs[training].maxReplicas", "compute.max_trainer_workers"),
    Mapped("spec.rayClusterSpec.workerGroupSpecs[training].minReplicas", "profile.training.min_replicas"),
)


def kube_name(job_name: str) -> str:
    """A DNS-1123 label from the job's name (the Helm helper rr.jobName does the same)."""
    name = re.sub(r"[^a-z0-9-]+", "-", job_name.lower())[:NAME_LIMIT].strip("-")
    if not name or not name[0].isalpha():
        raise RRError(f"name {job_name!r}: a RayJob name must start with a letter; rename the job")
    return name


def entrypoint(stage: str) -> str:
    if stage not in STAGES:
        raise RRError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
    return f"python ray_jobs/{stage}.py --config {CONFIG_DIR}/{CONFIG_KEY}"


def cluster_output_dir(config: JobConfig, profile: ClusterProfile) -> str:
    """The job directory on the shared job volume."""
    output = PurePosixPath(str(config.output_dir))
    mount = PurePosixPath(profile.jobs_mount)
    if not output.is_absolute():
        return str(mount / output)
    if mount != output and mount not in output.parents:
        raise RRError(f"output_dir {output}: on a cluster the job directory must be on the shared job volume "
                      f"({mount}); use a relative path (placed under it) or a path below {mount}")
    return str(output)


def cluster_config_yaml(config: JobConfig, profile: ClusterProfile) -> str:
    """The config the pods read: the user's, with output_dir on the job volume."""
    placed = config.model_copy(update={"output_dir": cluster_output_dir(config, profile)})
    return dump_config(placed)


def _wants_gpu(config: JobConfig) -> bool:
    return config.compute.device != "cpu"


def _security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def _pod_security_context() -> dict:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _env(config: JobConfig, profile: ClusterProfile) -> list[dict]:
    env = [{"name": "RR_JOBS_DIR", "value": profile.jobs_mount}]
    if profile.model_cache_claim:
        env.append({"name": "HF_HOME", "value": profile.model_cache_mount})
    if profile.hf_token_secret:
        env.append({"name": config.model.hf_token_env, "valueFrom": {"secretKeyRef": {
            "name": profile.hf_token_secret, "key": profile.hf_token_key}}})
    return env


def _volumes(profile: ClusterProfile, config_map: str | None, shared_memory: str | None) -> tuple[list, list]:
    volumes = [{"name": "jobs", "persistentVolumeClaim": {"claimName": profile.jobs_claim}}]
    mounts = [{"name": "jobs", "mountPath": profile.jobs_mount}]
    if profile.model_cache_claim:
        volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": profile.model_cache_claim}})
        mounts.append({"name": "model-cache", "mountPath": profile.model_cache_mount})
    if config_map:
        volumes.append({"name": "job-config", "configMap": {"name": config_map}})
        mounts.append({"name": "job-config", "mountPath": CONFIG_DIR, "readOnly": True})
    if shared_memory:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shared_memory}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _pod(container: dict, profile: ClusterProfile, group: HeadGroup | WorkerGroup, component: str,
         volumes: list, head: bool) -> dict:
    spec = {"securityContext": _pod_security_context(), "containers": [container], "volumes": volumes}
    if not head:
        # The head keeps KubeRay's autoscaler ServiceAccount (it scales the workers); workers need no API token.
        spec["serviceAccountName"] = profile.service_account
        spec["automountServiceAccountToken"] = False
        spec["restartPolicy"] = "Never"  # autoscaler v2 replaces failed workers itself
    if group.node_selector:
        spec["nodeSelector"] = dict(group.node_selector)
    if group.tolerations:
        spec["tolerations"] = [dict(t) for t in group.tolerations]
    return {"metadata": {"labels": {"app.kubernetes.io/name": "rr", "app.kubernetes.io/component": component}},
            "spec": spec}


def _container(name: str, config: JobConfig, profile: ClusterProfile, cpu: str, memory: str, gpus: int,
               mounts: list) -> dict:
    limits = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {"name": name, "image": profile.image, "imagePullPolicy": profile.image_pull_policy,
            "workingDir": WORKDIR, "env": _env(config, profile), "volumeMounts": mounts,
            "resources": {"requests": dict(limits), "limits": limits},
            "securityContext": _security_context()}


def _worker_group(name: str, group: WorkerGroup, max_replicas: int, config: JobConfig, profile: ClusterProfile,
                  config_map: str | None) -> dict:
    gpus = group.gpus if _wants_gpu(config) else 0
    volumes, mounts = _volumes(profile, config_map, group.shared_memory)
    container = _container("ray-worker", config, profile, group.cpu, group.memory, gpus, mounts)
    min_replicas = min(group.min_replicas, max_replicas)
    return {"groupName": name, "replicas": min_replicas, "minReplicas": min_replicas, "maxReplicas": max_replicas,
            "rayStartParams": {}, "resources": {f"rr_{name}": "1"},
            "template": _pod(container, profile, group, f"ray-worker-{name}", volumes, head=False)}


def ray_cluster_spec(config: JobConfig, profile: ClusterProfile, config_map: str | None = None) -> dict:
    """An autoscaling RayCluster: a head that does no GPU work, a generation and a training GPU group."""
    volumes, mounts = _volumes(profile, config_map, None)
    head = _container("ray-head", config, profile, profile.head.cpu, profile.head.memory, 0, mounts)
    head["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                     {"containerPort": 10001, "name": "client"}]
    return {
        "rayVersion": profile.ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"version": "v2", "upscalingMode": "Default",
                              "idleTimeoutSeconds": profile.idle_timeout_seconds,
                              "securityContext": _security_context()},
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0"},
                          "template": _pod(head, profile, profile.head, "ray-head", volumes, head=True)},
        "workerGroupSpecs": [
            _worker_group("generation", profile.generation, config.compute.replica_bounds()[1], config, profile,
                          config_map),
            _worker_group("training", profile.training, _training_max(config, profile), config, profile, config_map),
        ],
    }


def _training_max(config: JobConfig, profile: ClusterProfile) -> int:
    if config.compute.executor == "ray":
        return config.compute.trainer_bounds()[1]
    return profile.training.max_replicas


def runtime_env_yaml(profile: ClusterProfile) -> str:
    env_vars = {"MLFLOW_TRACKING_URI": profile.mlflow_tracking_uri} if profile.mlflow_tracking_uri else {}
    return yaml.safe_dump({"env_vars": env_vars}, sort_keys=True)


def _labels(name: str, stage: str) -> dict:
    return {"app.kubernetes.io/name": "rr", "app.kubernetes.io/managed-by": "rr-submit", "rr.dev/job": name,
            "rr.dev/stage": stage}


def build_config_map(config: JobConfig, profile: ClusterProfile, namespace: str, stage: str = "release") -> dict:
    name = kube_name(config.name)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{name}-config", "namespace": namespace, "labels": _labels(name, stage)},
            "data": {CONFIG_KEY: cluster_config_yaml(config, profile)}}


def build_rayjob(config: JobConfig, profile: ClusterProfile, namespace: str, stage: str = "release") -> dict:
    """The RayJob for one stage of a job; see the module docstring for where each field comes from."""
    name = kube_name(config.name)
    spec = {
        "entrypoint": entrypoint(stage),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": profile.ttl_seconds_after_finished,
        "backoffLimit": profile.backoff_limit,
        "activeDeadlineSeconds": profile.active_deadline_seconds,
        "runtimeEnvYAML": runtime_env_yaml(profile),
        "submitterPodTemplate": _submitter_pod(profile),
        "rayClusterSpec": ray_cluster_spec(config, profile, config_map=f"{name}-config"),
    }
    if config.compute.executor == "local" and _wants_gpu(config) and profile.training.gpus:
        spec["entrypointNumGpus"] = profile.training.gpus
    return {"apiVersion": API_VERSION, "kind": "RayJob",
            "metadata": {"name": name, "namespace": namespace, "labels": _labels(name, stage)}, "spec": spec}


def _submitter_pod(profile: ClusterProfile) -> dict:
    """The pod that runs `ray job submit`: KubeRay fills in its command; we make it non-root and tokenless."""
    container = {"name": "ray-job-submitter", "image": profile.image, "imagePullPolicy": profile.image_pull_policy,
                 "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                               "limits": {"cpu": "1", "memory": "1Gi"}},
                 "securityContext": _security_context()}
    return {"metadata": {"labels": {"app.kubernetes.io/name": "rr", "app.kubernetes.io/component": "submitter"}},
            "spec": {"serviceAccountName": profile.service_account, "automountServiceAccountToken": False,
                     "restartPolicy": "Never", "securityContext": _pod_security_context(),
                     "containers": [container]}}


def mapped_value(obj: dict, path: str):
    """The value at a MAPPING path (`a.b[group].c`), or None where absent."""
    node = obj
    for part in path.split("."):
        match = re.fullmatch(r"(\w+)\[([\w-]+)\]", part)
        key, group = (match.group(1), match.group(2)) if match else (part, None)
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
        if group is not None:
            node = next((g for g in node if g.get("groupName") == group), None)
    if isinstance(node, str) and path.endswith("runtimeEnvYAML"):
        return yaml.safe_load(node)
    return node


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (the job config, runtimeEnvYAML) as readable `|` blocks."""


def _represent_str(dumper, text: str):
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_LiteralDumper.add_representer(str, _represent_str)


def manifests_yaml(objects: list[dict]) -> str:
    """Objects as one multi-document YAML stream, as `kubectl apply -f -` takes it."""
    return yaml.dump_all(objects, Dumper=_LiteralDumper, sort_keys=False)
