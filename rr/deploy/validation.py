"""Validate RayCluster/RayJob objects against KubeRay's CRD schemas, as an API server with KubeRay would.

Unknown fields are errors here, as they are for `kubectl apply` (strict field validation): a typo in a
manifest must not be pruned away silently. Needs `jsonschema` (a dev extra).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _strict(schema):
    """Copy of an OpenAPI schema where objects with listed properties reject unlisted ones."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        strict["additionalProperties"] = False
    return strict


@lru_cache(maxsize=None)
def crd_schema(crd_dir: str, kind: str, version: str = "v1") -> dict:
    # The C loader where PyYAML has it: the CRD files are large (about 6 s each with the pure-Python one).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((Path(crd_dir) / CRD_FILES[kind]).read_text(), Loader=loader)
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return _strict(served["schema"]["openAPIV3Schema"])
    raise KeyError(f"{kind} {version} not in {crd_dir}")


def crd_errors(obj: dict, crd_dir: str | Path) -> list[str]:
    """Every schema violation of a ray.io object, each as 'path: message'; [] when valid."""
    import jsonschema

    api_version = obj.get("apiVersion", "")
    if not api_version.startswith("ray.io/"):
        return [f"apiVersion {api_version!r} is not ray.io"]
    schema = crd_schema(str(crd_dir), obj["kind"], api_version.split("/", 1)[1])
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
            for error in validator.iter_errors(obj)]


SECRET_PATTERNS = (
    r"hf_[A-Za-z0-9]{20,}",                      # a Hugging Face token
    r"[a-z0-9+.-]+://[^/\s:@]+:[^/\s@]+@",       # credentials inside a URI (postgresql://user:pass@host)
    r"(?i)password\s*[:=]",
    r"(?i)aws_secret_access_key\s*[:=]\s*\S",
    r"AKIA[0-9A-Z]{16}",                         # an AWS access key id
)


def secret_leaks(text: str) -> list[str]:
    """Secret-looking values in rendered manifests (they must hold Secret references only)."""
    import re

    return [match.group(0) for pattern in SECRET_PATTERNS for match in re.finditer(pattern, text)]


def pod_specs(obj):
    """Every pod spec inside an object (Deployments, RayJobs, RayClusters), for security checks."""
    if isinstance(obj, dict):
        if isinstance(obj.get("containers"), list):
            yield obj
        for value in obj.values():
            yield from pod_specs(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from pod_specs(item)


def find_one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    if len(found) != 1:
        raise LookupError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]
