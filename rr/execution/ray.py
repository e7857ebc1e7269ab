"""The Ray executor: generator replicas (actors) behind a pool, the weight search as a Ray Tune experiment,
PEM training as Ray Train workers, replica and trainer counts sized from the work and asked of the autoscaler.

The only module of rr that imports ray (ARCHITECTURE.md invariant 1). Same seed, same results as the local
executor: the pool batches requests exactly as HFGenerator.generate does (the same longest-first order,
the same batch_size chunks, each chunk decoded as one batch on some replica, per-request seeds), so which
replica answers a chunk changes nothing.

    driver (RayExecutor) ──► GeneratorPool (async actor on the driver's node; the job's answer cache) ──► GeneratorReplica × n
      │  search_weights: Tuner, one trial per candidate weight; trials call the same pool
      └─ train_pem: TorchTrainer(num_workers) running rr.release.pem.train_pem on each worker
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import ray
import ray.util.client

from rr.errors import RRError
from rr.execution.base import Composition, concurrent_trials, sized
from rr.generation.answer_cache import AnswerCache, base_identity
from rr.generation.base import tidy_answer
from rr.release.ledger import Pem, WeightedPem, pem_digest
from rr.tasks.base import Evaluation, Example, SamplingParams, per_prompt

log = logging.getLogger("rr")

# A composition as the replicas see it: ((pem name, signed weight), ...); () is the base model.
CompositionKey = tuple
POOL_NAMESPACE = "rr"
QUIET_ENV = {"TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# Ray Train's controller polls its workers every 2 s by default, and a run's end is seen only at a poll. A
# TorchTrainer.fit() of a no-op worker function took 12.3 s at 2 s against 8.4 s at 0.5 s (medians of 4, a local Ray on
# 2 cores: bench/bench_ray_train_start.py). Each PEM and each audit relearning on Ray is one fit. A user's own value
# of the variable wins; Ray Train hands the driver's value to its controller.
TRAIN_HEALTH_CHECK_ENV = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def composition_key(composition: Composition) -> CompositionKey:
    return tuple((w.pem.name, float(w.merge_weight)) for w in composition)


# ---- one replica ---------------------------------------------------------------------------------------------


class GeneratorReplica:
    """A long-lived actor holding one model; compositions arrive as adapters (PEMs by object ref), never as a
    reload. transformers: forward hooks refolded per batch; vLLM: one LoRA adapter per composition."""

    def __init__(self, spec: dict):
        import torch

        torch.set_num_threads(spec["threads"])
        self.spec = spec
        self.pems: dict[str, Pem] = {}
        if spec["backend"] == "vllm":
            from rr.generation.vllm import VLLMGenerator

            # The model is resolved here, not on the driver: a replica on another node writes (once) its own
            # node's copy of a GGUF model's HF directory.
            self.generator = VLLMGenerator.for_model(
                spec["name_or_path"], spec["gguf_file"], spec["revision"], spec["hf_token_env"],
                gpu_memory_utilization=spec["vllm_gpu_memory_utilization"], max_lora_rank=spec["vllm_max_lora_rank"],
                max_loras=spec["vllm_max_loras"], seed=spec["seed"], dtype=spec["dtype"])
            self.adapter_root = Path(tempfile.mkdtemp(prefix="rr-adapters-"))
            self.adapters: dict[CompositionKey, object] = {}
            self.scorer = self.composed = None  # token statistics: the transformers model, loaded on first use
            return
        self.generator = self.scorer = None
        self._load_scorer()

    def _load_scorer(self) -> None:
        """The transformers model that composes by forward hooks: the generator of a transformers replica, and a
        vLLM replica's source of token statistics (vLLM gives only the top-k log-probs of a prompt token, not the
        whole distribution MinK++ standardises by), as the in-process executor reads them from the job's model."""
        import torch

        from rr.generation.hf import HFGenerator
        from rr.models import load_model_and_tokenizer
        from rr.release.ledger import ComposedModel

        spec = self.spec
        try:
            model, tokenizer = load_model_and_tokenizer(spec["name_or_path"], spec["gguf_file"], spec["dtype"],
                                                        spec["device"], spec["revision"], spec["hf_token_env"])
        except torch.OutOfMemoryError as exc:
            if self.generator is None:  # a transformers replica: its one model did not fit
                raise
            raise RRError("a vLLM replica loads the transformers model beside its engine for token statistics "
                          "(rr audit, answer probability) and it did not fit: lower "
                          "generation.vllm_gpu_memory_utilization to leave room for one more copy of the model, or "
                          "use generation.backend: hf for this stage") from exc
        self.scorer = HFGenerator(model, tokenizer, batch_size=spec["batch_size"])
        self.composed = ComposedModel(model)
        if self.generator is None:
            self.generator = self.scorer

    def _token_stats(self, key: CompositionKey, prompts: Sequence, answers: Sequence[str]) -> list:
        if self.scorer is None:
            self._load_scorer()
        self._compose(key)
        return self.scorer.token_stats(prompts, answers)

    def info(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def prompt_lengths(self, prompts: Sequence[str]) -> list[int]:
        """Prompt lengths in tokens as HFGenerator.generate measures them (its batches are longest first)."""
        g = self.generator
        return [len(g.tokenizer(g.chat_text(p), add_special_tokens=False).input_ids[-g.max_prompt_tokens:])
                for p in prompts]

    def run(self, groups: list[tuple], pem_refs: dict) -> list:
        """Each group (kind, composition, payload): ("generate", key, (prompts, request_seeds, params)) → one
        text per request, decoded as one batch; ("perplexity", key, texts) → a float; ("token_stats", key,
        (prompts, answers)) → TokenStats per answer."""
        for name, ref in pem_refs.items():
            if name not in self.pems:
                self.pems[name] = ray.get(ref[0])
        if self.spec["backend"] == "vllm":
            return self._run_vllm(groups)
        out = []
        for kind, key, payload in groups:
            self._compose(key)
            if kind == "generate":
                out.append(self._decode(*payload))
            elif kind == "token_stats":
                out.append(self._token_stats(key, *payload))
            else:
                out.append(self.generator.perplexity(payload))
        return out

    def _compose(self, key: CompositionKey) -> None:
        have = [(w.pem.name, w.merge_weight) for w in self.composed.entries]
        if [name for name, _ in have] == [name for name, _ in key]:
            for index, ((_, old), (_, new)) in enumerate(zip(have, key)):
                if old != new:
                    self.composed.set_weight(index, new)
            return
        self.composed.detach()
        for name, weight in key:
            self.composed.append(self.pems[name], weight)

    def _decode(self, prompts: Sequence[str], request_seeds: Sequence[int], params: Sequence[SamplingParams]) -> list[str]:
        """One left-padded batch, exactly as one chunk of HFGenerator.generate (params: one per prompt)."""
        import torch

        g = self.generator
        encoded = [g.tokenizer(g.chat_text(p), add_special_tokens=False).input_ids[-g.max_prompt_tokens:]
                   for p in prompts]
        width, pad = max(len(e) for e in encoded), g.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=g.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=g.device)
        return [g._text(ids, each.stop, prompt) for ids, prompt, each
                in zip(g.decode(input_ids, mask, list(params), list(request_seeds)), prompts, params)]

    def _run_vllm(self, groups: list[tuple]) -> list:
        """Several compositions in one vLLM batch: one LoRARequest (adapter copy) per composition, up to
        generation.vllm_max_loras of them resident (vLLM has no per-request LoRA scale)."""
        from vllm import SamplingParams as VllmSamplingParams

        g = self.generator
        texts, sampling, loras, spans, out = [], [], [], [], [None] * len(groups)
        for index, (kind, key, payload) in enumerate(groups):
            if kind == "perplexity":
                g._adapter = self._lora(key)
                out[index] = g.perplexity(payload)
                continue
            if kind == "token_stats":
                out[index] = self._token_stats(key, *payload)
                continue
            prompts, request_seeds, params = payload  # params: one per prompt
            start = len(texts)
            for prompt, seed, each in zip(prompts, request_seeds, params):
                texts.append(g._chat(prompt))
                sampling.append(VllmSamplingParams(n=1, temperature=each.temperature, top_p=each.top_p,
                                                   max_tokens=each.max_new_tokens, seed=seed % (2**31),
                                                   stop=list(each.stop) or None, include_stop_str_in_output=True))
                loras.append(self._lora(key))
            spans.append((index, start, len(texts), prompts))
        if texts:
            outputs = g.llm.generate(texts, sampling, lora_request=loras, use_tqdm=False)
            for index, start, end, prompts in spans:
                out[index] = [tidy_answer(o.outputs[0].text, prompt) for o, prompt in zip(outputs[start:end], prompts)]
        return out

    def _lora(self, key: CompositionKey):
        from vllm.lora.request import LoRARequest

        from rr.release.ledger import export_adapter

        if not key:
            return None
        if key not in self.adapters:
            entries = [WeightedPem(self.pems[name], weight) for name, weight in key]
            rank = sum(w.pem.rank for w in entries)
            if rank > self.spec["vllm_max_lora_rank"]:
                raise RRError(f"the composed adapter has rank {rank} > generation.vllm_max_lora_rank "
                              f"{self.spec['vllm_max_lora_rank']}: raise it, or serve the merged export")
            directory = export_adapter(entries, self.adapter_root / f"c{len(self.adapters)}",
                                       self.generator.model)
            self.adapters[key] = LoRARequest(directory.name, len(self.adapters) + 1, str(directory))
        return self.adapters[key]


