"""Talk to a cluster through the kubernetes client: create, read and follow RayJobs; every refusal an RRError.

The client is imported only here and only when a command needs a cluster, so `rr submit --dry-run` and the
rest of rr work without the `kubernetes` extra.
"""

from __future__ import annotations

import json
import os

from rr.deploy.profile import PROFILE_CONFIGMAP, PROFILE_KEY, ClusterProfile, parse_profile
from rr.errors import RRError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
INSTALL_KUBERAY = ("install the KubeRay operator: `helm install rr ./helm --set kuberay-operator.enabled=true` "
                   "(one operator per cluster) or ask the cluster's admins")


def _kubernetes():
    try:
        import kubernetes
    except ImportError:
        raise RRError("the kubernetes client is not installed: pip install 'rr[kubernetes]' "
                      "(or use --dry-run to print the RayJob)") from None
    return kubernetes


def connect(context: str | None = None):
    """(ApiClient, the context's namespace) from inside a pod, else from KUBECONFIG / ~/.kube/config."""
    kubernetes = _kubernetes()
    from kubernetes.config.config_exception import ConfigException

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and context is None:
            kubernetes.config.load_incluster_config()
            namespace_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
            namespace = open(namespace_file).read().strip() if os.path.exists(namespace_file) else "default"
            return kubernetes.client.ApiClient(), namespace
        # Read KUBECONFIG now: the client's own default is fixed when it is first imported.
        config_file = os.environ.get("KUBECONFIG") or None
        kubernetes.config.load_kube_config(config_file=config_file, context=context)
        contexts, active = kubernetes.config.list_kube_config_contexts(config_file=config_file)
        if context is not None:
            active = next((c for c in contexts if c.get("name") == context), active)
        namespace = (active or {}).get("context", {}).get("namespace") or "default"
        return kubernetes.client.ApiClient(), namespace
    except (ConfigException, OSError) as exc:
        where = os.environ.get("KUBECONFIG", "~/.kube/config")
        raise RRError(f"no Kubernetes cluster configured ({exc}): point KUBECONFIG at your cluster's config "
                      f"(looked in {where}) or run inside the cluster; `rr submit --dry-run` needs none") from None


def _status_details(exc) -> dict:
    try:
        return json.loads(exc.body or "")
    except (TypeError, ValueError):
        return {}


def explain(exc: Exception, action: str, namespace: str) -> RRError:
    """An RRError that says which refusal the API server gave and what to do about it."""
    from kubernetes.client.exceptions import ApiException

    if not isinstance(exc, ApiException):  # urllib3 connection errors, timeouts
        reason = getattr(exc, "reason", None) or exc
        return RRError(f"cannot reach the Kubernetes API server to {action} ({reason}): check the cluster is up "
                       "and your kubeconfig's current context (`kubectl cluster-info`)")
    status = _status_details(exc)
    details = status.get("details") or {}
    message = status.get("message") or exc.reason
    if exc.status == 401:
        return RRError(f"the API server refused your credentials to {action} ({message}): log in again "
                       "or refresh the kubeconfig's token")
    if exc.status == 403:
        return RRError(f"forbidden to {action} in namespace {namespace!r} ({message}): use --namespace for a "
                       "namespace where you may, or ask an admin to bind you the chart's rr-submitter Role there")
    if exc.status == 404:
        if details.get("kind") == "namespaces":
            return RRError(f"namespace {namespace!r} does not exist: create it (kubectl create namespace "
                           f"{namespace}) or pass --namespace")
        if not status:  # a bare "404 page not found": the API group itself is not served
            return RRError(f"the cluster does not know RayJobs ({GROUP}/{VERSION}) — the KubeRay CRDs are "
                           f"missing: {INSTALL_KUBERAY}")
        return RRError(f"not found while trying to {action} in namespace {namespace!r}: {message}")
    if exc.status == 409:
        return RRError(f"cannot {action}: {message}; delete the old one first (`kubectl delete rayjob "
                       f"{details.get('name', 'NAME')} -n {namespace}`) — the job directory keeps its progress")
    if exc.status == 422:
        return RRError(f"the API server rejected the object to {action}: {message}")
    return RRError(f"the API server answered {exc.status} {exc.reason} to {action}: {message}")


