"""What a job records in MLflow: one run per job (config as params, per-step metrics), nested runs per stage and
release step, the artifacts, and a registered model version at the end. Every call is a no-op when tracking is
off, and none can fail the job: records wait in the job dir's outbox until the store takes them."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import rr
from rr.errors import RRError
from rr.tracking.outbox import Outbox
from rr.tracking.registry import (BASE_UTILITY_SCORE, CANDIDATE, COUNTED_FORMS, FORGET_SCORE, POOLED_FORMS_SCORE,
                                 UTILITY_SCORE, WORST_FORM, WORST_FORM_SCORE)
from rr.tracking.store import MlflowSender, flatten, metric_key, resolve_tracking_uri, store_dirname, ui_hint


def _ms() -> int:
    return int(time.time() * 1000)


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the rr checkout this code runs from (None for an installed wheel)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(rr.__file__).parent, capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def default_model_name(job_name: str) -> str:
    return re.sub(r"[/@:\s]+", "-", job_name).strip("-") or "rr-model"


def task_target(task_config) -> str:
    """What the job makes the model forget, in words (a tag of the registered version)."""
    from rr.tasks.registry import TASKS

    return TASKS[task_config.name].describe_target(task_config)


def _never_fails(method):
    """Tracking must not fail a job: an unexpected error is reported and the job goes on."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - reported, never raised into the job
            self.say(f"tracking: could not record {method.__name__} ({type(error).__name__}: {error}); "
                     "the job goes on")
            return None
    return wrapper


def form_tags(report: dict | None) -> dict:
    """The registered version's per-form tags (rr/evaluation/forms.py): the counted forms (always, for a
    task with forms), and the unlearned model's pooled score and worst form over them; none without forms."""
    if not report:
        return {}
    tags = {COUNTED_FORMS: ",".join(report["counted_forms"])}
    if "rr" in report["pooled"]:
        pooled, worst = report["pooled"]["rr"], report["worst"]["rr"]
        tags.update({POOLED_FORMS_SCORE: pooled["rate"], WORST_FORM: worst["form"], WORST_FORM_SCORE: worst["rate"],
                     "rr.forms.least_dropped_form": report["least_dropped"]["rr"]["form"]})
    return tags


def audit_metrics(audit: dict) -> dict[str, float]:
    """The audit's numbers as flat metric names (model/part/figure)."""
    out: dict[str, float] = {}
    for model, result in audit["models"].items():
        for step, score in result.get("relearn", {}).get("scores", {}).items():
            out[f"{model}/relearn/forget_score_step{step}"] = score
        for step, value in result.get("relearn", {}).get("recovery", {}).items():
            if value is not None:
                out[f"{model}/relearn/recovery_step{step}"] = value
        for attack, value in result.get("membership", {}).get("auc", {}).items():
            out[f"{model}/membership/{attack}_auc"] = value
        for family, value in result.get("probes", {}).get("rates", {}).items():
            out[f"{model}/probes/{family}"] = value
    return out