# ---- the pool ------------------------------------------------------------------------------------------------


def compositions_per_call(spec: dict) -> int:
    """Compositions one replica serves in one call: vLLM batches up to vllm_max_loras adapters; HF one."""
    return spec["vllm_max_loras"] if spec["backend"] == "vllm" else 1


class GeneratorPool:
    """An async actor in front of the replicas: splits each call into HFGenerator's batches, hands them to
    whichever replica is free, retries a batch whose replica died on a fresh replica, and puts every answer in
    its request's slot (none lost, none twice). Tune trials and the driver share it by handle."""

    def __init__(self, spec: dict, replica_options: dict, count: int, max_retries: int, answers: dict | None = None):
        self.spec = spec
        self.replica_options = replica_options
        self.max_retries = max_retries
        self.pem_refs: dict[str, list] = {}
        self.pem_digests: dict[str, str] = {}
        # The job's answer cache (JOB/cache/answers; the pool runs on the driver's node): every generate call, the
        # driver's and the weight search trials', is answered from it when the same call was made before.
        self.answers = AnswerCache(answers["directory"], answers["max_bytes"]) if answers else None
        self.identity = answers["identity"] if answers else None
        self.replicas: list = []
        self.workers: list[asyncio.Task] = []
        self.queue: asyncio.Queue | None = None
        self.counts = {"batches": 0, "shared_runs": 0, "retried_batches": 0, "replaced_replicas": 0}
        self.target = count

    async def _start(self) -> None:
        if self.queue is None:
            self.queue = asyncio.Queue()
            await self.resize(self.target)

    async def resize(self, count: int) -> list[dict]:
        """Grow or shrink to `count` replicas (each loads the model once); returns their info."""
        if self.queue is None:
            self.target = count
            await self._start()
            return await self.info()
        while len(self.replicas) > count:
            self.workers.pop().cancel()
            ray.kill(self.replicas.pop(), no_restart=True)
        while len(self.replicas) < count:
            index = len(self.replicas)
            self.replicas.append(self._new_replica())
            self.workers.append(asyncio.get_running_loop().create_task(self._serve(index)))
        return await self.info()

    def _new_replica(self):
        return ray.remote(GeneratorReplica).options(**self.replica_options).remote(self.spec)

    async def info(self) -> list[dict]:
        return list(await asyncio.gather(*[replica.info.remote() for replica in self.replicas]))

    async def stats(self) -> dict:
        return dict(self.counts, replicas=len(self.replicas), queued=self.queue.qsize() if self.queue else 0,
                    answer_cache_hits=self.answers.hits if self.answers else 0)

    def register(self, pem_refs: dict, digests: dict) -> None:
        """PEMs by name → [ObjectRef] (a list, so Ray passes the ref on rather than resolving it), and their content
        hashes (rr.release.ledger.pem_digest), which key the answer cache."""
        self.pem_refs.update(pem_refs)
        self.pem_digests.update(digests)

    async def _serve(self, index: int) -> None:
        """One loop per replica: take work, run it, settle its futures; a dead replica is replaced."""
        max_groups = compositions_per_call(self.spec)
        while True:
            item = await self.queue.get()
            batch = [item]
            while len(batch) < max_groups and not self.queue.empty():  # vLLM: several adapters share a batch
                batch.append(self.queue.get_nowait())
            names = {name for group, _, _ in batch for name, _ in group[1]}
            try:
                results = await self.replicas[index].run.remote([group for group, _, _ in batch],
                                                                {n: self.pem_refs[n] for n in names})
            except asyncio.CancelledError:
                for work in batch:
                    self.queue.put_nowait(work)
                raise
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
                # Restarts (max_restarts) and task retries (max_task_retries) are spent: replace the replica
                # and put its unfinished work back in the queue.
                log.warning("generator replica %d died (%s); replacing it and retrying its work", index, error)
                self.counts["replaced_replicas"] += 1
                self.replicas[index] = self._new_replica()
                for group, future, attempts in batch:
                    if attempts >= self.max_retries:
                        future.set_exception(RRError(f"a generation batch failed on {attempts + 1} replicas: {error}"))
                    else:
                        self.counts["retried_batches"] += 1
                        self.queue.put_nowait((group, future, attempts + 1))
                continue
            except Exception as error:  # a bug or a bad input, not a lost replica: report it to the caller
                for _, future, _ in batch:
                    future.set_exception(error)
                continue
            self.counts["batches"] += len(batch)
            self.counts["shared_runs"] += len({group[1] for group, _, _ in batch}) > 1  # compositions sharing a call
            for (_, future, _), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    async def _submit(self, group: tuple):
        await self._start()
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((group, future, 0))
        return await future

    async def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None,
                       key: CompositionKey) -> list[list[str]]:
        """HFGenerator.generate, spread over the replicas batch by batch (or from the answer cache)."""
        if not prompts:
            return []
        if self.answers is None or self.answers.max_bytes <= 0:
            return await self._generate(prompts, params, seeds, key)
        composition = [(self.pem_digests[name], float(weight)) for name, weight in key]
        cache_key = self.answers.call_key({**self.identity, "composition": composition}, prompts, params, seeds)
        answers = self.answers.get(cache_key, len(prompts), per_prompt(params, len(prompts))[0].n)
        if answers is None:
            answers = await self._generate(prompts, params, seeds, key)
            self.answers.put(cache_key, answers)
        return answers

    async def _generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None,
                        key: CompositionKey) -> list[list[str]]:
        from rr.generation.base import request_seed

        await self._start()
        each = per_prompt(params, len(prompts))
        n = each[0].n
        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
        requests = [(i, j, prompts[i], request_seed(seeds[i], j)) for i in range(len(prompts)) for j in range(n)]
        lengths = await self.replicas[0].prompt_lengths.remote([r[2] for r in requests]) \
            if self.spec["backend"] == "hf" else [0] * len(requests)
        order = sorted(range(len(requests)), key=lambda k: -lengths[k])
        chunks = [order[start:start + self.spec["batch_size"]] for start in range(0, len(order), self.spec["batch_size"])]
        answers = await asyncio.gather(*[
            self._submit(("generate", key, ([requests[k][2] for k in chunk], [requests[k][3] for k in chunk],
                                            [each[requests[k][0]] for k in chunk])))
            for chunk in chunks])
        results: list[list[str | None]] = [[None] * n for _ in prompts]
        for chunk, texts in zip(chunks, answers):
            for k, text in zip(chunk, texts):
                i, j = requests[k][0], requests[k][1]
                if results[i][j] is not None:
                    raise RRError(f"request {i}/{j} answered twice: a bug in the pool")
                results[i][j] = text
        if any(text is None for row in results for text in row):
            raise RRError("a request got no answer: a bug in the pool")
        return results

    async def perplexity(self, texts: Sequence[str], key: CompositionKey) -> float:
        return await self._submit(("perplexity", key, list(texts)))

    async def token_stats(self, prompts: Sequence, answers: Sequence[str], key: CompositionKey) -> list:
        """HFGenerator.token_stats, spread over the replicas in batch_size chunks (each answer is scored alone,
        so the chunking changes nothing)."""
        size = self.spec["batch_size"]
        chunks = await asyncio.gather(*[self._submit(("token_stats", key, (list(prompts[i:i + size]),
                                                                          list(answers[i:i + size]))))
                                        for i in range(0, len(prompts), size)])
        return [stats for chunk in chunks for stats in chunk]


