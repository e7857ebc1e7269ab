"""Which MLflow store a job talks to, and how one outbox record becomes MLflow client calls."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from rr.errors import RRError

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def resolve_tracking_uri(configured: str | None, job_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment): the config's URI, else MLFLOW_TRACKING_URI, else
    the embedded default, a sqlite file in the job dir with artifacts beside it (no server needed)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    return f"sqlite:///{job_dir / 'mlflow.db'}", (job_dir / "mlartifacts").as_uri()


def store_dirname(uri: str) -> str:
    """The job dir's tracking/<this> folder: one outbox and one set of run ids per store."""
    return "store-" + hashlib.sha256(uri.encode()).hexdigest()[:12]


def ui_hint(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"MLflow UI: {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def metric_key(name: str) -> str:
    """MLflow keys allow letters, digits and _ - . / : and space; pass@1 becomes pass_at_1."""
    return _BAD_KEY_CHARS.sub("_", name.replace("@", "_at_"))


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: model.name_or_path, release.lora.rank, lists as JSON."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[metric_key(name)] = (json.dumps(value) if isinstance(value, (list, tuple)) else str(value))[:6000]
    return flat


def client_for(uri: str):
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise RRError(f"tracking.tracking_uri {uri}: directory {path.parent} does not exist")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class MlflowSender:
    """Sends outbox records to one store. A record names its run by a key ("job", "reveal", "step-3"); the
    store's run id for a key is created by the first start_run and kept in the outbox state."""

    def __init__(self, uri: str, artifact_location: str | None, experiment: str, state: dict, save_state):
        self.uri = uri
        self.artifact_location = artifact_location
        self.experiment = experiment
        self.state = state
        self.save_state = save_state
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    def run_id(self, key: str) -> str:
        if key not in self.state["runs"]:
            from mlflow.exceptions import MlflowException

            raise MlflowException(f"the {key!r} run was never created in this store (its start_run record was refused:"
                                  " see rejected.jsonl)", error_code="RESOURCE_DOES_NOT_EXIST")
        return self.state["runs"][key]

    def experiment_id(self) -> str:
        if not self.state.get("experiment_id"):
            found = self.client.get_experiment_by_name(self.experiment)
            self.state["experiment_id"] = (found.experiment_id if found else self.client.create_experiment(
                self.experiment, artifact_location=self.artifact_location))
            self.save_state()
        return self.state["experiment_id"]

    def __call__(self, record: dict) -> None:
        getattr(self, "_" + record["op"])(record)

    # ---- one method per record kind ------------------------------------------------------------
    def _start_run(self, record: dict) -> None:
        key = record["key"]
        if key in self.state["runs"]:
            self.client.update_run(self.run_id(key), status="RUNNING")
            return
        tags = dict(record.get("tags", {}))
        if record.get("parent"):
            tags["mlflow.parentRunId"] = self.run_id(record["parent"])
        run = self.client.create_run(self.experiment_id(), start_time=record["time"], tags=tags,
                                     run_name=record["name"])
        self.state["runs"][key] = run.info.run_id
        self.save_state()

    def _log(self, record: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run_id = self.run_id(record["key"])
        metrics = [Metric(k, float(v), int(t), int(s)) for k, v, s, t in record.get("metrics", [])]
        params = [Param(k, str(v)) for k, v in record.get("params", {}).items()]
        tags = [RunTag(k, str(v)) for k, v in record.get("tags", {}).items()]
        for start in range(0, max(len(metrics), len(params), len(tags), 1), 100):  # MLflow's batch limit on params
            self.client.log_batch(run_id, metrics=metrics[start:start + 100], params=params[start:start + 100],
                                  tags=tags[start:start + 100])

    def _artifact(self, record: dict) -> None:
        path = Path(record["path"])
        if path.is_dir():
            self.client.log_artifacts(self.run_id(record["key"]), str(path), record.get("artifact_path"))
        elif path.is_file():
            self.client.log_artifact(self.run_id(record["key"]), str(path), record.get("artifact_path"))
        else:
            from mlflow.exceptions import MlflowException

            raise MlflowException(f"{path} no longer exists in the job dir", error_code="RESOURCE_DOES_NOT_EXIST")

    def _end_run(self, record: dict) -> None:
        self.client.set_terminated(self.run_id(record["key"]), status=record["status"], end_time=record["time"])

    def _register(self, record: dict) -> None:
        from rr.tracking.registry import register_version

        version = register_version(self.client, self.run_id(record["key"]), record["name"], record["model_dir"],
                                   record["tags"])
        self.state["registered"] = {"name": record["name"], "version": version}
        self.save_state()

    def _tag_version(self, record: dict) -> None:
        """Tags on the version this job registered (the audit's verdict); nothing when it registered none. With
        `replace_prefix`, the version's tags under that prefix that `tags` no longer has are removed first, so a
        re-audit that no longer measures something leaves no stale number behind."""
        registered = self.state.get("registered")
        if not registered:
            return
        prefix = record.get("replace_prefix")
        if prefix:
            current = self.client.get_model_version(registered["name"], registered["version"]).tags
            for key in sorted(k for k in current if k.startswith(prefix) and k not in record["tags"]):
                self.client.delete_model_version_tag(registered["name"], registered["version"], key)
        for key, value in record["tags"].items():
            self.client.set_model_version_tag(registered["name"], registered["version"], key, str(value))
