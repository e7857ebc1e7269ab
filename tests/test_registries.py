"""Every registered task and release method is known to every consumer: the config schema, build_task, the
registry tags, `rr compare` (its family module and the settings that decide when it is re-run)."""

import importlib
from types import SimpleNamespace

import json

import pytest

from rr.compare import method_settings, same_inputs
from rr.config import CompareConfig, JobConfig
from rr.methods import METHODS
from rr.tasks.registry import TASKS
from rr.tracking.recorder import task_target


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_is_a_config_choice_with_a_task_class_and_a_target(name):
    spec = TASKS[name]
    config = JobConfig(task={"name": name}).task
    assert type(config) is spec.config_class
    task_class = spec.load_task()
    for member in ("contexts", "exemplars", "relevance", "retain_examples", "evaluate"):
        assert callable(getattr(task_class, member, None)), f"{task_class.__name__} lacks {member}"
    target = task_target(config)
    assert target and target != name  # a description, not the bare name


def test_an_unknown_task_names_every_registered_one(tmp_path):
    from rr.config import load_config
    from rr.errors import RRError

    path = tmp_path / "job.yaml"
    path.write_text("task:\n  name: poetry\n")
    with pytest.raises(RRError) as error:
        load_config(path)
    assert all(name in str(error.value) for name in TASKS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_has_its_family_module_and_settings_that_resolve(name):
    method = METHODS[name]
    module = importlib.import_module(f"rr.methods.{method.family}")
    assert callable(getattr(module, "run_method", None))
    job = SimpleNamespace(config=JobConfig())
    settings = method_settings(job, CompareConfig(), method)
    assert set(settings) == set(method.settings) and settings


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_whose_settings_change_is_re_run(name):
    """compare reuses a result only when method_settings is unchanged: changing any block or key a method
    names must change it (there is no fallback to another block)."""
    method = METHODS[name]
    before = method_settings(SimpleNamespace(config=JobConfig()), CompareConfig(), method)
    for path in method.settings:
        job, compare = JobConfig(), CompareConfig()
        root, *keys = path.split(".")
        parent = {"compare": compare, "release": job.release}[root]
        if not keys:  # the whole `release` block: change one of its keys
            keys = ["forget_fraction"]
        for key in keys[:-1]:
            parent = getattr(parent, key)
        object.__setattr__(parent, keys[-1], changed(getattr(parent, keys[-1])))
        after = method_settings(SimpleNamespace(config=job), compare, method)
        assert after != before, f"{name}: changing {path} leaves its settings unchanged"


@pytest.mark.parametrize("name", ["reveal-release", "pem-negation", "ga+gd"])
def test_a_result_saved_before_a_key_was_added_is_reused_while_the_key_keeps_its_default(name):
    """An older rr's result.json lacks keys added since (release.min_general_check_ratio, say): read as their
    defaults they change nothing, so upgrading rr does not delete hours of compare results; set, they redo it."""
    method = METHODS[name]
    now = {"data": {"forget_sha256": "x"}, "settings": method_settings(SimpleNamespace(config=JobConfig()),
                                                                       CompareConfig(), method)}
    older = json.loads(json.dumps(now))
    for value in older["settings"].values():
        for key in ("min_general_check_ratio", "lora", "epochs"):  # a nested block missing reads as its defaults too
            if isinstance(value, dict):
                value.pop(key, None)
    assert older != now and same_inputs(older, now, method)
    if "release" in now["settings"]:
        raised = json.loads(json.dumps(now))
        raised["settings"]["release"]["min_general_check_ratio"] = 0.95
        assert not same_inputs(older, raised, method)
    assert not same_inputs({**older, "data": {"forget_sha256": "y"}}, now, method)
    assert not same_inputs(None, now, method)


def changed(value):
    """Another valid-looking value of the same kind."""
    if value is None:
        return 0.5
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value / 2
    if isinstance(value, list):
        return value + value[-1:]
    data = value.model_dump()  # a nested block: change its first field this function can change
    key = next(k for k, v in data.items() if v is None or isinstance(v, (bool, int, float, list)))
    return value.model_copy(update={key: changed(getattr(value, key))})


@pytest.mark.parametrize("section", sorted(JobConfig.model_fields))
def test_each_config_section_says_which_stages_its_change_redoes(section):
    # rr/job.py decides resume-or-refuse from these declarations alone: a section added without one would redo
    # every stage (safe, but a tracking-like section would then refuse to resume for nothing).
    from rr.config import REDOES, REDOES_PER_KEY, RESULT_STAGES

    declared = (JobConfig.model_fields[section].json_schema_extra or {}).get(REDOES)
    assert declared is not None, f"JobConfig.{section} declares no redoes(...)"
    assert declared == REDOES_PER_KEY or set(declared) <= set(RESULT_STAGES)