class PoolModel:
    """A ModelHandle (what a task's evaluate needs) for one composition, served by the pool; picklable, so a
    Tune trial can use it."""

    per_prompt_params = True  # the pool batches as HFGenerator does, params per prompt included

    def __init__(self, pool, key: CompositionKey):
        self.pool, self.key = pool, key

    def generate(self, prompts, params, seeds=None):
        return ray.get(self.pool.generate.remote(list(prompts), params, None if seeds is None else list(seeds), self.key))

    def perplexity(self, texts):
        return ray.get(self.pool.perplexity.remote(list(texts), self.key))

    def token_stats(self, prompts, answers):
        return ray.get(self.pool.token_stats.remote(list(prompts), list(answers), self.key))


# ---- Tune trial and Train worker (module level: Ray pickles them by reference) -------------------------------


def _score_candidate(config: dict, pool=None, task=None, split=None, base_key=(), pem_name=None,
                     stop_early=None) -> None:
    """One Tune trial: the task's evaluation of base + (pem, weight), generated by the shared pool (stopped early at
    the rule's limits when `stop_early` is given)."""
    from ray import tune

    model = PoolModel(pool, tuple(base_key) + ((pem_name, float(config["weight"])),))
    evaluation = task.evaluate(model, split, stop_early=stop_early)
    tune.report({"weight": float(config["weight"]), "forget_score": evaluation.forget_score,
                 "utility_score": evaluation.utility_score, "metrics": evaluation.metrics,
                 "stopped_early": evaluation.stopped_early})


