"""`rr submit`, `rr status`, `rr logs`: a job config becomes a KubeRay RayJob, then is watched and read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from rr.errors import RRError

console = Console(stderr=True)

NamespaceOption = typer.Option(None, "--namespace", "-n", help="default: the kubeconfig context's namespace")
ContextOption = typer.Option(None, "--context", help="kubeconfig context (default: the current one)")


def _fail(exc: Exception) -> None:
    console.print(f"error: {exc}", style="red", soft_wrap=True, markup=False, highlight=False)
    raise typer.Exit(2)


# Kubernetes names: a namespace is a DNS-1123 label, a RayJob's name a DNS-1123 subdomain. Checked here, before
# any request, so a typo gets the rule rather than the API server's 422 (or a 404 that reads like a missing job).
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _shown(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def check_namespace(namespace: Optional[str]) -> Optional[str]:
    if namespace is not None and (len(namespace) > 63 or not _DNS_LABEL.fullmatch(namespace)):
        raise RRError(f"--namespace {_shown(namespace)}: not a Kubernetes namespace name (a DNS-1123 label: at most "
                      "63 lowercase letters, digits and '-', starting and ending with a letter or digit)")
    return namespace


def check_job_name(name: str) -> str:
    if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        raise RRError(f"NAME {_shown(name)}: not a RayJob name (a DNS-1123 subdomain: lowercase letters, digits, "
                      "'-' and '.'); `rr submit` prints the name it made from the job's")
    return name


def _cluster(namespace: Optional[str], context: Optional[str]):
    from rr.deploy.kube import Cluster, connect

    check_namespace(namespace)
    api_client, default_namespace = connect(context)
    return Cluster(api_client, namespace or default_namespace)


def submit(config: Path = typer.Option(..., "--config", "-c", help="job config (YAML)"),
           namespace: Optional[str] = NamespaceOption,
           stage: str = typer.Option("release", "--stage", help="ray_jobs/<stage>.py: reveal, release or evaluate"),
           profile: Optional[Path] = typer.Option(None, "--profile", help="cluster profile YAML (default: the "
                                                  "ConfigMap rr-profile the chart installed; with --dry-run, "
                                                  "rr's defaults)"),
           dry_run: bool = typer.Option(False, "--dry-run", help="print the ConfigMap and RayJob as YAML; create "
                                        "nothing"),
           context: Optional[str] = ContextOption):
    """Submit a job to a Kubernetes cluster as a KubeRay RayJob (GPU workers autoscale, stop when it ends)."""
    from rr.config import load_config
    from rr.deploy.profile import ClusterProfile, load_profile
    from rr.deploy.rayjob import build_config_map, build_rayjob, manifests_yaml

    try:
        check_namespace(namespace)
        job_config = load_config(config)
        if dry_run:
            cluster_profile = load_profile(profile) if profile else ClusterProfile()
            if profile is None:
                console.print("dry run: rr's default cluster profile (the chart's defaults for release `rr`); "
                              "pass --profile FILE for another", style="dim", markup=False)
            ns = namespace or "default"
            objects = [build_config_map(job_config, cluster_profile, ns, stage),
                       build_rayjob(job_config, cluster_profile, ns, stage)]
            print(manifests_yaml(objects), end="")
            return
        cluster = _cluster(namespace, context)
        cluster_profile = load_profile(profile) if profile else cluster.profile()
        rayjob = build_rayjob(job_config, cluster_profile, cluster.namespace, stage)
        cluster.submit(build_config_map(job_config, cluster_profile, cluster.namespace, stage), rayjob)
    except RRError as exc:
        _fail(exc)
    name, ns = rayjob["metadata"]["name"], cluster.namespace
    console.print(f"submitted RayJob {name} in namespace {ns}", markup=False)
    console.print(f"  watch:   rr status {name} -n {ns}   (or kubectl get rayjob {name} -n {ns} -w)", markup=False)
    console.print(f"  logs:    rr logs {name} -n {ns} --follow", markup=False)
    if cluster_profile.mlflow_tracking_uri:
        console.print(f"  MLflow:  {cluster_profile.mlflow_tracking_uri} (kubectl port-forward svc/rr-mlflow "
                      f"5000:5000 -n {ns})", markup=False)


def status(name: str = typer.Argument(..., help="the RayJob's name (the job config's name, DNS-safe)"),
           namespace: Optional[str] = NamespaceOption, context: Optional[str] = ContextOption):
    """A submitted job's state: KubeRay's deployment status, Ray's job status, its cluster and dashboard."""
    from rr.deploy.kube import summary

    try:
        check_job_name(name)
        rayjob = _cluster(namespace, context).get(name)
    except RRError as exc:
        _fail(exc)
    for key, value in summary(rayjob).items():
        if value not in ("", None):
            print(f"{key:16} {value}")


def logs(name: str = typer.Argument(..., help="the RayJob's name"),
         namespace: Optional[str] = NamespaceOption, context: Optional[str] = ContextOption,
         tail: Optional[int] = typer.Option(None, "--tail", help="only the last N lines"),
         follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends")):
    """The job's output: the submitter pod follows the Ray driver's log."""
    try:
        check_job_name(name)
        if tail is not None and tail < 0:
            raise RRError(f"--tail {tail}: give a number of lines ≥ 0")
        pod, text = _cluster(namespace, context).logs(name, tail, follow)
    except RRError as exc:
        _fail(exc)
    console.print(f"pod {pod}", style="dim", markup=False)
    if follow:
        for chunk in text.stream():
            print(chunk.decode(errors="replace"), end="", flush=True)
    else:
        print(text, end="" if text.endswith("\n") else "\n")


def register(app: typer.Typer) -> None:
    """Add submit, status and logs to the `rr` app."""
    app.command()(submit)
    app.command()(status)
    app.command()(logs)