class Cluster:
    """RayJob operations in one namespace; every API refusal becomes an RRError through `explain`."""

    def __init__(self, api_client, namespace: str):
        kubernetes = _kubernetes()
        self.namespace = namespace
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)

    def _call(self, action: str, function, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return function(*args, **kwargs)
        except (ApiException, HTTPError, OSError) as exc:
            raise explain(exc, action, self.namespace) from None

    def require_rayjob_crd(self) -> None:
        """Fail before creating anything when KubeRay is absent or RayJobs are forbidden here."""
        self._call("list RayJobs", self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                   PLURAL, limit=1)

    def profile(self, name: str = PROFILE_CONFIGMAP) -> ClusterProfile:
        from kubernetes.client.exceptions import ApiException

        try:
            config_map = self.core.read_namespaced_config_map(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404 and (_status_details(exc).get("details") or {}).get("kind") == "configmaps":
                raise RRError(f"no ConfigMap {name} in namespace {self.namespace!r}: install rr there first "
                              f"(`helm install rr ./helm -n {self.namespace}` or `kubectl apply -k k8s/overlays/gpu`)"
                              ", or pass --profile FILE") from None
            raise explain(exc, f"read ConfigMap {name}", self.namespace) from None
        except Exception as exc:  # connection refused and friends
            raise explain(exc, f"read ConfigMap {name}", self.namespace) from None
        text = (config_map.data or {}).get(PROFILE_KEY)
        if text is None:
            raise RRError(f"ConfigMap {name} has no key {PROFILE_KEY}: reinstall the chart or pass --profile FILE")
        return parse_profile(text, f"ConfigMap {self.namespace}/{name}")

    def submit(self, config_map: dict, rayjob: dict) -> dict:
        """Create the config ConfigMap, then the RayJob, then make the RayJob own the ConfigMap (deleted with it)."""
        name = rayjob["metadata"]["name"]
        self.require_rayjob_crd()
        existing = self.get(name, missing_ok=True)
        if existing is not None:
            state = (existing.get("status") or {}).get("jobDeploymentStatus", "unknown")
            raise RRError(f"RayJob {name} already exists in {self.namespace!r} ({state}): `rr status {name}`; to run "
                          f"it again, `kubectl delete rayjob {name} -n {self.namespace}` and resubmit (it resumes "
                          "from the job directory)")
        cm_name = config_map["metadata"]["name"]
        self._call(f"create ConfigMap {cm_name}", self._create_or_replace_config_map, config_map)
        created = self._call(f"create RayJob {name}", self.custom.create_namespaced_custom_object, GROUP, VERSION,
                             self.namespace, PLURAL, rayjob)
        owner = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob", "name": name,
                 "uid": created["metadata"]["uid"], "blockOwnerDeletion": False}
        self._call(f"set the owner of ConfigMap {cm_name}", self.core.patch_namespaced_config_map, cm_name,
                   self.namespace, {"metadata": {"ownerReferences": [owner]}})
        return created

    def _create_or_replace_config_map(self, config_map: dict):
        from kubernetes.client.exceptions import ApiException

        try:
            return self.core.create_namespaced_config_map(self.namespace, config_map)
        except ApiException as exc:
            if exc.status != 409:
                raise
            return self.core.replace_namespaced_config_map(config_map["metadata"]["name"], self.namespace, config_map)

    def get(self, name: str, missing_ok: bool = False) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            details = _status_details(exc).get("details") or {}
            if exc.status == 404 and details.get("kind") == PLURAL:
                if missing_ok:
                    return None
                raise RRError(f"no RayJob {name} in namespace {self.namespace!r}: `kubectl get rayjobs -n "
                              f"{self.namespace}` lists them") from None
            raise explain(exc, f"read RayJob {name}", self.namespace) from None
        except Exception as exc:
            raise explain(exc, f"read RayJob {name}", self.namespace) from None

    def logs(self, name: str, tail_lines: int | None = None, follow: bool = False):
        """The submitter pod's log (`ray job submit` follows the driver's output); else the head pod's."""
        rayjob = self.get(name)
        selectors = [f"batch.kubernetes.io/job-name={name}", f"job-name={name}"]
        cluster = (rayjob.get("status") or {}).get("rayClusterName")
        if cluster:
            selectors.append(f"ray.io/cluster={cluster},ray.io/node-type=head")
        for selector in selectors:
            pods = self._call("list pods", self.core.list_namespaced_pod, self.namespace, label_selector=selector)
            if pods.items:
                pod = max(pods.items, key=lambda p: p.metadata.creation_timestamp or 0)
                kwargs = {"tail_lines": tail_lines} if tail_lines else {}
                if follow:
                    kwargs.update(follow=True, _preload_content=False)
                text = self._call(f"read the log of pod {pod.metadata.name}", self.core.read_namespaced_pod_log,
                                  pod.metadata.name, self.namespace, **kwargs)
                return pod.metadata.name, text
        raise RRError(f"RayJob {name} has no pods yet ({summary(rayjob)['deployment']}): wait for the cluster "
                      f"to start (`rr status {name}`)")


def summary(rayjob: dict) -> dict:
    """What `rr status` shows: KubeRay's deployment state, Ray's job state, and where to look."""
    status = rayjob.get("status") or {}
    return {"name": rayjob["metadata"]["name"],
            "deployment": status.get("jobDeploymentStatus", "Pending"),
            "job": status.get("jobStatus", "-"),
            "cluster": status.get("rayClusterName", "-"),
            "dashboard": status.get("dashboardURL", "-"),
            "started": status.get("startTime", "-"),
            "ended": status.get("endTime", "-"),
            "failed_attempts": status.get("failed", 0),
            "message": status.get("message", "")}
