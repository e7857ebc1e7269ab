"""The task registry: a task name → (its config class, its Task class). One entry per task file."""

from __future__ import annotations

from typing import Any

from rr.errors import RRError


def _code():
    from rr.tasks.code import CodeTask, CodeTaskConfig
    return CodeTaskConfig, CodeTask


def _toxicity():
    from rr.tasks.toxicity import ToxicityTask, ToxicityTaskConfig
    return ToxicityTaskConfig, ToxicityTask


def _ner():
    from rr.tasks.ner import NerTask, NerTaskConfig
    return NerTaskConfig, NerTask


def _entity():
    from rr.tasks.entity import EntityTask, EntityTaskConfig
    return EntityTaskConfig, EntityTask


TASKS = {"code": _code, "toxicity": _toxicity, "ner": _ner, "entity": _entity}


def build_task(config: Any, seed: int):
    """Instantiate the Task named by `config.name` (a task config block from the job config)."""
    if config.name not in TASKS:
        raise RRError(f"task.name: unknown task {config.name!r}; choose one of {sorted(TASKS)}")
    _, task_class = TASKS[config.name]()
    return task_class(config, seed=seed)
