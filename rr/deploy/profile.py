"""Where a job runs on a cluster: image, storage, secrets and GPU node pools (the cluster profile).

The job config says *what* to compute; the profile says *where*. The Helm chart and the k8s/ base each
write their profile into the ConfigMap `rr-profile` (key `profile.yaml`), so `rr submit` builds RayJobs
that use the volumes, secrets and node pools that were installed. The defaults here are the chart's
defaults for a release named `rr`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rr.errors import RRError

PROFILE_CONFIGMAP = "rr-profile"
PROFILE_KEY = "profile.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeadGroup(_Strict):
    """The Ray head: schedules and runs the driver, never GPU work (rayStartParams num-gpus 0)."""

    cpu: str = "4"
    memory: str = "16Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict] = Field(default_factory=list)


class WorkerGroup(_Strict):
    """One Ray worker group on a node pool; the autoscaler moves it between min and max replicas."""

    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(4, ge=1)
    gpus: int = Field(1, ge=0, description="nvidia.com/gpu per worker; 0 on CPU-only pools")
    cpu: str = "8"
    memory: str = "64Gi"
    shared_memory: str = Field("16Gi", description="/dev/shm for Ray's object store and NCCL")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict] = Field(default_factory=list)

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


def _gpu_pool(pool: str) -> dict:
    return {"node_selector": {"rr.dev/pool": pool},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}


class ClusterProfile(_Strict):
    """Everything about the cluster a RayJob needs that the job config does not say."""

    image: str = Field("rr:0.1.0-gpu", min_length=1, description="the image built from the Dockerfile")
    image_pull_policy: str = "IfNotPresent"
    ray_version: str = "2.60.0"
    service_account: str = Field("rr", description="for the submitter pod and workers; no API token is mounted")
    jobs_claim: str = Field("rr-jobs", description="ReadWriteMany PVC holding job directories")
    jobs_mount: str = "/rr/jobs"
    model_cache_claim: str | None = Field("rr-model-cache", description="PVC for HF_HOME; null: no cache")
    model_cache_mount: str = "/rr/models"
    hf_token_secret: str | None = Field(None, description="existing Secret with an HF token for gated models")
    hf_token_key: str = "token"
    mlflow_tracking_uri: str | None = "http://rr-mlflow:5000"
    head: HeadGroup = Field(default_factory=HeadGroup)
    generation: WorkerGroup = Field(default_factory=lambda: WorkerGroup(**_gpu_pool("generation")))
    training: WorkerGroup = Field(default_factory=lambda: WorkerGroup(max_replicas=2, **_gpu_pool("training")))
    idle_timeout_seconds: int = Field(60, ge=0, description="the autoscaler removes a worker idle this long")
    ttl_seconds_after_finished: int = Field(3600, ge=0)
    backoff_limit: int = Field(1, ge=0, description="resubmissions after a failure; the job dir makes them resume")
    active_deadline_seconds: int = Field(86400, ge=1)

    @model_validator(mode="after")
    def _absolute_mounts(self):
        for field in ("jobs_mount", "model_cache_mount"):
            if not getattr(self, field).startswith("/"):
                raise ValueError(f"{field} must be an absolute path")
        return self


def parse_profile(text: str, source: str) -> ClusterProfile:
    try:
        data = yaml.safe_load(text) or {}
        return ClusterProfile.model_validate(data)
    except yaml.YAMLError as exc:
        raise RRError(f"{source}: not valid YAML ({exc})") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise RRError(f"{source}: invalid cluster profile: {problems} (see rr/deploy/profile.py)") from None


def load_profile(path: str | Path) -> ClusterProfile:
    path = Path(path)
    if not path.is_file():
        raise RRError(f"--profile {path}: no such file; pass a cluster profile YAML (see k8s/base/profile.yaml)")
    return parse_profile(path.read_text(), str(path))
