"""The Ray executor against the in-process one on the real embedded model: same answers from 2 replicas (greedy,
sampled, composed), a replica killed mid-call loses and duplicates nothing, the release loop's weight search
(the real loop and code task, tracking on) runs as Tune trials on the shared pool, scores as in-process and stops
once decided, and a PEM trained on Ray Train equals the in-process one."""

import json
import os
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from rr.config import JobConfig  # noqa: E402
from rr.execution.local import LocalExecutor  # noqa: E402
from rr.release.ledger import Pem, WeightedPem  # noqa: E402
from rr.release.loop import ReleaseState  # noqa: E402
from rr.release.stage import job_release_loop  # noqa: E402
from rr.release.weights import WeightChoice  # noqa: E402
from rr.tasks.base import Example, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

PROMPTS = ["Write a Python function that adds two numbers.", "What is 17 + 25?", "Say hello to a friend.",
           "Reverse a list in Python.", "Name three colours.", "Write a function that checks for a palindrome.",
           "What is 9 times 7?", "Explain a for loop briefly."]


def ci_config(tmp_path, **compute) -> JobConfig:
    data = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    data["output_dir"] = str(tmp_path / "job")  # tracking as ci.yaml has it: on, a sqlite store in the job dir
    data["generation"] = {"batch_size": 3}  # several batches per call, so both replicas take some
    # Smaller validation split than ci.yaml's: each searched weight is scored on Ray and again in-process.
    data["task"].update(n_validation=2, n_arithmetic_validation=3, max_new_tokens=64)
    data["compute"] = {"threads": 1, **compute}
    return JobConfig.model_validate(data)


@pytest.fixture(scope="module")
def ray_job(tmp_path_factory):
    from rr.job import Job

    tmp_path = tmp_path_factory.mktemp("ray")
    os.environ["RAY_worker_niceness"] = "0"  # Ray nices workers by default; these are the test's compute
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rr-ray-", dir="/tmp"))
    # Replicas use the in-process run's thread count: CPU kernels may sum in another order with other counts,
    # which can flip a sampled token at a near-tie (seen with 1 vs 2 threads). One thread each: two replicas of two
    # threads on this 2-core machine oversubscribe it, and every call then ran several times slower.
    job = Job(ci_config(tmp_path, executor="ray", generator_replicas=2, replica_num_cpus=0.5, threads_per_replica=1,
                        trainer_num_cpus=1, request_resources=False))
    try:
        yield job
    finally:
        job.close()
        ray.shutdown()


@pytest.fixture(scope="module")
def local(ray_job):
    # The in-process executor on the same job: the driver's own model, composed by hooks, on the replicas' one thread.
    torch.set_num_threads(1)
    executor = LocalExecutor(ray_job)
    yield executor
    executor.close()


def random_pem(model, name: str, seed: int) -> Pem:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module_name, module in model.named_modules():
        if module_name.endswith(("q_proj", "v_proj")):
            a = torch.randn(4, module.in_features, generator=generator) * 0.05
            b = torch.randn(module.out_features, 4, generator=generator) * 0.05
            tensors[module_name] = (a, b)
    return Pem(name, "forget", 4, 8.0, ["q_proj", "v_proj"], tensors)


def test_two_replicas_answer_exactly_as_the_in_process_generator(ray_job, local):
    greedy = SamplingParams(max_new_tokens=12)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, n=2)
    seeds = list(range(100, 100 + len(PROMPTS)))
    assert ray_job.executor.generate(PROMPTS, greedy) == local.generate(PROMPTS, greedy)
    assert ray_job.executor.generate(PROMPTS, sampled, seeds) == local.generate(PROMPTS, sampled, seeds)
    # A composition reaches the replicas as adapters: the same answers as the hooks on the driver's model.
    pem = random_pem(ray_job.model, "random-forget", 0)
    for weight in (-2.0, 1.5):
        composition = [WeightedPem(pem, weight)]
        assert ray_job.executor.generate(PROMPTS, greedy, composition=composition) == \
            local.generate(PROMPTS, greedy, composition=composition)
    texts = [p * 3 for p in PROMPTS[:3]]
    composition = [WeightedPem(pem, -2.0)]
    ray_ppl = ray.get(ray_job.executor.pool.perplexity.remote(texts, ((pem.name, -2.0),)))
    assert ray_ppl == pytest.approx(local._handle(composition).perplexity(texts), rel=1e-5)
    # the model handle's token statistics (answer probability, the audit's attacks) are the same on the pool
    answers = [p[::-1] for p in PROMPTS]
    on_ray = ray_job.executor.model(composition).token_stats(PROMPTS, answers)
    here = local.model(composition).token_stats(PROMPTS, answers)
    assert [s.text for s in on_ray] == answers
    for a, b in zip(on_ray, here):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4) and a.variances == pytest.approx(b.variances, abs=1e-4)
    stats = ray.get(ray_job.executor.pool.stats.remote())
    assert stats["replicas"] == 2 and stats["batches"] >= 2 * 3


