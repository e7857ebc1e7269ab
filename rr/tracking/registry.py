"""The model registry: a finished job's version (alias `candidate`), promotion to `champion` by gates, listings."""

from __future__ import annotations

import getpass
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from rr.errors import RegistryError, RRError

CANDIDATE, CHAMPION = "candidate", "champion"
# Tags every rr version carries; the gates read the three scores.
FORGET_SCORE, UTILITY_SCORE, BASE_UTILITY_SCORE = "rr.forget_score", "rr.utility_score", "rr.base_utility_score"
# A task with forms (rr/evaluation/forms.py): which forms counted, the pooled score over them and the worst
# counted form (the highest forget score of any counted form).
COUNTED_FORMS, POOLED_FORMS_SCORE = "rr.forms.counted", "rr.forms.pooled_forget_score"
WORST_FORM, WORST_FORM_SCORE = "rr.forms.worst_form", "rr.forms.worst_form_forget_score"

# `rr promote` and `rr models` are interactive: MLflow's defaults (7 retries with exponential backoff from 2 s, 120 s
# per request) wait minutes on a registry that is down. Here: one retry, 4 s per attempt (connect or read), no
# backoff, so a request to an unreachable registry gives up within 8 s. Variables the user set are kept.
REGISTRY_HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "4",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}


def bounded_http():
    """MLflow HTTP requests inside this block give up on an unreachable registry within seconds."""
    from rr.tracking.outbox import mlflow_http_defaults

    return mlflow_http_defaults(REGISTRY_HTTP_BOUNDS)


def _first_line(error: Exception, limit: int = 200) -> str:
    line = (getattr(error, "message", None) or str(error)).splitlines()[0] if str(error) else type(error).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _unreachable(client, error: Exception) -> RegistryError:
    return RegistryError(f"the registry at {client.tracking_uri} is unreachable ({_first_line(error)}); check "
                         "--tracking-uri (or MLFLOW_TRACKING_URI) and that the MLflow server is up")


def _is_connection_failure(error: Exception) -> bool:
    """An MLflow HTTP call that never got an answer (refused, timed out, DNS), rather than an answer saying no."""
    text = str(error)
    return any(marker in text for marker in ("Max retries exceeded", "ConnectionError", "ConnectTimeout",
                                             "ReadTimeout", "NewConnectionError", "Connection refused"))


@contextmanager
def registry_errors(client, what: str):
    """Errors of registry calls as RegistryError: unreachable, or the registry's own refusal (first line)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as error:
        if _is_connection_failure(error):
            raise _unreachable(client, error) from None
        raise RegistryError(f"{what}: the registry at {client.tracking_uri} answered {_first_line(error)}") from None
    except OSError as error:  # a sqlite file or a socket the client opened itself
        raise _unreachable(client, error) from None


def register_version(client, run_id: str, name: str, model_dir: str, tags: dict) -> str:
    """Upload the pyfunc model into the run and register it; a run registers at most one version (a resent
    record finds the version it made before)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Unlearned models made by rr (Reveal and Release)")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = existing[0].version
    else:
        client.log_artifacts(run_id, model_dir, "model")
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
        version = client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
                                              description=tags.get("rr.summary")).version
    client.set_registered_model_alias(name, CANDIDATE, version)
    return str(version)


@dataclass
class GateCheck:
    passed: bool
    lines: list[str]  # one per gate, with the numbers


# Tags `rr audit` writes on the version it audited (rr/audit/stage.py).
AUDIT_PASSED, AUDIT_FAILED_GATES = "audit.passed", "audit.failed_gates"


def _score(tags: dict, tag: str) -> float:
    if tag not in tags:
        raise RRError(f"this version has no {tag} tag: it was not registered by rr, so its scores are unknown; "
                      "promote it with --force --reason if you must")
    return float(tags[tag])


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def _forget_gate(tags: dict, limit: float) -> tuple[bool, str]:
    forget = _score(tags, FORGET_SCORE)
    ok = forget <= limit
    return ok, f"forget score {forget:.4f} {'≤' if ok else '>'} max_forget_score {limit:g}: {_verdict(ok)}"


def utility_ratio(utility: float, base: float) -> float:
    """A model's utility score as a multiple of the base model's (a base of 0: any utility is a gain)."""
    return utility / base if base else float("inf") if utility > 0 else 1.0


def _utility_gate(tags: dict, limit: float) -> tuple[bool, str]:
    utility, base = _score(tags, UTILITY_SCORE), _score(tags, BASE_UTILITY_SCORE)
    ratio = utility_ratio(utility, base)
    ok = ratio >= limit
    return ok, (f"utility {utility:.4f} = {ratio:.3f} × base {base:.4f} {'≥' if ok else '<'} min_utility_ratio "
                f"{limit:g}: {_verdict(ok)}")


