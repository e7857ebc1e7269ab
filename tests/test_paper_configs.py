"""configs/paper/: the paper's three tasks on its two models load, fit one GPU node pool and submit (dry run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rr.cli import app
from rr.config import dump_config, load_config
from rr.deploy.validation import crd_errors, find_one

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT.parent / "shared" / "kuberay-crds"
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
MODELS = {"meta-llama/Meta-Llama-3-8B-Instruct", "mistralai/Mistral-7B-Instruct-v0.2"}
POOL_GPUS = 8  # the node pool the configs' headers size for
# The merge weights papers/002 applied (Tables 7–9, Llama-3-8B): the weight grids must offer each of them.
PAPER_WEIGHTS = {"toxicity": ({3.0, 0.2}, {0.3}), "ner": ({5.0, 0.4, 0.3, 0.1}, {0.3, 1.0}),
                 "code": ({4.0, 0.4}, {1.0})}
PAPER_ITERATIONS = {"toxicity": 1, "ner": 3, "code": 1}


def test_every_task_on_both_paper_models():
    pairs = {(c.task.name, c.model.name_or_path) for c in map(load_config, PAPER)}
    assert pairs == {(task, model) for task in PAPER_WEIGHTS for model in MODELS}
    assert len(PAPER) == len(pairs)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_runs_vllm_on_ray_with_deepspeed_within_one_gpu_pool(path):
    config = load_config(path)
    compute, generation, lora = config.compute, config.generation, config.release.lora
    assert (generation.backend, compute.executor, compute.device) == ("vllm", "ray", "cuda")
    assert lora.deepspeed_stage in (2, 3) and compute.trainer_use_gpu
    replicas, trainers = compute.replica_bounds()[1], compute.trainer_bounds()[1]
    peak = replicas * compute.replica_num_gpus + (trainers if compute.gpu_sharing == "separate" else 0)
    assert 1 <= peak <= POOL_GPUS
    # The composed model is served as one rank-sum adapter: its longest ledger must fit vLLM's LoRA slots.
    pems = 1 + 2 * config.release.iterations
    assert pems * lora.rank <= generation.vllm_max_lora_rank
    # One wave of the weight search shares one batch: at most vllm_max_loras candidate adapters.
    assert compute.parallel_candidates <= generation.vllm_max_loras
    forget, retain = PAPER_WEIGHTS[config.task.name]
    assert forget <= set(config.release.forget_weights) and retain <= set(config.release.retain_weights)
    assert config.release.iterations == PAPER_ITERATIONS[config.task.name]
    assert (config.reveal.outer_loops, config.reveal.warm_start_top_k) == (3, 10)
    assert config.model.embedder == "sentence-transformers/all-roberta-large-v1"


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_submits_as_a_gpu_rayjob(path):
    result = CliRunner().invoke(app, ["submit", "--config", str(path), "--dry-run", "-n", "ml"])
    assert result.exit_code == 0, result.output
    config = load_config(path)
    objects = list(yaml.safe_load_all(result.stdout))
    rayjob = find_one(objects, "RayJob")
    assert rayjob["metadata"]["name"] == config.name
    groups = {g["groupName"]: g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups["generation"]["maxReplicas"] == config.compute.max_generator_replicas
    assert groups["training"]["maxReplicas"] == config.compute.max_trainer_workers
    for group in groups.values():
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    shipped = yaml.safe_load(dump_config(config))
    placed = yaml.safe_load(find_one(objects, "ConfigMap")["data"]["config.yaml"])
    assert placed["output_dir"] == f"/rr/jobs/runs/{config.name}"
    assert {**placed, "output_dir": None} == {**shipped, "output_dir": None}  # the pods run this config
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS}")
    assert crd_errors(rayjob, CRDS) == []