def test_a_call_made_before_is_answered_from_the_jobs_answer_cache_as_in_process(ray_job, local):
    """The pool answers a generate call made before (a scoring asked again, `rr eval` of a scored ledger, a
    single-negation candidate step 1 scored, a rerun after a kill), whoever asks it, the driver or a weight search
    trial, from JOB/cache/answers without reaching the replicas; another weight is a new call; an entry of the Ray
    executor never answers the in-process one (their keys hold the executor and its threads)."""
    executor = ray_job.executor
    greedy = SamplingParams(max_new_tokens=8)
    pem = random_pem(ray_job.model, "cached-forget", 3)

    def stats():
        return ray.get(executor.pool.stats.remote())

    first = executor.generate(PROMPTS[:3], greedy, composition=[WeightedPem(pem, -1.0)])
    before = stats()
    assert executor.generate(PROMPTS[:3], greedy, composition=[WeightedPem(pem, -1.0)]) == first
    after = stats()
    assert after["answer_cache_hits"] == before["answer_cache_hits"] + 1 and after["batches"] == before["batches"]
    executor.generate(PROMPTS[:3], greedy, composition=[WeightedPem(pem, -2.0)])
    assert stats()["answer_cache_hits"] == after["answer_cache_hits"] and stats()["batches"] > after["batches"]
    assert stat.S_IMODE((ray_job.dir / "cache" / "answers").stat().st_mode) == 0o700  # it holds forget data
    local_hits = local.answers.hits
    assert local.generate(PROMPTS[:3], greedy, composition=[WeightedPem(pem, -1.0)]) == first
    assert local.answers.hits == local_hits


def test_a_killed_replica_is_restarted_and_every_request_answered_once(ray_job, local):
    params = SamplingParams(max_new_tokens=24, temperature=0.7, n=2)
    prompts = PROMPTS * 2
    seeds = list(range(len(prompts)))
    pool = ray_job.executor._ensure_pool()
    expected = ray.get(pool.generate.remote(prompts, params, seeds, ()))  # the same call, no replica killed
    shutil.rmtree(ray_job.dir / "cache" / "answers")  # else the pool answers the call again from the job's cache
    before = ray.get(pool.info.remote())
    pending = pool.generate.remote(prompts, params, seeds, ())
    time.sleep(3)  # the first batches are decoding on both replicas
    os.kill(before[0]["pid"], signal.SIGKILL)
    answers = ray.get(pending, timeout=900)
    assert answers == expected  # every request answered once, none lost, the same text as without the kill
    after = ray.get(pool.info.remote())
    assert after[0]["pid"] != before[0]["pid"], "the killed replica was not restarted"
    assert after[1]["pid"] == before[1]["pid"]


def test_release_loop_weight_search_runs_as_tune_trials_scores_as_in_process_and_stops_once_decided(ray_job, local,
                                                                                                  caplog):
    pem = random_pem(ray_job.model, "search-forget", 1)
    weights = [-0.5, -1.0, -2.0, -4.0, -8.0]
    # The loop as run_release builds it: its callbacks close over the job (tracker, models, Ray executor).
    loop = job_release_loop(ray_job, [], progress=lambda message: None, on_step=ray_job.tracker.release_step)
    loop.state = ReleaseState.load(loop.state_path)
    assert ray_job.config.compute.parallel_candidates is None  # the default: one trial per replica, two at a time
    # A stand-in rule that decides once two candidates are scored (the real rules are tested without Ray).
    def take_the_last(results):
        return WeightChoice(results[-1].weight, "test", True, "two scored", results)

    with caplog.at_level("INFO", logger="rr"):
        choice = loop.search(1, -1.0, pem, [abs(w) for w in weights], take_the_last,
                             lambda choice: len(choice.evaluated) >= 2)
    assert "search-forget: 5 candidates, 2 at a time" in caplog.text
    cached = loop.state.pending_candidates["1"]
    assert [c.weight for c in choice.evaluated] == [0.5, 1.0]
    assert 2 <= len(cached) < len(weights), "the experiment did not stop once decided"
    assert ReleaseState.load(loop.state_path).pending_candidates["1"] == cached, "results were not checkpointed"
    for weight in (-0.5, -1.0):  # each trial scored its own composition, as the in-process executor does
        evaluation = local.evaluate(ray_job.task, "validation", [WeightedPem(pem, weight)])
        assert cached[repr(weight)][:2] == [evaluation.forget_score, evaluation.utility_score]
        assert cached[repr(weight)][2] == pytest.approx(evaluation.metrics["perplexity"], rel=1e-5)  # as above
    trials = list((ray_job.dir / "ray" / "tune").glob("search-forget-*/*"))
    assert trials, "no Tune experiment was written under the job dir"


def test_a_pem_trained_on_ray_train_equals_the_in_process_one(ray_job, local, tmp_path):
    examples = [Example(f"What is {i} + {i}?", f"{i} + {i} = {2 * i}.") for i in range(6)]
    lora = ray_job.config.release.lora
    composition = [WeightedPem(random_pem(ray_job.model, "earlier", 2), -1.0)]
    # anchored (release.forget_anchor), so the anchor's examples and settings are shown to reach the workers too
    anchoring = {"anchor": [Example("Spell cat.", "c-a-t"), Example("Spell dog.", "d-o-g")], "anchor_weight": 0.5,
                 "anchor_scale": 2.0}
    on_ray = ray_job.executor.train_pem(composition, examples, lora, "step1-forget", "forget", tmp_path / "ray", 5,
                                        **anchoring)
    in_process = local.train_pem(composition, examples, lora, "step1-forget", "forget", tmp_path / "local", 5,
                                 **anchoring)
    log = json.loads((tmp_path / "ray" / "training.json").read_text())
    assert (log["anchor_examples"], log["anchor_weight"], log["anchor_scale"]) == (2, 0.5, 2.0)
    assert sorted(on_ray.tensors) == sorted(in_process.tensors)
    for module, (a, b) in in_process.tensors.items():
        torch.testing.assert_close(on_ray.tensors[module][0], a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(on_ray.tensors[module][1], b, rtol=1e-4, atol=1e-6)
    assert (tmp_path / "ray" / "adapter_model.safetensors").exists()