def _train_worker(config: dict) -> None:
    """One Ray Train worker: load the model, compose, train the PEM (its batches split by rank when there
    are several workers; DeepSpeed all-reduces the gradients); rank 0 saves the adapter."""
    import torch
    from ray import train

    from rr.models import load_model_and_tokenizer
    from rr.release.ledger import ComposedModel
    from rr.release.pem import train_pem

    torch.set_num_threads(config["threads"])
    spec = config["spec"]
    model, tokenizer = load_model_and_tokenizer(spec["name_or_path"], spec["gguf_file"], spec["dtype"],
                                                config["device"], spec["revision"], spec["hf_token_env"])
    composed = ComposedModel(model)
    for pem, weight in config["composition"]:
        composed.append(pem, weight)
    rank = train.get_context().get_world_rank()
    out_dir = Path(config["out_dir"]) if rank == 0 else Path(tempfile.mkdtemp(prefix="rr-pem-rank"))
    train_pem(model, tokenizer, config["examples"], config["lora"], config["name"], config["kind"], out_dir,
              seed=config["seed"], checkpoints=config.get("checkpoints", ()), anchor=config.get("anchor", ()),
              anchor_weight=config.get("anchor_weight", 0.0), anchor_scale=config.get("anchor_scale", 1.0))
    train.report({"rank": rank, "saved": str(out_dir)})