def _form_gate(tags: dict, limit: float) -> tuple[bool | None, str]:
    """For a version whose task has forms (the rr.forms.* tags): every counted form at most the limit, and a
    failure when no form counted; for a task without forms it does not apply."""
    if COUNTED_FORMS not in tags:
        return None, "max_form_forget_score: this version's task has no forms: not applied"
    if not tags[COUNTED_FORMS]:
        return False, ("max_form_forget_score: no form counted (the base model passed too few items of every form), "
                       "so forgetting per form is not shown: FAIL")
    worst = _score(tags, WORST_FORM_SCORE)
    ok = worst <= limit
    return ok, (f"worst counted form {tags.get(WORST_FORM, '?')}: forget score {worst:.4f} {'≤' if ok else '>'} "
                f"max_form_forget_score {limit:g}: {_verdict(ok)}")


def _audit_gate(tags: dict, required: bool) -> tuple[bool | None, str]:
    if not required:
        return None, "require_audit: off"
    if AUDIT_PASSED not in tags:
        return False, "require_audit: this version has no audit (run `rr audit` on its job): FAIL"
    ok = tags[AUDIT_PASSED] == "true"
    detail = "" if ok else f" ({tags.get(AUDIT_FAILED_GATES, 'failed gates not recorded')})"
    return ok, f"require_audit: the audit {'passed' if ok else 'failed'}{detail}: {_verdict(ok)}"


@dataclass(frozen=True)
class Gate:
    """One promotion check: `name` is its tracking.gates key; `check(tags, setting)` → (passed, or None where
    it does not apply; the line shown). A setting of None (or False) leaves the gate out."""

    name: str
    check: Callable[[dict, Any], tuple[bool | None, str]]


GATES: tuple[Gate, ...] = (Gate("max_forget_score", _forget_gate), Gate("min_utility_ratio", _utility_gate),
                           Gate("max_form_forget_score", _form_gate), Gate("require_audit", _audit_gate))


def check_gates(tags: dict, settings: dict) -> GateCheck:
    """Pure: do a version's recorded tags pass the gates (`settings`: tracking.gates as a dict)?"""
    lines, passed = [], True
    for gate in GATES:
        setting = settings.get(gate.name)
        if setting is None or setting is False:
            continue
        ok, line = gate.check(tags, setting)
        passed &= ok is not False
        lines.append(line)
    return GateCheck(passed, lines)


def _version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as error:
        if _is_connection_failure(error):
            raise _unreachable(client, error) from None
        raise RegistryError(f"model {name!r} version {version}: not in the registry at {client.tracking_uri} "
                      f"({error.message.splitlines()[0]}); list versions with `rr models {name}`") from None


def promote(client, name: str, version: str, gates: dict, force: bool = False, reason: str | None = None) -> list[str]:
    """Move `champion` to the version if its scores pass the gates; refuse with the numbers otherwise.
    A forced promotion records who (the OS user) and why as tags on the version."""
    if force and not (reason and reason.strip()):
        raise RRError("--force needs --reason \"...\": a forced promotion records why it bypassed the gates")
    model_version = _version(client, name, version)
    check = check_gates(model_version.tags, gates)
    if not check.passed and not force:
        raise RRError(f"{name} version {version} is refused as {CHAMPION}:\n  " + "\n  ".join(check.lines)
                      + "\n(fix the model, change tracking.gates, or --force --reason \"...\")")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    stamp = {"rr.promoted_by": getpass.getuser(), "rr.promoted_at": now, "rr.promotion_gates": json.dumps(gates)}
    if not check.passed:
        stamp.update({"rr.promotion_forced": "true", "rr.promotion_reason": reason.strip(),
                      "rr.promotion_failed_gates": "; ".join(line for line in check.lines if "FAIL" in line)})
    with registry_errors(client, f"promoting {name} version {version}"):
        for key, value in stamp.items():
            client.set_model_version_tag(name, str(version), key, value)
        client.set_registered_model_alias(name, CHAMPION, str(version))
    return check.lines


def list_versions(client, name: str) -> list[dict]:
    """Every version of a registered model with its aliases and recorded scores, newest first."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as error:
        if _is_connection_failure(error):
            raise _unreachable(client, error) from None
        raise RegistryError(f"no registered model {name!r} at {client.tracking_uri}; a finished job with tracking.enabled "
                      "registers one (the name is tracking.registered_model_name, default the job's name)") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    with registry_errors(client, f"listing the versions of {name}"):
        versions = client.search_model_versions(f"name = '{name}'")
    for mv in versions:
        rows.append({"version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
                     "forget_score": mv.tags.get(FORGET_SCORE), "utility_score": mv.tags.get(UTILITY_SCORE),
                     "base_utility_score": mv.tags.get(BASE_UTILITY_SCORE), "run_id": mv.run_id,
                     "forced": mv.tags.get("rr.promotion_forced") == "true", "created": mv.creation_timestamp})
    return sorted(rows, key=lambda r: -int(r["version"]))