class Recorder:
    """The job's MLflow run. Stages call reveal_finished, release_step and release_finished; the CLI calls close."""

    def __init__(self, job, say=None):
        self.job = job
        self.config = job.config.tracking
        self.enabled = self.config.enabled
        self.say = say or (lambda message: print(message, file=sys.stderr))
        self._open: list[str] = []  # runs this process started and has not ended
        if not self.enabled:
            return
        self.uri, artifact_location = resolve_tracking_uri(self.config.tracking_uri, job.dir)
        if self.uri.startswith("sqlite:///") and not Path(self.uri[len("sqlite:///"):]).parent.is_dir():
            raise RRError(f"tracking.tracking_uri {self.uri}: its directory does not exist; create it or use another")
        self.model_name = self.config.registered_model_name or default_model_name(job.config.name)
        self.outbox = Outbox(job.dir / "tracking" / store_dirname(self.uri), send=None,
                             say=lambda message: self.say(message), what=self.uri)
        self.outbox.send = MlflowSender(self.uri, artifact_location, self.config.experiment, self.outbox.state,
                                        self.outbox.save_state)
        self._registered_before = self.outbox.state.get("registered")
        if not self.config.log_forget_data:
            self._redact_queued_reveal()

    def _redact_queued_reveal(self) -> None:
        """An outbox queued by an older rr (its server unreachable then) can hold reveal/'s files in full: the
        instructions and the forget set. Unless tracking.log_forget_data, each such record is replaced by the
        redacted copies (reveal/redacted/) before anything is sent; the forget set itself is dropped. If the
        redacted copies cannot be made, the records are dropped all the same (nothing leaves in full)."""
        reveal_dir = (self.job.dir / "reveal").resolve()
        records = self.outbox.pending()

        def in_full(record: dict) -> bool:
            return record.get("op") == "artifact" and Path(record.get("path", "")).resolve().parent == reveal_dir

        in_full_count = sum(in_full(r) for r in records)
        if not in_full_count:
            return
        redacted_paths, problem = [], None
        try:
            from rr.reveal.stage import write_redacted

            manifest = self.job.read_json("reveal/manifest.json")
            if manifest is None:
                problem = "reveal/manifest.json is missing"
            else:
                redacted_paths = write_redacted(self.job.dir, manifest)
        except Exception as error:  # noqa: BLE001 - tracking never fails the job; the full text is dropped anyway
            problem = f"{type(error).__name__}: {error}"
        kept, replaced = [], False
        for record in records:
            if not in_full(record):
                kept.append(record)
            elif not replaced:  # the first one's place in the queue: after its run started, before it ended
                kept += [{**record, "path": str(path)} for path in redacted_paths]
                replaced = True
        self.outbox.replace_pending(kept)
        outcome = "dropped, with no redacted copy to send instead (" + problem + ")" if problem else \
            "replaced by reveal/redacted/"
        self.say(f"tracking: {in_full_count} queued reveal/ upload(s) from an older rr held instructions or the "
                 f"forget set in full; {outcome} (tracking.log_forget_data is off)")

    # ---- records -------------------------------------------------------------------------
    def _put(self, op: str, key: str, **fields) -> None:
        self.outbox.put({"op": op, "key": key, **fields})

    def _start(self, key: str, name: str, parent: str | None = None, tags: dict | None = None) -> None:
        if key not in self._open:
            self._put("start_run", key, name=name, parent=parent, tags=tags or {}, time=_ms())
            self._open.append(key)

    def _end(self, key: str, status: str = "FINISHED") -> None:
        self._put("end_run", key, status=status, time=_ms())
        if key in self._open:
            self._open.remove(key)

    def _log(self, key: str, metrics: dict | None = None, step: int = 0, **fields) -> None:
        now = _ms()
        rows = [[metric_key(k), float(v), step, now] for k, v in (metrics or {}).items()
                if isinstance(v, (int, float))]
        self._put("log", key, metrics=rows, **fields)

    def _artifact(self, key: str, path: Path, artifact_path: str | None = None) -> None:
        if path.exists():
            self._put("artifact", key, path=str(path), artifact_path=artifact_path)

    def _job_run(self) -> None:
        cfg = self.job.config
        self._start("job", cfg.name, tags={"rr.version": rr.__version__, "rr.git_commit": git_commit() or "unknown",
                                          "rr.task": cfg.task.name, "rr.target": task_target(cfg.task),
                                          "rr.base_model": cfg.model.name_or_path, "rr.job_dir": str(self.job.dir)})
        if not self.outbox.queued("params"):
            self._log("job", params=flatten(cfg.model_dump(mode="json")))
            self.outbox.mark_queued("params")

    # ---- what the stages call --------------------------------------------------------------
    @_never_fails
    def reveal_finished(self, manifest: dict) -> None:
        """The reveal stage's run: counts, hash and scores of the forget set; the data itself only if opted in."""
        if not self.outbox.queued("reveal"):
            self._job_run()
            self._start("reveal", "reveal", parent="job")
            comparison = {f"comparison/{k}": v for k, v in manifest.get("comparison", {}).items()}
            self._log("reveal", {"forget_set_size": manifest["size"], "mean_relevance": manifest["mean_relevance"],
                                 "vendi_score": manifest["vendi_score"], "arms_scored": manifest["arms_scored"],
                                 **comparison},
                      params={"instructions_found": len(manifest["instructions"]),
                              "filtered_by_relevance": manifest["filtered_by_relevance"]})
            self._log("job", tags={"rr.forget_set_sha256": manifest["sha256"], "rr.forget_set_size": manifest["size"]})
            reveal_dir = self.job.dir / "reveal"
            if self.config.log_forget_data:
                for name in ("manifest.json", "report.md", "forget_set.jsonl"):
                    self._artifact("reveal", reveal_dir / name, "reveal")
            else:  # instructions are the unlearned model's words and can state forget data: hashes only
                from rr.reveal.stage import write_redacted

                for path in write_redacted(self.job.dir, manifest):
                    self._artifact("reveal", path, "reveal")
            self._end("reveal")
            self.outbox.mark_queued("reveal")
        self.outbox.flush()

    @_never_fails
    def release_step(self, record) -> None:
        """One step of Eq. 1: its scores as points of the job run's curves, and a nested run with its weight
        search and its PEM adapter."""
        record = asdict(record) if is_dataclass(record) else record
        step, marker = record["step"], f"step-{record['step']}"
        if not self.outbox.queued(marker):
            self._job_run()
            self._start("release", "release", parent="job")
            scores = {"merge_weight": record["merge_weight"]}
            for split in ("validation", "test"):
                evaluation = record[split]
                if evaluation is None:  # release.test_each_step off: the final model's test is in the summary
                    continue
                scores[f"{split}/forget_score"] = evaluation["forget_score"]
                scores[f"{split}/utility_score"] = evaluation["utility_score"]
                scores.update({f"{split}/{m}": v for m, v in evaluation.get("metrics", {}).items()})
            self._log("job", scores, step=step)
            self._start(marker, f"step {step} ({record['kind']})", parent="release")
            self._log(marker, scores, step=step,
                      params={k: record[k] for k in ("step", "kind", "pem", "merge_weight", "rule", "passed")},
                      tags={"rr.reason": record["reason"]})
            for i, candidate in enumerate(record.get("candidates", [])):  # one stopped early: its weight and a flag
                self._log(marker, {**{f"candidate/{k}": v for k, v in candidate.items()},
                                   "candidate/stopped_early": float("stopped_early" in candidate)}, step=i)
            if record["pem"]:
                self._artifact(marker, self.job.dir / "release" / "pems" / record["pem"], f"adapters/{record['pem']}")
            self._end(marker)
            self.outbox.mark_queued(marker)
        self.outbox.flush()

    @_never_fails
    def release_finished(self, summary: dict, steps: list[dict]) -> None:
        """Reports, ledger and composite adapter into the release run; the model version into the registry."""
        manifest = self.job.read_json("reveal/manifest.json")
        if manifest is not None:  # a reveal that ran before tracking was on
            self.reveal_finished(manifest)
        for record in steps:  # steps finished before tracking was on, or before a kill
            self.release_step(record)
        if not self.outbox.queued("release"):
            self._job_run()
            self._start("release", "release", parent="job")
            base, final = summary["base"], summary["final"]
            finals = {"base/forget_score": base["forget_score"], "base/utility_score": base["utility_score"],
                      "final/forget_score": final["forget_score"], "final/utility_score": final["utility_score"],
                      "steps_applied": summary["steps"]}
            if "baseline" in summary:
                finals["single_negation/forget_score"] = summary["baseline"]["test"]["forget_score"]
                finals["single_negation/utility_score"] = summary["baseline"]["test"]["utility_score"]
            self._log("job", finals)
            release_dir = self.job.dir / "release"
            for name in ("steps.csv", "steps.md", "steps.png", "summary.json", "summary.md", "ledger.json",
                         "baseline.json"):
                self._artifact("release", release_dir / name, "release")
            self._register(summary)
            self._end("release")
            self.outbox.mark_queued("release")
        self.outbox.flush()

    @_never_fails
    def compare_finished(self, summary: dict) -> None:
        """`rr compare`: a nested run per comparison, and in it one run per method with its test scores and
        wall time; the table and plot as artifacts. A rerun that changed nothing records nothing new."""
        import hashlib

        digest = hashlib.sha256(json.dumps(summary, sort_keys=True, default=str).encode()).hexdigest()[:12]
        marker = f"compare-{digest}"
        if not self.outbox.queued(marker):
            self._job_run()
            self._start(marker, "compare", parent="job", tags={"rr.forget_set_sha256": summary["data"]["forget_sha256"]})
            self._log(marker, params={"methods": ",".join(summary["methods"]),
                                      **{f"data/{k}": v for k, v in summary["data"].items()}})
            for row in summary["rows"]:
                key = f"{marker}/{row['method']}"
                test = row["test"]
                self._start(key, row["method"], parent=marker)
                self._log(key, {"test/forget_score": test["forget_score"], "test/utility_score": test["utility_score"],
                                **({} if row["wall_time_s"] is None else {"wall_time_s": row["wall_time_s"]}),
                                **{f"test/{m}": v for m, v in test.get("metrics", {}).items()}},
                          params={"method": row["method"]})
                self._end(key)
            compare_dir = self.job.dir / "compare"
            for name in ("table.md", "table.csv", "tradeoff.png", "summary.json"):
                self._artifact(marker, compare_dir / name, "compare")
            self._end(marker)
            self.outbox.mark_queued(marker)
        self.outbox.flush()

    @_never_fails
    def audit_finished(self, audit: dict, tags: dict) -> None:
        """`rr audit`: a nested run with its figures and report, and the verdict's tags on the job's registered
        version (which `tracking.gates.require_audit` reads). A rerun that changed nothing records nothing new."""
        import hashlib

        digest = hashlib.sha256(json.dumps(audit, sort_keys=True, default=str).encode()).hexdigest()[:12]
        marker = f"audit-{digest}"
        if not self.outbox.queued(marker):
            self._job_run()
            self._start(marker, "audit", parent="job", tags={k: str(v) for k, v in tags.items()})
            self._log(marker, audit_metrics(audit))
            for name in ("audit.json", "report.md", "report.html"):
                self._artifact(marker, self.job.dir / "audit" / name, "audit")
            self._end(marker)
            self._put("tag_version", "job", tags=tags, replace_prefix="audit.")
            self.outbox.mark_queued(marker)
        self.outbox.flush()

    def _register(self, summary: dict) -> None:
        from rr.release.ledger import Ledger, export_adapter
        from rr.tracking.pyfunc import save_pyfunc

        release_dir = self.job.dir / "release"
        ledger = Ledger.load(release_dir / "ledger.json") if (release_dir / "ledger.json").exists() else None
        if ledger is None or not ledger.entries:
            self.say("tracking: no release step was applied (the model is the base model): nothing to register")
            return
        cfg = self.job.config
        composite = export_adapter(ledger, self.job.dir / "tracking" / "composite_adapter", cfg.model.name_or_path,
                                   ledger_root=release_dir)
        self._artifact("release", composite, "composite_adapter")
        model_dir = save_pyfunc(cfg.model, composite, self.job.dir / "tracking" / "pyfunc_model",
                                max_new_tokens=getattr(cfg.task, "max_new_tokens", 128))
        manifest = self.job.read_json("reveal/manifest.json") or {}
        tags = {"rr.task": cfg.task.name, "rr.target": task_target(cfg.task), "rr.base_model": cfg.model.name_or_path,
                FORGET_SCORE: summary["final"]["forget_score"], UTILITY_SCORE: summary["final"]["utility_score"],
                "rr.base_forget_score": summary["base"]["forget_score"],
                BASE_UTILITY_SCORE: summary["base"]["utility_score"],
                "rr.forget_set_sha256": manifest.get("sha256", "unknown"), "rr.version": rr.__version__,
                "rr.git_commit": git_commit() or "unknown", "rr.job": cfg.name, "rr.job_dir": str(self.job.dir),
                "rr.ledger": ", ".join(f"{e.merge_weight:+g}·{e.kind}" for e in ledger.entries),
                **form_tags(summary.get("forms")),
                "rr.summary": f"{cfg.task.name}: forget {summary['base']['forget_score']:.3f} → "
                              f"{summary['final']['forget_score']:.3f}, utility {summary['base']['utility_score']:.3f}"
                              f" → {summary['final']['utility_score']:.3f} (test split)"}
        self._put("register", "job", name=self.model_name, model_dir=str(model_dir), tags=tags)

    @_never_fails
    def close(self, failed: bool = False) -> None:
        """End the runs this process opened, send what waits (retrying up to tracking.flush_timeout_s; one try
        when the job failed: its next run sends the rest), and say where to look."""
        for key in reversed(self._open[:]):
            self._end(key, "FAILED" if failed else "FINISHED")
        wait_s = 0.0 if failed else self.config.flush_timeout_s
        left = self.outbox.flush(wait_s=wait_s)
        if left:
            self.say(f"tracking: {left} records could not reach {self.uri} within {wait_s:g}s; "
                     f"nothing is lost: they are kept in {self.outbox.path} and sent the next time this job runs "
                     f"with the same config (e.g. `rr run --config ... --output {self.job.dir}`)")
        registered = self.outbox.state.get("registered")
        if registered and registered != self._registered_before:
            self.say(f"registered model {registered['name']} version {registered['version']} (alias {CANDIDATE}); "
                     f"promote it: rr promote {registered['name']} {registered['version']} --tracking-uri {self.uri}")
        if self.outbox.state["runs"]:
            self.say(f"tracking: {ui_hint(self.uri)}")

    @property
    def run_id(self) -> str | None:
        return self.outbox.state["runs"].get("job") if self.enabled else None