class _CandidateStopper:
    """Tune's experiment stopper, driver side: hands each trial's result to the loop as it arrives and stops the
    experiment once the weight rule is decided (larger weights cannot change the choice)."""

    def __init__(self, on_result: Callable[[float, Evaluation], None], decided: Callable[[], bool]):
        self.on_result, self.decided, self.seen = on_result, decided, set()

    def __call__(self, trial_id: str, result: dict) -> bool:
        if "forget_score" in result and trial_id not in self.seen:
            self.seen.add(trial_id)
            self.on_result(result["weight"], Evaluation(result["forget_score"], result["utility_score"],
                                                        dict(result.get("metrics") or {}),
                                                        stopped_early=result.get("stopped_early")))
        return True  # one report per trial: it is done

    def stop_all(self) -> bool:
        return self.decided()


# The weight searches running in this driver, by id. Tune pickles its stopper (tuner.pkl, the experiment state),
# and the loop's callbacks close over the job (its tracker, models, executor): so the stopper Tune holds carries
# only the id, and the callbacks stay here, in the process whose Tune controller calls them.
_SEARCHES: dict[str, _CandidateStopper] = {}


def _search(search_id: str) -> _CandidateStopper:
    try:
        return _SEARCHES[search_id]
    except KeyError:
        raise RRError(f"weight search {search_id}: its Tune controller runs in another process than the driver "
                      "that started it; run the job with `ray job submit` or compute.ray_address 'auto' "
                      "(not a ray:// client address)") from None


