"""The shipped configs/*.yaml: each loads, and what its header claims holds (what it extends, which job
directory its documented command runs on, the quickstart control flow ci.yaml takes)."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from rr.config import load_config
from rr.job import Job

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # configs/paper/ has its own test (test_paper_configs.py)


def raw(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def header_commands(path: Path) -> list[list[str]]:
    """Command lines a config's leading comment tells the user to run: an indented line (`#   rr …`,
    `#   python -m rr…`) or a quoted one with options (`rr … --config …`)."""
    commands = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        indented = re.fullmatch(r"#\s{3,}((?:rr|python -m rr)[ .].*)", line)
        quoted = re.findall(r"`((?:rr|python -m rr)[ .][^`]*--[^`]*)`", line)
        commands += [shlex.split(text) for text in ([indented.group(1)] if indented else []) + quoted]
    return commands


def option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_there_are_shipped_configs_and_each_documents_a_command():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "ci.yaml", "compare-code.yaml", "entity.yaml"}
    for path in CONFIGS:
        assert header_commands(path), f"{path.name}: its header names no command to run it with"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_commands_name_real_files(path):
    config = load_config(path)
    assert config.name and config.output_dir
    for command in header_commands(path):
        given = option(command, "--config")
        if given is not None:
            assert (ROOT / given).resolve() == path.resolve() or (ROOT / given).is_file(), f"{path.name}: {command}"
            load_config(ROOT / given)


def test_compare_code_is_the_quickstart_plus_its_compare_section_key_by_key():
    quickstart, compare_code = raw("quickstart.yaml"), raw("compare-code.yaml")
    assert "compare" in compare_code and "compare" not in quickstart
    assert {k: v for k, v in compare_code.items() if k != "compare"} == quickstart
    assert "configs/quickstart.yaml plus a compare block" in (ROOT / "configs" / "compare-code.yaml").read_text()


def test_the_compare_code_command_resumes_a_quickstart_job_directory(tmp_path):
    """Its header: `rr compare --config configs/compare-code.yaml --output runs/quickstart` on a quickstart job
    directory. The job directory's check is what used to refuse it (the quickstart had moved on)."""
    [command] = [c for c in header_commands(ROOT / "configs" / "compare-code.yaml") if c[:2] == ["rr", "compare"]]
    assert Path(option(command, "--output")) == load_config(ROOT / "configs" / "quickstart.yaml").output_dir
    job_dir = tmp_path / "quickstart"
    Job(load_config(ROOT / "configs" / "quickstart.yaml", job_dir))
    Job(load_config(ROOT / option(command, "--config"), job_dir))  # raises RRError if it would be refused
    Job(load_config(ROOT / "configs" / "quickstart.yaml", job_dir))  # and `rr run` of the quickstart still resumes


def test_ci_is_the_quickstarts_tiny_profile_and_takes_its_control_flow():
    """ci.yaml is what CI's end-to-end test runs for the quickstart: same model, task and stages, and the same
    decisions (grid widening, the early stop on met targets), on fewer items."""
    quickstart, ci = load_config(ROOT / "configs" / "quickstart.yaml"), load_config(ROOT / "configs" / "ci.yaml")
    assert ci.model == quickstart.model and ci.task.name == quickstart.task.name
    assert ci.release.on_no_candidate == quickstart.release.on_no_candidate == "widen"
    assert ci.release.stop_when_forget_below is not None and quickstart.release.stop_when_forget_below is not None
    assert ci.release.general_retain_prompts > 0 and ci.release.baseline_single_negation
    assert 0 < ci.release.general_retain_paragraphs <= quickstart.release.general_retain_paragraphs
    assert ci.reveal.finalists > 1 and ci.tracking.enabled == quickstart.tracking.enabled
    assert ci.task.n_test < quickstart.task.n_test and ci.reveal.n_arms < quickstart.reveal.n_arms


def test_entity_says_it_extends_nothing_and_runs_on_the_model_its_first_command_makes():
    path = ROOT / "configs" / "entity.yaml"
    assert "extends no other config" in path.read_text()
    learn = [c for c in header_commands(path) if c[:3] == ["python", "-m", "rr.tasks.entity"]]
    assert learn and learn[0][3] == "learn"
    assert option(learn[0], "--output") == load_config(path).model.name_or_path
