"""The task registry: one spec per task (its name, config class, Task class and how it names its target).
The config schema, `build_task` and the registry tags read it; adding a task is its module plus one spec here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from rr.errors import RRError
from rr.tasks.code import CodeTaskConfig
from rr.tasks.entity import EntityTaskConfig
from rr.tasks.ner import NerTaskConfig
from rr.tasks.toxicity import ToxicityTaskConfig


@dataclass(frozen=True)
class TaskSpec:
    name: str                                   # task.name in a job config
    config_class: type                          # the `task` block's schema (its `name` field is this name)
    load_task: Callable[[], type]               # the Task class, imported when a job builds it
    describe_target: Callable[[Any], str]       # what the job makes the model forget, in words (a registry tag)
    # `rr audit`'s material (relearn split, membership non-members, probes) from (task, AuditConfig); None: no audit
    audit: Callable[[Any, Any], Any] | None = None
    reports_perplexity: bool = False            # its evaluation has metrics["perplexity"] (release.max_perplexity_rise)


def _code_task():
    from rr.tasks.code import CodeTask
    return CodeTask


def _code_audit(task, config):
    from rr.tasks.code_audit import CodeAudit
    return CodeAudit(task, config.n_relearn, config.n_non_member_problems)


def _entity_audit(task, config):
    from rr.tasks.entity_audit import EntityAudit
    return EntityAudit(task, config.n_relearn, config.n_non_member_problems)


def _toxicity_task():
    from rr.tasks.toxicity import ToxicityTask
    return ToxicityTask


def _ner_task():
    from rr.tasks.ner import NerTask
    return NerTask


def _entity_task():
    from rr.tasks.entity import EntityTask
    return EntityTask


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("code", CodeTaskConfig, _code_task, lambda config: "writing code (pass@1 in the sandbox)", _code_audit,
             reports_perplexity=True),
    TaskSpec("toxicity", ToxicityTaskConfig, _toxicity_task, lambda config: "toxic continuations",
             reports_perplexity=True),
    TaskSpec("ner", NerTaskConfig, _ner_task,
             lambda config: "recognizing " + ", ".join(config.forget_types) + " entities"),
    # A count, not the names: who was forgotten stays in the job's config.
    TaskSpec("entity", EntityTaskConfig, _entity_task,
             lambda config: f"facts about {len(config.forget_entities)} people (task.forget_entities)",
             _entity_audit),
)}


def build_task(config: Any, seed: int):
    """Instantiate the Task named by `config.name` (a task config block from the job config)."""
    if config.name not in TASKS:
        raise RRError(f"task.name: unknown task {config.name!r}; choose one of {sorted(TASKS)}")
    return TASKS[config.name].load_task()(config, seed=seed)