def _as_tune_stopper(search_id: str):
    """A ray.tune Stopper that holds nothing but `search_id` (ray.tune is imported only when a search runs)."""
    from ray.tune import Stopper

    class CandidateStopper(Stopper):
        def __init__(self, search_id: str):
            self.search_id = search_id

        def __call__(self, trial_id, result):
            return _search(self.search_id)(trial_id, result)

        def stop_all(self):
            return _search(self.search_id).stop_all()

    return CandidateStopper(search_id)


# ---- the executor (driver side) ------------------------------------------------------------------------------


class RayExecutor:
    """Generation on the replica pool, candidates as Tune trials, PEMs on Ray Train workers."""

    name = "ray"

    def __init__(self, job):
        self.job = job
        self.compute = job.config.compute
        self._connect()
        self.pool = None
        self.replicas = 0
        self._resizing = None  # a resize of the pool not waited for yet (prepare)
        self.trainers = self.compute.trainer_workers
        self._registered: set[str] = set()
        self.spec = self._spec()

    # ---- cluster ----------------------------------------------------------------------------------------
    def _connect(self) -> None:
        if ray.is_initialized():
            return
        address = self.compute.ray_address or os.environ.get("RAY_ADDRESS")
        try:
            if address:
                ray.init(address=address, namespace=POOL_NAMESPACE, log_to_driver=False)
            else:  # no cluster named: a local Ray for this job, on this machine's cores
                # Ray nices its workers to 15 by default; here they are the job's compute, not background work.
                os.environ.setdefault("RAY_worker_niceness", "0")
                ray.init(namespace=POOL_NAMESPACE, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": QUIET_ENV})
        except (ConnectionError, RuntimeError) as error:
            raise RRError(f"compute.ray_address={address!r}: cannot join the Ray cluster ({error}); start one "
                          "with `ray start --head`, fix the address, or remove it for a local Ray") from error
        self._started_ray = not address

    def _spec(self) -> dict:
        c, m, g = self.job.config, self.job.config.model, self.job.config.generation
        spec = {"backend": g.backend, "name_or_path": m.name_or_path, "gguf_file": m.gguf_file, "dtype": m.dtype,
                "revision": m.revision, "hf_token_env": m.hf_token_env, "batch_size": g.batch_size, "seed": c.seed,
                "device": "cuda" if self.compute.replica_num_gpus > 0 else "cpu",
                "threads": self.compute.threads_per_replica or max(1, int(self.compute.replica_num_cpus)),
                "vllm_gpu_memory_utilization": g.vllm_gpu_memory_utilization, "vllm_max_lora_rank": g.vllm_max_lora_rank,
                "vllm_max_loras": g.vllm_max_loras}
        return spec

    def _replica_options(self) -> dict:
        return {"num_cpus": self.compute.replica_num_cpus, "num_gpus": self.compute.replica_num_gpus,
                "max_restarts": self.compute.max_replica_restarts, "max_task_retries": self.compute.max_replica_restarts,
                "runtime_env": {"env_vars": QUIET_ENV}}

    def replica_count(self, work: int) -> int:
        return sized(work, self.compute.requests_per_replica, self.compute.replica_bounds())

    def trainer_count(self, forget_examples: int) -> int:
        return sized(forget_examples, self.compute.examples_per_trainer, self.compute.trainer_bounds())

    def _request(self) -> None:
        """Ask the autoscaler for what the job needs now: the replicas, and the trainers on their own workers
        (gpu_sharing: separate) or in the replicas' place (release_during_training)."""
        if not self.compute.request_resources:
            return
        from ray.autoscaler.sdk import request_resources

        replica = {"CPU": self.compute.replica_num_cpus, **({"GPU": self.compute.replica_num_gpus}
                                                             if self.compute.replica_num_gpus else {})}
        trainer = {"CPU": self.compute.trainer_num_cpus, **({"GPU": 1} if self.compute.trainer_use_gpu else {})}
        bundles = [replica] * self.replicas
        if self.compute.gpu_sharing == "separate":
            bundles += [trainer] * self.trainers
        elif self.trainers > self.replicas:
            bundles += [trainer] * (self.trainers - self.replicas)
        request_resources(bundles=bundles)

    def prepare(self, stage: str, work: int) -> None:
        """Size the pool for the stage without waiting for it: the replicas load their model while the driver does
        what comes first (Reveal decodes its arms here); the first call on the pool waits for them."""
        if stage == "reveal":
            self._ensure_pool(self.replica_count(work), wait=False)
        elif stage == "release":
            self.trainers = self.trainer_count(work)
            self._ensure_pool(self.replicas or self._default_replicas(), wait=False)
        self._request()

    def _default_replicas(self) -> int:
        from rr.reveal.search import largest_generate_call

        return self.replica_count(largest_generate_call(self.job.config.reveal, len(self.job.task.contexts("reveal"))))

    def _ensure_pool(self, count: int | None = None, wait: bool = True):
        """The pool, with `count` replicas (default: as many as now, or as the job needs); with `wait`, once every
        replica has loaded its model (a resize left pending by an earlier call too)."""
        count = count or self.replicas or self._default_replicas()
        if self.pool is None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # On the driver's node, where the job directory (and so its answer cache) is.
            here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
            self.pool = ray.remote(GeneratorPool).options(num_cpus=0, max_concurrency=1000, scheduling_strategy=here).remote(
                self.spec, self._replica_options(), count, self.compute.max_replica_restarts + 1, self._answer_cache())
            self._registered = set()
        if count != self.replicas:
            log.info("generator replicas: %d", count)
            self._resizing = self.pool.resize.remote(count)
            self.replicas = count
            self._request()
        if wait and self._resizing is not None:
            resizing, self._resizing = self._resizing, None
            ray.get(resizing)  # a replica that cannot start raises here
        return self.pool

    def _key(self, composition: Composition) -> CompositionKey:
        pool = self._ensure_pool()
        new = {w.pem.name: w.pem for w in composition if w.pem.name not in self._registered}
        if new:
            ray.get(pool.register.remote({name: [ray.put(pem)] for name, pem in new.items()},
                                         {name: pem_digest(pem) for name, pem in new.items()}))
            self._registered |= set(new)
        return composition_key(composition)

    # ---- the Executor protocol ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None,
                 composition: Composition = ()) -> list[list[str]]:
        return self.model(composition).generate(prompts, params, seeds)

    def model(self, composition: Composition = ()) -> PoolModel:
        return PoolModel(self._ensure_pool(), self._key(composition))

    def _answer_cache(self) -> dict | None:
        """The pool's answer cache: the job's JOB/cache/answers, keyed by what decides a replica's answer besides the
        composition and the call: the base model (its weights' hash, from the driver's copy, which Reveal loads
        anyway) and the replicas' settings. Keys differ from the in-process executor's (executor, threads), so the
        two never answer for each other."""
        max_bytes = self.job.config.generation.answer_cache_mb * 2**20
        if max_bytes <= 0 or ray.util.client.ray.is_connected():  # through ray://, the job directory is not the cluster's
            return None
        identity = base_identity(self.job, self.spec["backend"] != "vllm", executor="ray",
                                 **{name: self.spec[name] for name in ("backend", "batch_size", "device", "threads")})
        return {"directory": str(self.job.dir / "cache" / "answers"), "max_bytes": max_bytes, "identity": identity}

    def evaluate(self, task, split: str, composition: Composition = ()) -> Evaluation:
        return task.evaluate(self.model(composition), split)

    def search_weights(self, task, split: str, composition: Composition, pem: Pem, signed_weights: Sequence[float],
                       on_result: Callable[[float, Evaluation], None], decided: Callable[[], bool],
                       stop_early=None) -> None:
        """A Tune experiment, one trial per candidate weight (smallest magnitude first), in parallel."""
        from ray import tune

        if ray.util.client.ray.is_connected():  # Tune would run its controller in an actor, away from the loop
            raise RRError(f"compute.ray_address={self.compute.ray_address!r}: the weight search cannot run through "
                          "a Ray client (ray://) connection; submit the job with `ray job submit`, or use 'auto' "
                          "on a cluster node")
        base_key = self._key(composition)
        self._key([*composition, WeightedPem(pem, 0.0)])  # the pool learns the new PEM once
        ordered = sorted(signed_weights, key=abs)
        at_once = concurrent_trials(self.compute.parallel_candidates, len(ordered), self.replicas,
                                    compositions_per_call(self.spec))
        log.info("weight search %s: %d candidates, %d at a time", pem.name, len(ordered), at_once)
        trainable = tune.with_parameters(_score_candidate, pool=self.pool, task=task, split=split,
                                         base_key=base_key, pem_name=pem.name, stop_early=stop_early)
        # Trials wait on the shared pool: they hold a little memory, not the replicas' CPUs or GPUs.
        resources = {"cpu": self.compute.candidate_num_cpus} if self.compute.candidate_num_cpus else \
            {"cpu": 0, "memory": 2**28}
        name = f"{pem.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        search_id = f"{name}-{uuid.uuid4().hex[:8]}"
        _SEARCHES[search_id] = _CandidateStopper(on_result, decided)
        try:
            tuner = tune.Tuner(
                tune.with_resources(trainable, resources),
                param_space={"weight": tune.grid_search(ordered)},
                tune_config=tune.TuneConfig(max_concurrent_trials=at_once),
                run_config=tune.RunConfig(name=name, verbose=0, storage_path=str(self.job.dir / "ray" / "tune"),
                                          stop=_as_tune_stopper(search_id)))
            results = tuner.fit()
        finally:
            _SEARCHES.pop(search_id, None)
        failed = [r.error for r in results if r.error is not None and not decided()]
        if failed:
            raise RRError(f"weight search {pem.name}: {len(failed)} trial(s) failed; the first: {failed[0]}")

    def train_pem(self, composition: Composition, examples: Sequence[Example], config, name: str, kind: str,
                  out_dir: Path, seed: int, checkpoints: Sequence[int] = (), anchor: Sequence[Example] = (),
                  anchor_weight: float = 0.0, anchor_scale: float = 1.0) -> Pem:
        """rr.release.pem.train_pem on Ray Train workers (TorchTrainer; gloo on CPU, NCCL on GPUs); with
        `checkpoints`, on one worker (train_pem saves checkpoints in one process only)."""
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        os.environ.setdefault(*TRAIN_HEALTH_CHECK_ENV)
        release = self.compute.gpu_sharing == "release_during_training" and self.pool is not None
        if release:  # vLLM holds most of the GPU: free it for training, re-create the replicas after
            replicas = self.replicas
            ray.get(self.pool.resize.remote(0))
            self.replicas = 0
        try:
            use_gpu = self.compute.trainer_use_gpu
            trainer = TorchTrainer(
                _train_worker,
                train_loop_config={"spec": self.spec, "composition": [(w.pem, w.merge_weight) for w in composition],
                                   "examples": list(examples), "lora": config, "name": name, "kind": kind,
                                   "out_dir": str(out_dir), "seed": seed, "device": "cuda" if use_gpu else "cpu",
                                   "checkpoints": list(checkpoints), "anchor": list(anchor),
                                   "anchor_weight": anchor_weight, "anchor_scale": anchor_scale,
                                   "threads": self.job.config.compute.threads or max(1, int(self.compute.trainer_num_cpus))},
                torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                scaling_config=ScalingConfig(num_workers=1 if checkpoints else self.trainers, use_gpu=use_gpu,
                                             resources_per_worker={"CPU": self.compute.trainer_num_cpus}),
                run_config=RunConfig(name=f"{name}-train", storage_path=str(self.job.dir / "ray" / "train")))
            trainer.fit()
        finally:
            if release:
                self._ensure_pool(replicas)
        return Pem.load(out_dir)

    def detach(self) -> None:
        """Nothing is composed on the job's own model here: the replicas hold the compositions."""

    def close(self) -> None:
        if self.pool is not None:
            try:
                ray.get(self.pool.resize.remote(0))
                ray.kill(self.pool)
            except ray.exceptions.RayError:
                pass  # the pool is gone already (a cluster shutting down): nothing left to release
            self.pool, self.replicas, self._resizing = None, 0, None
        if self.compute.request_resources and ray.is_initialized():
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])  # let the cluster scale back down
