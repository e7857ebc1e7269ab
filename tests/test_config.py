"""The job config: every shipped config loads; bad input fails at load naming the field and the fix."""

from pathlib import Path

import pytest

from rr.config import JobConfig, load_config
from rr.errors import RRError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["quickstart.yaml", "ci.yaml"])
def test_shipped_configs_load(name):
    config = load_config(ROOT / "configs" / name)
    assert config.task.name == "code"
    assert config.model.name_or_path == "embedded:smollm2"


def test_output_flag_overrides_config(tmp_path):
    config = load_config(ROOT / "configs" / "ci.yaml", tmp_path / "elsewhere")
    assert config.output_dir == tmp_path / "elsewhere"


def _write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_its_path(tmp_path):
    with pytest.raises(RRError) as error:
        load_config(_write(tmp_path, "reveal:\n  outer_loop: 3\n"))
    assert "reveal.outer_loop" in str(error.value)
    assert "unknown key" in str(error.value)


def test_wrong_type_names_its_path(tmp_path):
    with pytest.raises(RRError) as error:
        load_config(_write(tmp_path, "release:\n  lora:\n    rank: many\n"))
    assert "release.lora.rank" in str(error.value)


def test_out_of_range_and_unknown_task(tmp_path):
    with pytest.raises(RRError, match="release.forget_fraction"):
        load_config(_write(tmp_path, "release:\n  forget_fraction: 1.5\n"))
    with pytest.raises(RRError, match="task"):
        load_config(_write(tmp_path, "task:\n  name: poetry\n"))
    with pytest.raises(RRError, match="forget_weights"):
        load_config(_write(tmp_path, "release:\n  forget_weights: [-1.0]\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RRError, match="no such file"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(RRError, match="not valid YAML"):
        load_config(_write(tmp_path, "reveal: [unclosed\n"))
    with pytest.raises(RRError, match="mapping"):
        load_config(_write(tmp_path, "- a list\n"))


def test_task_blocks_are_typed_per_task(tmp_path):
    config = load_config(_write(tmp_path, "task:\n  name: ner\n"))
    assert config.task.name == "ner"
    with pytest.raises(RRError, match="task.ner"):
        load_config(_write(tmp_path, "task:\n  name: ner\n  n_arithmetic_test: 3\n"))


def test_defaults_are_the_embedded_quickstart():
    config = JobConfig()
    assert config.compute.executor == "local"
    assert config.release.forget_fraction == 0.9 and config.release.recover_fraction == 0.95


def test_a_job_directory_refuses_a_different_config(tmp_path):
    from rr.job import Job

    config = load_config(ROOT / "configs" / "ci.yaml", tmp_path / "job")
    Job(config)
    Job(config)  # the same config resumes
    Job(config.model_copy(update={"tracking": config.tracking.model_copy(update={"enabled": True})}))  # results same
    changed = config.model_copy(update={"seed": 7})
    with pytest.raises(RRError, match=r"changed: seed.*reveal/, release/"):
        Job(changed)


def test_a_changed_section_refuses_naming_only_the_stages_it_redoes(tmp_path):
    from rr.job import Job

    config = load_config(ROOT / "configs" / "ci.yaml", tmp_path / "job")
    Job(config)
    Job(config.model_copy(update={"name": "renamed", "log_forget_examples": True}))  # names and logs: resumes
    release = config.release.model_copy(update={"forget_fraction": 0.8})
    with pytest.raises(RRError, match=r"changed: release\)\..*delete release/ and config.yaml") as refused:
        Job(config.model_copy(update={"release": release, "tracking": config.tracking.model_copy(
            update={"enabled": not config.tracking.enabled})}))
    assert "reveal/" not in str(refused.value)  # the forget set stays: only Release depends on release.*
    on_gpu = config.compute.model_copy(update={"device": "cpu" if config.compute.device != "cpu" else "auto"})
    with pytest.raises(RRError, match=r"changed: compute.*delete reveal/, release/"):  # kernels change generation
        Job(config.model_copy(update={"compute": on_gpu}))


def test_a_job_saved_before_a_key_existed_resumes_with_its_default(tmp_path):
    import yaml

    from rr.job import Job

    config = load_config(ROOT / "configs" / "ci.yaml", tmp_path / "job")
    Job(config)
    saved_path = tmp_path / "job" / "config.yaml"
    older = yaml.safe_load(saved_path.read_text())
    del older["reveal"]["exemplar_views"]  # as rr wrote it before reveal.exemplar_views existed
    saved_path.write_text(yaml.safe_dump(older, sort_keys=False))
    with pytest.raises(RRError, match=r"changed: reveal"):  # ci.yaml asks for 2 views: a real change
        Job(config)
    default_views = config.model_copy(update={"reveal": config.reveal.model_copy(update={"exemplar_views": 1})})
    Job(default_views)  # the missing key had its default: resumes
    assert yaml.safe_load(saved_path.read_text())["reveal"]["exemplar_views"] == 1


def test_settings_without_machinery_are_refused_not_ignored(tmp_path):
    assert load_config(_write(tmp_path, "tracking:\n  enabled: true\n")).tracking.enabled  # built: see test_tracking
    assert load_config(_write(tmp_path, "compute:\n  executor: ray\n")).compute.executor == "ray"  # test_ray_*
    # Replicas without the executor that places them, or bounds the wrong way round, are refused with the fix.
    with pytest.raises(RRError, match="generator_replicas.*executor: ray"):
        load_config(_write(tmp_path, "compute:\n  generator_replicas: 2\n"))
    with pytest.raises(RRError, match="max_generator_replicas .* is below generator_replicas"):
        load_config(_write(tmp_path, "compute:\n  executor: ray\n  generator_replicas: 3\n  max_generator_replicas: 2\n"))
    with pytest.raises(RRError, match="replica_num_gpus: vLLM replicas on device: cuda need a GPU"):
        load_config(_write(tmp_path, "generation:\n  backend: vllm\ncompute:\n  executor: ray\n  device: cuda\n"))
    # A perplexity limit on a task that measures no perplexity would never be checked.
    with pytest.raises(RRError, match="release.max_perplexity_rise: the entity task reports no perplexity"):
        load_config(_write(tmp_path, "task:\n  name: entity\nrelease:\n  max_perplexity_rise: 0.1\n"))
    assert load_config(_write(tmp_path, "release:\n  max_perplexity_rise: 0.1\n")).release.max_perplexity_rise == 0.1
    # A general check floor with no validation general check to hold candidates to, on any task.
    for task in ("code", "entity"):
        with pytest.raises(RRError, match="min_general_check_ratio: the (code|entity) task.s validation split asks no general check"):
            load_config(_write(tmp_path, f"task:\n  name: {task}\nrelease:\n  min_general_check_ratio: 0.95\n"))
    both = "task:\n  name: code\n  n_general_check_validation: 40\nrelease:\n  min_general_check_ratio: 0.95\n"
    assert load_config(_write(tmp_path, both)).release.min_general_check_ratio == 0.95


def test_a_placement_change_resumes_but_a_numeric_one_does_not(tmp_path):
    from rr.job import Job

    config = load_config(ROOT / "configs" / "ci.yaml", tmp_path / "job")
    Job(config)
    on_ray = config.compute.model_copy(update={"executor": "ray", "generator_replicas": 2, "replica_num_cpus": 0.5})
    Job(config.model_copy(update={"compute": on_ray}))  # same seed, same results: resumes
    with pytest.raises(RRError, match=r"changed: compute.*delete release/"):
        Job(config.model_copy(update={"compute": on_ray.model_copy(update={"trainer_workers": 2})}))
